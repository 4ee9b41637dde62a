"""The built-in default corpus: text that every CPython install carries, labelled by domain.

- "prose": the help topics of `pydoc_data` (the language reference behind `help()`), then one
  help page per stdlib module, built from its docstrings (parsed with `ast`, never imported);
- "code": the stdlib's Python source files (no tests, no site-packages, none over 200 KB);
- "legal": CPython's LICENSE.txt, one document per section, when the install has it;
- "math": generated questions with answers in the style of DeepMind Mathematics.

Domains are interleaved by characters, which need no tokenizer: each next document comes from
the domain furthest below its share of the characters so far. A domain that runs out drops out
and the others keep their relative shares; the stream ends when only the endless math is left
(about 17 M characters; 5.6 M tokens with SmolLM2's tokenizer). The order within each domain is
shuffled with the seed. Files are read lazily as the stream reaches them, so it starts at once.
"""

import ast
import itertools
import math
import os
import random
import re
import sys
import sysconfig
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from ffnscope.engine.data.sources import Document

# Shares of characters while every domain lasts. Many tokenizers (SmolLM2's, Llama's) split numbers
# into single digits, so math gives about twice the tokens per character of prose; these shares
# give token shares of about prose 30%, code 40%, math 25% with SmolLM2's tokenizer. Legal is soon
# used up, prose (2 M characters) after about 2 M tokens; then code and math go on alone.
SHARES = {"prose": 0.35, "code": 0.45, "math": 0.15, "legal": 0.05}

