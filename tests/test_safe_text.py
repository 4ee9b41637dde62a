"""The one sanitizer: escapes what could drive a terminal, and what a terminal draws wider than Rich
measures (a scrollbar or the next column would overwrite text). pyte's wcwidth stands for the terminal."""
import pytest
import wcwidth
from rich.cells import cell_len

from ffnscope.engine.safe_text import printable

EMOJI = ["👍🏽x", "🏽", "a🏽", "x🏽🏽", "👨\u200d👩\u200d👧", "🏳️\u200d🌈", "❤️", "x\ufe0f", "🇩🇪", "🇩", "🇩🇪🇫",
         "🧑🏿\u200d🦰", "🏴\U000e0067\U000e0062\U000e007f", "e\u0301", "\u3000ﾟ", "\u00ad"]


@pytest.mark.parametrize("text", EMOJI)
def test_width_as_the_terminal_draws_it(text):
    shown = printable(text)
    assert cell_len(shown) == wcwidth.wcswidth(shown), (text, shown)


def test_only_what_misleads_is_escaped():
    assert printable("👍🏽 🇩🇪 café ﾟ") == "👍🏽 🇩🇪 café ﾟ"       # whole sequences stay as they are
    assert printable("🏽") == "\\U0001f3fd" and printable("🇩🇪🇫") == "🇩🇪\\U0001f1eb"
    assert printable("a\\b\x1b[31m\u202e\n") == "a\\\\b\\x1b[31m\\u202e\\n"
