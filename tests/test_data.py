import itertools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from ffnscope.cache.errors import UserError
from ffnscope.engine.data import builtin
from ffnscope.engine.data.builtin import builtin_documents
from ffnscope.engine.data.sources import Document, open_sources
from ffnscope.engine.data.packing import pack
from tests.tiny_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def user_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- tiny tokenizer -------------------------------------------------------------------------------

def test_tiny_tokenizer_is_bytes_and_round_trips(tokenizer, tmp_path):
    text = "Hello, world!\n\tx = [1, 2]  # done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode())
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode([BOS_ID, *ids, EOS_ID]) == f"<s>{text}</s>"


# --- packing ---------------------------------------------------------------------------------------

def docs(*texts_and_domains: tuple[str, str]) -> list[Document]:
    return [Document(text, domain, f"doc{i}") for i, (text, domain) in enumerate(texts_and_domains)]


def test_pack_layout_with_start_and_separator(tokenizer):
    a, b, c, d, e, f = b"abcdef"
    packed = pack(docs(("ab", "y"), ("cde", "x"), ("f", "y")), tokenizer,
                  seq_len=4, n_seqs=3, start_id=BOS_ID, sep_id=EOS_ID)
    assert packed.tokens.dtype == np.int32 and packed.domains.dtype == np.uint8
    assert packed.tokens.tolist() == [
        [BOS_ID, a, b, EOS_ID],
        [BOS_ID, c, d, e],
        [BOS_ID, EOS_ID, f, EOS_ID],
    ]
    assert packed.domain_names == ["x", "y"]  # sorted, not in order of appearance
    # The start token takes the domain of the token after it; a separator that of its document.
    assert packed.domains.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]]
    assert packed.n_documents == 3 and not packed.short


def test_pack_without_start_or_separator(tokenizer):
    packed = pack(docs(("ab", "p"), ("cde", "q")), tokenizer, seq_len=2, n_seqs=2, start_id=None, sep_id=None)
    assert packed.tokens.tolist() == [list(b"ab"), list(b"cd")]
    assert packed.domain_names == ["p", "q"]
    assert packed.n_documents == 2


def test_pack_short_data_returns_full_sequences_only(tokenizer):
    packed = pack(docs(("x" * 25, "d")), tokenizer, seq_len=10, n_seqs=5, start_id=BOS_ID, sep_id=None)
    assert packed.short and packed.tokens.shape == (2, 10)


def test_pack_too_little_data_for_one_sequence(tokenizer):
    message = user_error(lambda: pack(docs(("abc", "d")), tokenizer, 10, 2, BOS_ID, EOS_ID))
    assert "4 tokens" in message and "--seq-len" in message


def test_pack_stops_reading_once_it_has_enough(tokenizer):
    consumed = 0

    def endless() -> Iterator[Document]:
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            yield Document(f"document {i} " * 10, "d", str(i))

    packed = pack(endless(), tokenizer, seq_len=64, n_seqs=10, start_id=BOS_ID, sep_id=EOS_ID)
    assert packed.tokens.shape == (10, 64) and not packed.short
    assert consumed <= 300  # one batch


# --- sources ---------------------------------------------------------------------------------------

def make_corpus_dir(root: Path) -> Path:
    for i in range(20):
        write(root / ("code" if i % 2 else "prose") / f"f{i:02}.txt", f"file {i} " * (i + 5))
    write(root / "top.txt", "at the top level")
    return root


def sources_of(specs: list[str], **kwargs) -> list[str]:
    return [doc.source for doc in open_sources(specs, **kwargs).documents()]


def test_directory_order_is_seeded(tmp_path, tokenizer):
    root = make_corpus_dir(tmp_path / "corpus")
    first = sources_of([str(root)], seed=0)
    assert first == sources_of([str(root)], seed=0)
    assert first != sources_of([str(root)], seed=1)
    assert sorted(first) == sorted(str(p) for p in root.rglob("*.txt"))

    def fingerprint(seed: int) -> str:
        return pack(open_sources([str(root)], seed=seed).documents(), tokenizer, 16, 8, BOS_ID, EOS_ID).fingerprint()

    assert fingerprint(0) == fingerprint(0) != fingerprint(1)


