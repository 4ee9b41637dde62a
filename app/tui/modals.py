"""Small dialogs shared by the screens: help, yes/no, one line of input, a choice from a list, and
the export dialog. All close on esc and work without a mouse."""
from __future__ import annotations

import os
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from ffnscope.app.safe_text import plain, printable
from ffnscope.cache.errors import UserError
from ffnscope.engine.table.export import FORMATS, check_out

MODAL_CSS = """
ModalScreen { align: center middle; }
ModalScreen > Vertical { width: 72; max-width: 100%; height: auto; max-height: 100%;
                         border: round $accent; padding: 0 1; background: $surface; }
ModalScreen .buttons { height: auto; align-horizontal: right; }
ModalScreen Button { margin-left: 1; min-width: 8; }
ModalScreen .error { color: $error; height: auto; }
"""


class HelpScreen(ModalScreen[None]):
    """F1: the keys of the screen below it, from its own bindings."""
    BINDINGS = [Binding("escape,f1,q", "dismiss", "close")]
    DEFAULT_CSS = MODAL_CSS

    def __init__(self, screen: Screen):
        super().__init__()
        self.target = screen

    def compose(self) -> ComposeResult:
        lines = Text()
        title = getattr(self.target, "HELP_TITLE", self.target.__class__.__name__)
        lines.append(f"{title}\n\n", style="bold")
        seen = {"escape", "f1"}  # in the lines below
        for binding in list(self.target.BINDINGS) + list(getattr(self.target, "EXTRA_HELP", [])):
            if isinstance(binding, Binding):  # the footer's short label, or the longer tooltip
                key, description = binding.key, binding.tooltip or binding.description
            else:
                key, description = binding
            if not description or key in seen:
                continue
            seen.add(key)
            display = getattr(binding, "key_display", None)
            keys = display or ", ".join(k.strip() for k in key.split(","))
            lines.append(f"{keys:>16}  ", style="bold")
            lines.append(f"{description}\n")
        lines.append("\n        f1  this help\n    ctrl+p  command palette\n  q ctrl+q  quit\n       esc  back\n")
        with Vertical():
            yield Static(lines)
            yield Label("esc closes")


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape,n", "answer(False)", "no"), Binding("y", "answer(True)", "yes")]
    DEFAULT_CSS = MODAL_CSS

    def __init__(self, question: str, yes: str = "Yes", no: str = "No"):
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.question))
            with Horizontal(classes="buttons"):
                yield Button(f"{self.no} (n)", id="no")
                yield Button(f"{self.yes} (y)", id="yes", variant="warning")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class AskScreen(ModalScreen[str | None]):
    """One line of input. `check(text)` returns an error message or None."""
    BINDINGS = [Binding("escape", "dismiss(None)", "cancel")]
    DEFAULT_CSS = MODAL_CSS

    def __init__(self, prompt: str, value: str = "", placeholder: str = "", check=None):
        super().__init__()
        self.prompt, self.value, self.placeholder, self.check = prompt, value, placeholder, check

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.prompt))  # wraps: a long prompt is not cut at 80 columns
            yield Input(self.value, placeholder=self.placeholder)
            yield Static("", classes="error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        problem = self.check(event.value) if self.check else None
        if problem:
            self.query_one(".error", Static).update(Text(problem))
            return
        self.dismiss(event.value)


class KeyList(OptionList):
    """An OptionList that also moves with the hidden j/k aliases."""
    BINDINGS = [Binding("j", "cursor_down", "down", show=False), Binding("k", "cursor_up", "up", show=False)]


class ChooseScreen(ModalScreen[str | None]):
    """Pick one of (value, label) choices."""
    BINDINGS = [Binding("escape", "dismiss(None)", "cancel")]
    DEFAULT_CSS = MODAL_CSS + "ChooseScreen OptionList { height: auto; max-height: 18; }"

    def __init__(self, prompt: str, choices: list[tuple[str, str]], current: str | None = None):
        super().__init__()
        self.prompt, self.choices, self.current = prompt, choices, current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.prompt)
            yield KeyList(*(Option(Text(label), id=value) for value, label in self.choices))

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        ids = [value for value, _ in self.choices]
        options.highlighted = ids.index(self.current) if self.current in ids else 0

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


EXTENSIONS = {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet", "markdown": ".md"}


class ExportScreen(ModalScreen[tuple[str, Path] | None]):
    """Format and path of an export; the caller writes the file in a worker."""
    BINDINGS = [Binding("escape", "dismiss(None)", "cancel")]
    DEFAULT_CSS = MODAL_CSS + "ExportScreen OptionList { height: 6; }"

    def __init__(self, what: str, rows: int, default_path: Path, source: Path | None = None):
        super().__init__()
        self.what, self.rows, self.default_path = what, rows, default_path
        self.sources = [source] if source is not None else []  # the recording: never written over
        self.confirmed: Path | None = None  # an existing file the user asked to replace (enter twice)

    def _path(self, value: str) -> Path:
        """The path typed; the input shows the default escaped (app.safe_text), and that text stands for it."""
        for extension in EXTENSIONS.values():
            if value == printable(str(self.default_path.with_suffix(extension))):
                return self.default_path.with_suffix(extension)
        return Path(value).expanduser()

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(f"Export {self.rows:,} rows of the {self.what}"))
            yield KeyList(*(Option(fmt.upper() if fmt != "markdown" else "Markdown", id=fmt) for fmt in FORMATS),
                          id="format")
            yield Label("to file (enter writes it):")
            yield Input(printable(str(self.default_path.with_suffix(".csv"))), id="path")
            yield Static("", classes="error")

    def on_mount(self) -> None:
        self.query_one("#format", OptionList).highlighted = 0
        self.query_one("#format", OptionList).focus()

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        path = self.query_one("#path", Input)
        path.value = str(Path(path.value).with_suffix(EXTENSIONS[event.option.id]))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#path", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        path = self._path(event.value)
        error = self.query_one(".error", Static)
        if not event.value.strip():
            error.update("give a file path")
        elif not path.parent.is_dir():
            error.update(plain(f"directory {path.parent} does not exist"))
        elif path.is_dir():
            error.update(plain(f"{path} is a directory"))
        else:
            try:
                check_out(path, force=True, sources=self.sources)  # never a recording
            except UserError as exc:
                error.update(plain(exc))
                return
            if os.path.lexists(path) and path != self.confirmed:  # as `export` without --force: ask first
                self.confirmed = path
                error.update(plain(f"{path} exists; enter again to replace it, or esc"))
                return
            options = self.query_one("#format", OptionList)
            fmt = options.get_option_at_index(options.highlighted or 0).id
            self.dismiss((fmt, path))
