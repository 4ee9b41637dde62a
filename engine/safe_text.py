"""The one sanitizer for untrusted text: token strings, model and file names, data sources, domains,
firing rules, progress files and paths, wherever they are shown (CLI tables, info, report, jobs,
errors, Markdown exports and the TUI). Control characters (ESC, BEL, CR, NUL, the C1 range, bidi
and other format characters, line and paragraph separators) become visible escapes, so nothing from a
cache or a data set can move the cursor, set a title, change colours or hide text; a backslash is
doubled so an escape shown is never mistaken for one written. Markup is the caller's: Rich output
wraps the result in Text (app.safe_text.plain), Markdown backslash-escapes its own specials."""
from __future__ import annotations

import unicodedata


_SKIN_TONES = range(0x1F3FB, 0x1F400)  # emoji modifiers: one cell pair with the emoji before them
_FLAG_LETTERS = range(0x1F1E6, 0x1F200)  # regional indicators: a pair is one flag


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r\t":
        return repr(ch)[1:-1]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: object) -> str:
    """Also escapes what a terminal draws wider than Rich measures it (so a cell's width is its real
    one and a scrollbar never overwrites text): a skin-tone modifier not after an emoji, and a flag
    letter without its pair (BPE tokens split emoji sequences anywhere)."""
    text = str(text)
    out = []
    flags = 0  # regional indicators in the current run
    for i, ch in enumerate(text):
        code = ord(ch)
        flags = flags + 1 if code in _FLAG_LETTERS else 0
        if ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            out.append(_escape(ch))
        elif code in _SKIN_TONES and not (i and unicodedata.category(text[i - 1]) == "So"):
            out.append(_escape(ch))
        elif code in _FLAG_LETTERS and flags % 2 and not (i + 1 < len(text) and ord(text[i + 1]) in _FLAG_LETTERS):
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)
