"""Argument types of the `ffnscope` command line: every number, list and rule is checked while the
command line is parsed, so a bad value gets one line (`ffnscope: error: ...`, exit 2) before a model is
loaded or a file is touched. Light: no torch, no h5py."""
from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `ffnscope: error: ...` (no usage block), exit 2;
    subparsers made with add_parser are of the same class."""

    raise_errors = False  # set by check_args: an error raises UserError instead of exiting

    def error(self, message: str):  # noqa: D102 - argparse's hook
        if Parser.raise_errors:
            from ffnscope.cache.errors import UserError

            raise UserError(" ".join(message.split()))
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f" (see ffnscope {command} --help)" if command else " (see ffnscope --help)"
        print(f"ffnscope: error: {' '.join(message.split())}{where}", file=sys.stderr)
        sys.exit(2)


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive whole number")
    return value


def count(text: str) -> int:
    """A whole number >= 0."""
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be 0 or more")
    return value


def int_at_least(low: int):
    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < low:
            raise argparse.ArgumentTypeError(f"'{text}' must be at least {low}")
        return value
    return parse


def finite_float(text: str) -> float:
    return _number(text, float, "a number")


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be 0 or more")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(text, float, "a number")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must lie strictly between 0 and 1")
    return value


def layer_list(text: str) -> str:
    """'0-5,8': the syntax is checked here, the range against the model once its config is read."""
    pieces = [p.strip() for p in text.split(",")]
    try:
        if not all(pieces):
            raise ValueError
        for piece in pieces:
            lo, _, hi = piece.partition("-")
            if int(lo) < 0 or int(hi or lo) < int(lo):
                raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a layer list; write it like 0-5,8") from None
    return text


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


def byte_size(option: str):
    def parse(text: str) -> int:
        from ffnscope.cache.errors import UserError
        from ffnscope.engine.units import parse_bytes

        try:
            return parse_bytes(text, option)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def check_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse a command line that will run as a job, raising UserError (one line) instead of exiting, so
    a form can refuse a bad option in place."""
    Parser.raise_errors = True
    try:
        return parser.parse_args(argv)
    finally:
        Parser.raise_errors = False