def test_domains_and_describe(tmp_path):
    root = make_corpus_dir(tmp_path / "corpus")
    single = write(tmp_path / "notes.txt", "some notes")
    sources = open_sources([str(root), str(single)])
    domains = {Path(d.source).name: d.domain for d in sources.documents()}
    assert domains["f00.txt"] == "prose" and domains["f01.txt"] == "code"
    assert domains["top.txt"] == "corpus" and domains["notes.txt"] == "notes"
    described = sources.describe()
    json.dumps(described)
    assert [(d["kind"], d["documents"]) for d in described] == [("directory", 21), ("text", 1)]
    assert described[1]["size"] == len("some notes")


def test_builtin_after_user_documents(tmp_path):
    single = write(tmp_path / "mine.txt", "my own text")
    stream = open_sources(["builtin", str(single)]).documents()
    assert next(stream).source == str(single)
    assert next(stream).domain in {"prose", "code", "math", "legal"}


def test_jsonl_with_field_and_domain(tmp_path):
    path = write(tmp_path / "data.jsonl", "\n".join([
        json.dumps({"body": "first", "domain": "news"}),
        "",
        json.dumps({"body": "second"}),
        json.dumps({"body": "   "}),
    ]) + "\n")
    sources = open_sources([str(path)], field="body")
    assert sorted((d.text, d.domain) for d in sources.documents()) == [("first", "news"), ("second", "data")]
    assert sources.describe()[0]["kind"] == "jsonl"


def test_directory_skips_binary_files_and_reads_jsonl(tmp_path):
    root = tmp_path / "mixed"
    write(root / "a.txt", "plain text")
    write(root / "b.bin", b"\x00\x01\x02 binary")
    write(root / "c.jsonl", json.dumps({"text": "from jsonl"}) + "\n")
    sources = open_sources([str(root)])
    assert sorted(d.text for d in sources.documents()) == ["from jsonl", "plain text"]
    assert sources.notes == [f"{root}: skipped 1 binary file"]
    assert sources.describe()[0]["skipped_binary"] == 1


def test_non_utf8_is_replaced_and_noted_once(tmp_path):
    path = write(tmp_path / "latin.txt", "caf\xe9\nna\xefve\n".encode("latin-1") * 50)
    sources = open_sources([str(path)])
    (doc,) = sources.documents()
    assert doc.text.startswith("caf\ufffd")
    assert sources.notes == [f"{path}: not valid UTF-8, decoded with replacement characters"]

    root = tmp_path / "dir"
    for name in ("x.txt", "y.txt"):
        write(root / name, b"\xff\xfe bad bytes")
    sources = open_sources([str(root)])
    list(sources.documents())
    assert len(sources.notes) == 1 and sources.notes[0].startswith(f"{root}: not valid UTF-8")


def test_error_messages_name_the_problem(tmp_path):
    missing = tmp_path / "nope.txt"
    message = user_error(lambda: open_sources([str(missing)]))
    assert message.startswith(f"data source not found: {missing};")

    binary = write(tmp_path / "blob.txt", b"abc\x00def")
    message = user_error(lambda: open_sources([str(binary)]))
    assert message.startswith(f"{binary} looks binary")

    empty = write(tmp_path / "empty.txt", " \n\t ")
    message = user_error(lambda: list(open_sources([str(empty)]).documents()))
    assert str(empty) in message and "no text" in message

    bad_json = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    message = user_error(lambda: list(open_sources([str(bad_json)]).documents()))
    assert f"{bad_json} line 3 is not valid JSON" in message

    no_field = write(tmp_path / "nofield.jsonl", '{"text": "ok"}\n{"content": "x"}\n')
    message = user_error(lambda: list(open_sources([str(no_field)]).documents()))
    assert f"{no_field} line 2" in message and "'text'" in message and "--field" in message


# --- built-in corpus -------------------------------------------------------------------------------

