"""Table cells and charts as plain text: untrusted strings escaped (app.safe_text), fitted to a
terminal cell width, and numbers formatted the same way on every screen."""
from __future__ import annotations

import math

from rich.cells import cell_len, set_cell_size

from ffnscope.app.safe_text import printable

BLOCKS = " ▁▂▃▄▅▆▇█"


def fit(text: str, width: int, align: str = "left") -> str:
    """Exactly `width` terminal cells: truncated with an ellipsis, or padded."""
    if width <= 0:
        return ""
    if cell_len(text) > width:
        return set_cell_size(text, width - 1) + "…"
    pad = " " * (width - cell_len(text))
    return pad + text if align == "right" else text + pad


def middle(text: str, width: int) -> str:
    """Exactly `width` cells, elided in the middle when too long ("smollm2-…ult.h5.npl.h5"), so
    names that share a prefix or a suffix stay distinguishable."""
    if cell_len(text) <= width:
        return fit(text, width)
    if width < 5:
        return fit(text, width)
    tail = (width - 1) // 2
    head = width - 1 - tail
    end = text
    while cell_len(end) > tail:
        end = end[1:]
    return fit(set_cell_size(text, head) + "…" + end, width)


def unknown(reason: str) -> str:
    """How a detail field shows a value that is not known: a dash and why."""
    return f"- ({reason})"


def token(text: str) -> str:
    """A token string shown literally, quoted, so leading spaces and escapes are visible."""
    return '"' + printable(text).replace('"', '\\"') + '"'


def tokens(items, limit: int = 8) -> str:
    items = list(items)
    shown = " ".join(token(t) for t in items[:limit])
    return shown + (f" +{len(items) - limit}" if len(items) > limit else "")


def pct(value, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def num(value, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def yes_no(value) -> str:
    return "" if value is None else ("yes" if value else "no")


def spark(values, width: int) -> str:
    """A one-line bar chart of `values`, resampled to `width` cells (max of each bin)."""
    values = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
    if not values or width <= 0:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step):max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    else:  # few layers: a few cells each, so the shape is visible
        values = [v for v in values for _ in range(min(width // len(values), 3))]
    top = max(values)
    if top <= 0:
        return BLOCKS[1] * len(values)
    return "".join(BLOCKS[max(1, round(v / top * 8))] if v > 0 else BLOCKS[1] for v in values)


def duration(seconds) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