_MAX_FILE_BYTES = 200_000
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def builtin_documents(seed: int = 0) -> Iterator[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    streams = {
        "prose": itertools.chain(_help_topics(seed), _module_help(stdlib, seed)),
        "code": _source_files(stdlib, seed),
        "math": _math(seed),
        "legal": _license_sections(stdlib, seed),
    }
    emitted = dict.fromkeys(streams, 0)
    while streams.keys() - {"math"}:  # math is endless: stop when the finite domains are used up
        domain = min(streams, key=lambda d: emitted[d] / SHARES[d])
        doc = next(streams[domain], None)
        if doc is None:
            del streams[domain]
            continue
        emitted[domain] += len(doc.text)
        yield doc


def _help_topics(seed: int) -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        return
    names = sorted(topics)
    random.Random(f"topics-{seed}").shuffle(names)
    for name in names:
        yield Document(topics[name], "prose", f"pydoc:{name}")


def _stdlib_files(stdlib: Path, rng: random.Random) -> list[Path]:
    """The stdlib's .py files in a seeded order. Only names are listed here (milliseconds)."""
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files += [Path(root, n) for n in sorted(names) if n.endswith(".py")]
    rng.shuffle(files)
    return files


def _read_small(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return None
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _source_files(stdlib: Path, seed: int) -> Iterator[Document]:
    for path in _stdlib_files(stdlib, random.Random(f"code-{seed}")):
        text = _read_small(path)
        if text and not text.isspace():
            yield Document(text, "code", f"stdlib:{path.relative_to(stdlib).as_posix()}")


def _module_help(stdlib: Path, seed: int) -> Iterator[Document]:
    for path in _stdlib_files(stdlib, random.Random(f"help-{seed}")):
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        text = _read_small(path)
        if text is None:
            continue
        try:
            with warnings.catch_warnings():  # newer Pythons warn about old escape sequences
                warnings.simplefilter("ignore")
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        parts = [p for p in [ast.get_docstring(tree), *_docstrings(tree.body, "")] if p]
        if parts:
            body = "\n\n".join(parts)
            yield Document(f"Help on module {module}:\n\n{body}", "prose", f"stdlib-doc:{module}")


def _docstrings(nodes: list[ast.stmt], prefix: str) -> Iterator[str]:
    """Docstrings of the public classes, functions and methods, laid out like pydoc's help."""
    for node in nodes:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc:
                yield f"{prefix}{node.name}\n{textwrap.indent(doc, '    ')}"
            if isinstance(node, ast.ClassDef):
                yield from _docstrings(node.body, f"{prefix}{node.name}.")


def _license_sections(stdlib: Path, seed: int) -> Iterator[Document]:
    # Unix installs keep LICENSE.txt beside the stdlib, Windows installs in the prefix.
    candidates = [stdlib, Path(sys.base_prefix), Path(sys.prefix)]
    path = next((p / "LICENSE.txt" for p in candidates if (p / "LICENSE.txt").is_file()), None)
    if path is None:
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    # A section starts at a heading line underlined with === or ---.
    sections = [s for s in re.split(r"\n(?=[^\n]+\n[=-]{5,}\n)", text) if s.strip()]
    order = list(range(len(sections)))
    random.Random(f"legal-{seed}").shuffle(order)
    for i in order:
        yield Document(sections[i], "legal", f"LICENSE.txt#{i}")


# --- math ---------------------------------------------------------------------------------------

def _math(seed: int) -> Iterator[Document]:
    """Endless worksheets of a few questions each, every question followed by its answer."""
    rng = random.Random(f"math-{seed}")
    for i in itertools.count():
        problems = [rng.choice(_PROBLEMS)(rng) for _ in range(rng.randint(4, 12))]
        text = "\n\n".join(f"{question}\nAnswer: {answer}" for question, answer in problems)
        yield Document(text, "math", f"math:{i}")


def _poly(coefficients: list[int], var: str) -> str:
    """Format sum(c_k * var**k), highest power first, as in '2*x**2 - 3'. Some c_k must be non-zero."""
    terms = []
    for power in reversed(range(len(coefficients))):
        c = coefficients[power]
        if c == 0:
            continue
        monomial = "" if power == 0 else var if power == 1 else f"{var}**{power}"
        body = str(abs(c)) if not monomial else monomial if abs(c) == 1 else f"{abs(c)}*{monomial}"
        if not terms:
            terms.append(f"-{body}" if c < 0 else body)
        else:
            terms.append(f"- {body}" if c < 0 else f"+ {body}")
    return " ".join(terms)


def _nonzero(rng: random.Random, bound: int) -> int:
    return rng.choice([n for n in range(-bound, bound + 1) if n != 0])


def _add(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(-999, 999), rng.randint(-999, 999)
    return rng.choice([
        (f"What is {a} + {b}?", a + b),
        (f"Calculate {a} + {b}.", a + b),
        (f"Add {a} and {b}.", a + b),
        (f"What is {a} - {b}?", a - b),
        (f"Subtract {b} from {a}.", a - b),
    ])


def _multiply(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(-99, 99), _nonzero(rng, 30)
    return rng.choice([
        (f"Multiply {a} and {b}.", a * b),
        (f"What is {a} times {b}?", a * b),
        (f"Divide {a * b} by {b}.", a),
        (f"What is {a * b} divided by {b}?", a),
    ])


def _solve(rng: random.Random) -> tuple[str, int]:
    var = rng.choice("abcdhjkmnpqrstuvwxyz")
    x, a, b = rng.randint(-20, 20), _nonzero(rng, 12), rng.randint(-50, 50)
    lhs, rhs = _poly([b, a], var), str(a * x + b)
    if rng.random() < 0.5:
        lhs, rhs = rhs, lhs
    return f"Solve {lhs} = {rhs} for {var}.", x


def _fraction_of(rng: random.Random) -> tuple[str, int]:
    d = rng.choice([2, 3, 4, 5, 6, 8, 10, 12])
    n = rng.choice([k for k in range(1, d) if math.gcd(k, d) == 1])
    k = rng.randint(1, 60)
    return rng.choice([f"Calculate {n}/{d} of {d * k}.", f"What is {n}/{d} of {d * k}?"]), n * k


def _evaluate(rng: random.Random) -> tuple[str, int]:
    f, var = rng.choice("fghjklnqrstuvw"), rng.choice("abcdimoxyz")
    coefficients = [rng.randint(-9, 9), rng.randint(-9, 9), _nonzero(rng, 5)]
    x = rng.randint(-10, 10)
    value = sum(c * x**k for k, c in enumerate(coefficients))
    return f"Let {f}({var}) = {_poly(coefficients, var)}. What is {f}({x})?", value


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _prime(rng: random.Random) -> tuple[str, bool]:
    n = rng.randint(2, 5000)
    return rng.choice([
        (f"Is {n} a prime number?", _is_prime(n)),
        (f"Is {n} composite?", not _is_prime(n)),
    ])


def _remainder(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 5000), rng.randint(2, 60)
    return f"What is the remainder when {a} is divided by {b}?", a % b


def _gcd(rng: random.Random) -> tuple[str, int]:
    g = rng.randint(1, 30)
    a, b = g * rng.randint(1, 40), g * rng.randint(1, 40)
    return f"What is the greatest common divisor of {a} and {b}?", math.gcd(a, b)


_PROBLEMS: list[Callable[[random.Random], tuple[str, int | bool]]] = [
    _add, _multiply, _solve, _fraction_of, _evaluate, _prime, _remainder, _gcd
]