def test_builtin_starts_fast_and_mixes_all_domains(monkeypatch):
    """Fast start, by what it does rather than a timing: the first document reads at most a few files."""
    reads = []
    real = builtin._read_small
    monkeypatch.setattr(builtin, "_read_small", lambda path: reads.append(path) or real(path))
    stream = open_sources(["builtin"]).documents()
    first = next(stream)
    assert len(reads) <= 3, reads
    head = [first, *itertools.islice(stream, 299)]
    assert {d.domain for d in head} == {"prose", "code", "math", "legal"}
    assert not any("/test/" in d.source or "site-packages" in d.source for d in head)
    assert [d.source for d in head] == [d.source for d in itertools.islice(builtin_documents(0), 300)]
    assert [d.source for d in head] != [d.source for d in itertools.islice(builtin_documents(1), 300)]


def test_builtin_packing_is_deterministic(tokenizer):
    def packed(seed: int):
        return pack(open_sources(["builtin"], seed=seed).documents(), tokenizer,
                    seq_len=1024, n_seqs=300, start_id=BOS_ID, sep_id=EOS_ID)

    a, b = packed(0), packed(0)
    assert a.tokens.shape == (300, 1024) and not a.short
    assert np.array_equal(a.tokens, b.tokens) and a.fingerprint() == b.fingerprint()
    assert a.domain_names == ["code", "legal", "math", "prose"]
    assert packed(1).fingerprint() != a.fingerprint()


# Each math question pattern with a check of the answer (rhs) against the numbers in it.
_MATH_CHECKS = [
    (r"Solve (.+) = (.+) for (\w)\.", lambda m, ans: eval(f"({m[1]}) - ({m[2]})", {m[3]: int(ans)}) == 0),
    (r"Let (\w)\((\w)\) = (.+)\. What is \1\((-?\d+)\)\?", lambda m, ans: eval(m[3], {m[2]: int(m[4])}) == int(ans)),
    (r"(?:What is|Calculate) (-?\d+) ([-+]) (-?\d+)[?.]", lambda m, ans: eval(f"{m[1]} {m[2]} ({m[3]})") == int(ans)),
    (r"Add (-?\d+) and (-?\d+)\.", lambda m, ans: int(m[1]) + int(m[2]) == int(ans)),
    (r"Subtract (-?\d+) from (-?\d+)\.", lambda m, ans: int(m[2]) - int(m[1]) == int(ans)),
    (r"(?:Multiply (-?\d+) and|What is (-?\d+) times) (-?\d+)[?.]",
     lambda m, ans: int(m[1] or m[2]) * int(m[3]) == int(ans)),
    (r"(?:Divide (-?\d+) by|What is (-?\d+) divided by) (-?\d+)[?.]",
     lambda m, ans: int(m[1] or m[2]) == int(ans) * int(m[3])),
    (r"(?:Calculate|What is) (\d+)/(\d+) of (\d+)[?.]", lambda m, ans: int(m[1]) * int(m[3]) == int(ans) * int(m[2])),
    (r"Is (\d+) a prime number\?", lambda m, ans: is_prime(int(m[1])) == (ans == "True")),
    (r"Is (\d+) composite\?", lambda m, ans: is_prime(int(m[1])) == (ans == "False")),
    (r"What is the remainder when (\d+) is divided by (\d+)\?", lambda m, ans: int(m[1]) % int(m[2]) == int(ans)),
    (r"What is the greatest common divisor of (\d+) and (\d+)\?",
     lambda m, ans: math.gcd(int(m[1]), int(m[2])) == int(ans)),
]


def is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


def test_builtin_math_answers_are_correct():
    maths = [d for d in itertools.islice(builtin_documents(3), 400) if d.domain == "math"]
    problems = [p.split("\nAnswer: ") for d in maths for p in d.text.split("\n\n")]
    assert len(problems) > 500
    for question, answer in problems:
        checks = [check(m, answer) for pattern, check in _MATH_CHECKS if (m := re.fullmatch(pattern, question))]
        assert checks == [True], (question, answer)
