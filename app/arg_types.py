"""Argument types of the `ffnscope` command line: every number, list and rule is checked while the
command line is parsed, so a bad value gets one line (`ffnscope: error: ...`, exit 2) before a model is
loaded or a file is touched. Light: no torch, no h5py."""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path


# Absolute sanity caps, where one is clear; what depends on the model, the data or the machine's memory is
# checked once they are known, before anything is allocated (engine.record.config, engine.model.plan).
MAX_TOKENS = 1 << 40          # 1.1e12 tokens: the packed stream alone would be 4.4 TB
MAX_SEQ_LEN = 1 << 20         # positions: fire counts are kept per position and neuron
MAX_BATCH_TOKENS = 1 << 24    # a batch's activations are batch x d_ffn floats per layer
MAX_TOPK = 1 << 16            # contexts per neuron, at most one a sequence
MAX_SAMPLES = 1 << 24         # full activation vectors, every layer's, each d_ffn floats
MAX_SEED = (1 << 63) - 1      # numpy and torch take 64-bit seeds
MAX_PARTS = 1 << 16
MAX_SEEDS = 100               # random maps averaged, each a pass over the held-out data
MAX_POSITION_PLOTS = 100
MAX_RIDGE = 1e6               # relative to the mean variance: far above it every map is zero
MAX_BYTES = 1 << 50           # 1 PiB
FLOAT32_MAX = 3.4028234663852886e38  # act values are compared with tau in the model's float type


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `ffnscope: error: ...` (no usage block), exit 2;
    subparsers made with add_parser are of the same class."""

    raise_errors = False  # set by check_args: an error raises UserError instead of exiting

    def error(self, message: str):  # noqa: D102 - argparse's hook
        if Parser.raise_errors:
            from ffnscope.cache.errors import UserError

            raise UserError(" ".join(message.split()))  # shown through printable, as every UserError
        from ffnscope.engine.safe_text import printable

        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f" (see ffnscope {command} --help)" if command else " (see ffnscope --help)"
        # argparse quotes the value given: it may hold escape sequences
        print(f"ffnscope: error: {printable(' '.join(message.split()))}{where}", file=sys.stderr)
        sys.exit(2)


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def whole(low: int, high: int, why: str = ""):
    """The one type for whole-number options: low <= N <= high; `why` says what the cap stands for."""
    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < low:
            raise argparse.ArgumentTypeError(
                f"'{text}' must be a positive whole number" if low == 1 else
                f"'{text}' must be 0 or more" if low == 0 else f"'{text}' must be at least {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"'{text}' is above the most this option takes, {high:,}"
                                             + (f" ({why})" if why else ""))
        return value
    return parse


def bounded_float(low: float, high: float, low_open: bool = False, why: str = ""):
    """A finite number in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        value = _number(text, float, "a number")
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"'{text}' must be {'above' if low_open else 'at least'} {low:g}")
        if value > high:
            raise argparse.ArgumentTypeError(f"'{text}' is above the most this option takes, {high:g}"
                                             + (f" ({why})" if why else ""))
        return value
    return parse


tokens = whole(1, MAX_TOKENS, "the packed token stream alone would take 4 bytes a token")
seed = whole(0, MAX_SEED, "a 64-bit seed")
tau = bounded_float(-FLOAT32_MAX, FLOAT32_MAX, why="activations are compared with it in float32")


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(text, float, "a number")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must lie strictly between 0 and 1")
    return value


def _ranges(text: str, what: str, example: str):
    from ffnscope.cache.errors import UserError
    from ffnscope.engine.record.meta import parse_ranges

    try:
        return parse_ranges(text, "", what, example)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def layer_list(text: str) -> str:
    """'0-5,8': the syntax is checked here (as intervals: a huge range costs nothing), the range against the
    model once its config is read."""
    _ranges(text, "a layer list", "0-5,8")
    return text


def chunk_list(text: str) -> str:
    """--chunks of `npl substitute`: '1-4' or '2,4', of the 4 chunks."""
    from ffnscope.cache.errors import UserError
    from ffnscope.engine.record.meta import check_ranges

    try:
        check_ranges(_ranges(text, "a chunk list", "1-4 or 2,4"), 1, 4, "", text, "chunk", "the chunks")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return text


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N (whether this machine has that GPU is checked when the job starts)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device; use auto, cpu, cuda or cuda:N")
    return text


def out_path(text: str) -> Path:
    """A file to write: an empty name would be the current directory."""
    if not text:
        raise argparse.ArgumentTypeError("the name is empty; give a file name, like run.h5")
    return Path(text)


def tau_rule(text: str) -> str:
    from ffnscope.cache.errors import UserError
    from ffnscope.engine.record.meta import parse_tau_rule

    try:
        parse_tau_rule(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace(f"--tau-rule '{text}' is", f"'{text}' is")) from None
    return text


def part(text: str):
    """--part: i/n, or auto (from torchrun's or a Slurm array's environment, resolved by the command)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not i/n (for example 2/8) or auto") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"'{text}' is out of range; use i/n with 1 <= i <= n")
    if n > MAX_PARTS:
        raise argparse.ArgumentTypeError(f"'{text}' makes more than {MAX_PARTS:,} parts; use fewer")
    return i, n


def max_freq(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not auto or a fraction like 0.05") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a fraction in (0, 1] like 0.05, or auto")
    return value


def byte_size(option: str, host: bool = False):
    """A positive size like 24GiB; `host`: a host memory budget, at most what this machine has."""
    def parse(text: str) -> int:
        from ffnscope.cache.errors import UserError
        from ffnscope.engine.units import human, parse_bytes

        try:
            value = parse_bytes(text, option)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        except (ValueError, OverflowError):  # '1.2.3GB', past float's range
            raise argparse.ArgumentTypeError(f"{option} '{text}' is not a size; write it like 24GiB, 800MB or "
                                             "123456789") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"'{text}' must be positive, like 24GiB")
        if value > MAX_BYTES:
            raise argparse.ArgumentTypeError(f"'{text}' is above the most this option takes, {human(MAX_BYTES)}")
        if host:
            from ffnscope.engine.record.config import physical_memory

            have = physical_memory()
            if have and value > have:
                raise argparse.ArgumentTypeError(f"'{text}' is more than this machine's {human(have)} of memory; "
                                                 f"give {human(have)} or less")
        return value
    return parse


def check_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse a command line that will run as a job, raising UserError (one line) instead of exiting, so
    a form can refuse a bad option in place."""
    Parser.raise_errors = True
    try:
        return parser.parse_args(argv)
    finally:
        Parser.raise_errors = False
