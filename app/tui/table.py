"""A table that renders only the rows on screen (Textual's line API), so a view over millions of
neurons costs the same as one over ten. Rows are fetched through a callback by position in the
current view order; the widget never holds the data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rich.cells import cell_len
from rich.segment import Segment
from textual.binding import Binding
from textual.events import Click, MouseScrollDown, MouseScrollUp
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widget import Widget

from ffnscope.app.tui.cells import fit, middle


@dataclass
class Column:
    key: str
    title: str
    width: int          # 0: takes what the other columns leave
    align: str = "right"
    min: int = 4        # a flex column's least width; below it the table scrolls sideways (← →)
    elide: str = "end"  # "middle": cut names in the middle, so a shared prefix stays distinguishable


class VirtualTable(Widget, can_focus=True):
    DEFAULT_CSS = """
    VirtualTable { height: 1fr; }
    VirtualTable > .virtual-table--header { text-style: bold; background: $panel; }
    VirtualTable > .virtual-table--cursor { background: $accent 40%; }
    VirtualTable:focus > .virtual-table--cursor { background: $accent; color: $text; }
    """
    COMPONENT_CLASSES = {"virtual-table--header", "virtual-table--cursor"}
    BINDINGS = [
        Binding("up,k", "move(-1)", "up", show=False), Binding("down,j", "move(1)", "down", show=False),
        Binding("pageup,ctrl+b", "page(-1)", "page up", show=False),
        Binding("pagedown,ctrl+f,space", "page(1)", "page down", show=False),
        Binding("home,g", "jump(0)", "first", show=False), Binding("end,G", "jump(-1)", "last", show=False),
        Binding("left,h", "side(-1)", "scroll left", show=False),
        Binding("right,l", "side(1)", "scroll right", show=False),
    ]  # enter belongs to the screens, whose footers name what it opens
    cursor = reactive(0, always_update=True)

    class RowMessage(Message):
        """About row `index` (its position in the current view)."""
        def __init__(self, table: "VirtualTable", index: int):
            super().__init__()
            self.table, self.index = table, index

        @property
        def control(self) -> "VirtualTable":
            return self.table

    class Chosen(RowMessage):
        """A double click on a row."""

    class Moved(RowMessage):
        """The cursor moved to a row."""

    def __init__(self, columns: list[Column], *, id: str | None = None):
        super().__init__(id=id)
        self.columns = columns
        self.count = 0
        self.cell: Callable[[int, str], str] = lambda i, key: ""
        self.top = 0
        self.left = 0  # first cell shown when the columns are wider than the widget

    def show(self, count: int, cell: Callable[[int, str], str], cursor: int | None = 0) -> None:
        """New rows: `cell(i, key)` gives the text of row i (view order) in column `key`."""
        self.count, self.cell = count, cell
        if cursor is not None:
            self.top = 0
            self.cursor = min(cursor, max(count - 1, 0))
        else:
            self.cursor = min(self.cursor, max(count - 1, 0))
        self.refresh()

    @property
    def body_height(self) -> int:
        return max(self.size.height - 1, 1)

    def set_columns(self, columns: list[Column]) -> None:
        self.columns = columns
        self.left = min(self.left, max(self.total_width - self.size.width, 0))
        self.refresh()

    def widths(self) -> list[int]:
        fixed = sum(c.width + 1 for c in self.columns if c.width)
        flex = [c for c in self.columns if not c.width]
        rest = max(self.size.width - fixed - len(flex), 0)
        return [c.width or max(rest // max(len(flex), 1), c.min) for c in self.columns]

    @property
    def total_width(self) -> int:
        """The width of a whole row: more than the widget's when the table scrolls sideways."""
        widths = self.widths()
        return sum(widths) + len(widths) - 1

    def _line(self, texts: list[str]) -> str:
        cells = [middle(text, w) if col.elide == "middle" and cell_len(text) > w else fit(text, w, col.align)
                 for text, w, col in zip(texts, self.widths(), self.columns)]
        return fit(" ".join(cells), max(self.total_width, self.size.width))

    def _visible(self, text: str, style, header: bool = False) -> Strip:
        """The part of a row in view; the header marks with ‹ › that there is more to either side."""
        width, total = self.size.width, max(self.total_width, self.size.width)
        left = min(self.left, total - width)
        strip = Strip([Segment(text, style)], total).crop(left, left + width)
        if header and total > width:
            more_left, more_right = left > 0, left + width < total
            segments = [Segment("‹", style)] if more_left else []
            inner = strip.crop(1 if more_left else 0, width - 1 if more_right else width)
            segments += list(inner) + ([Segment("›", style)] if more_right else [])
            strip = Strip(segments, width)
        return strip.adjust_cell_length(width, self.rich_style)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if y == 0:
            style = self.get_component_rich_style("virtual-table--header")
            return self._visible(self._line([c.title for c in self.columns]), style, header=True)
        i = self.top + y - 1
        if i >= self.count:
            return Strip.blank(width, self.rich_style)
        text = self._line([self.cell(i, c.key) for c in self.columns])
        style = self.get_component_rich_style("virtual-table--cursor") if i == self.cursor else self.rich_style
        return self._visible(text, style)

    def watch_cursor(self, old: int, new: int) -> None:
        if new < self.top:
            self.top = new
        elif new >= self.top + self.body_height:
            self.top = new - self.body_height + 1
        self.refresh()
        if old != new:
            self.post_message(self.Moved(self, new))

    def on_resize(self) -> None:
        self.cursor = self.cursor

    def action_move(self, step: int) -> None:
        self.cursor = max(0, min(self.cursor + step, self.count - 1))

    def action_side(self, direction: int) -> None:
        """Scroll sideways, 8 cells a step, when the columns are wider than the widget."""
        self.left = max(0, min(self.left + 8 * direction, self.total_width - self.size.width))
        self.refresh()

    def action_page(self, direction: int) -> None:
        self.action_move(direction * self.body_height)

    def action_jump(self, where: int) -> None:
        self.cursor = max(self.count - 1, 0) if where < 0 else 0

    def action_choose(self) -> None:
        if self.count:
            self.post_message(self.Chosen(self, self.cursor))

    def _on_mouse_scroll_down(self, event: MouseScrollDown) -> None:
        self.top = max(0, min(self.top + 3, self.count - self.body_height))
        self.refresh()
        event.stop()

    def _on_mouse_scroll_up(self, event: MouseScrollUp) -> None:
        self.top = max(0, self.top - 3)
        self.refresh()
        event.stop()

    def _on_click(self, event: Click) -> None:
        if event.y >= 1 and self.top + event.y - 1 < self.count:
            index = self.top + event.y - 1
            if event.chain >= 2 and index == self.cursor:
                self.action_choose()
            self.cursor = index
