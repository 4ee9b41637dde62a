"""The form that starts a recording job: model spec, data sources, tokens, layers, device and
memory budgets. The job runs in its own process (engine.jobs.launcher) and analyzes itself when done.
Below the fields, an estimate of the recording's duration from the newest measured recording of the model."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, Static

from ffnscope.app.safe_text import printable
from ffnscope.app.tui.base import FramedScreen
from ffnscope.cache.errors import UserError
from ffnscope.engine.explore import catalog, estimate
from ffnscope.engine.jobs import launcher as jobs
from ffnscope.engine.paths import recordings_dir
from ffnscope.engine.units import parse_bytes

# (id, label, default, placeholder); placeholders fit the 63 cells an input has at 80 columns
FIELDS = [
    ("name", "output name", "", "a file name in the recordings directory, like smollm2-1m"),
    ("model", "model", "default", "default, a model directory, a .gguf file or a hub id"),
    ("data", "data", "builtin", "builtin, or files and directories, separated by spaces"),
    ("tokens", "tokens", "24576", "tokens to record"),
    ("layers", "layers", "", "like 0-11,15 (empty: all)"),
    ("device", "device", "auto", "auto, cpu, cuda or cuda:N"),
    ("device_memory", "device memory", "", "weights on the device, like 24GiB (empty: all it has)"),
    ("host_memory", "host memory", "", "a host memory cap, like 32GiB (empty: most of it)"),
    ("options", "more options", "", "other record options, like --seq-len 512 --tau 0.5"),
]


def check(values: dict[str, str]) -> dict:
    """Form values -> start_record keyword arguments; UserError names the first bad field."""
    name = values["name"].strip() or "recording"
    if not re.fullmatch(r"[\w.+-]+", name):
        raise UserError("output name: use letters, digits, '.', '_', '+' or '-'")
    out = recordings_dir() / (name if name.endswith(".h5") else name + ".h5")
    try:
        tokens = int(values["tokens"].replace(",", "").replace("_", ""))
    except ValueError:
        raise UserError("tokens: write a whole number, like 65536") from None
    if tokens <= 0:
        raise UserError("tokens: must be positive")
    data = values["data"].split()
    if not data:
        raise UserError("data: give at least one source, or builtin")
    for source in data:
        if source != "builtin" and not Path(source).expanduser().exists():
            raise UserError(f"data: {source} does not exist")
    if values["layers"].strip() and not re.fullmatch(r"[\d,\- ]+", values["layers"]):
        raise UserError("layers: write them like 0-11,15")
    kwargs = dict(out=out, model=values["model"].strip() or "default", data=[str(Path(d).expanduser()) if d != "builtin"
                                                                           else d for d in data],
                  tokens=tokens, layers=values["layers"].replace(" ", "") or None,
                  device=values["device"].strip() or "auto")
    for key, option in (("device_memory", "device memory"), ("host_memory", "host memory")):
        text = values[key].strip()
        kwargs[key] = parse_bytes(text, option) if text else None
    try:
        kwargs["extra"] = shlex.split(values["options"])
    except ValueError as exc:
        raise UserError(f"more options: {exc}") from None
    if any(opt in kwargs["extra"] for opt in ("--out", "--model", "--data", "--tokens")):
        raise UserError("more options: --out, --model, --data and --tokens have their own fields")
    from ffnscope.app.parser import check_record_options

    try:  # refused here, in place, rather than by the job a moment later
        check_record_options(kwargs["extra"])
    except UserError as exc:
        raise UserError(f"more options: {exc}") from None
    return kwargs


class RecordFormScreen(FramedScreen):
    HELP_TITLE = "New recording"
    BINDINGS = [Binding("escape", "back", "cancel"), Binding("ctrl+s", "start", "start")]
    EXTRA_HELP = [("tab / shift+tab", "next / previous field"), ("enter", "next field; on the last one, start")]
    DEFAULT_CSS = FramedScreen.DEFAULT_CSS + """
    RecordFormScreen VerticalScroll { height: 1fr; padding: 0 1; }
    RecordFormScreen .field { height: 1; }
    RecordFormScreen .field Label { width: 15; }
    RecordFormScreen .field Input { width: 1fr; border: none; height: 1; padding: 0; }
    RecordFormScreen #estimate { color: $text-muted; height: auto; }
    RecordFormScreen #error { color: $error; height: auto; }
    RecordFormScreen #start-row { height: 3; align-horizontal: right; }
    """

    def compose(self) -> ComposeResult:
        yield from self.frame_top()
        with VerticalScroll():
            for key, label, default, placeholder in FIELDS:
                with Horizontal(classes="field"):
                    yield Label(label)
                    yield Input(default, placeholder=placeholder, id=key)
            yield Static(id="estimate")
            yield Static(id="error")
            with Horizontal(id="start-row"):
                yield Button("Start (ctrl+s)", id="start", variant="primary")
        yield from self.frame_bottom()

    def on_mount(self) -> None:
        self.set_header("ffnscope", "", "Recordings > New recording (runs as a job; esc cancels)")
        self.query_one("#name", Input).focus()
        self.recordings: list | None = None  # the catalog, once read (tests wait on it)
        self.read_catalog()

    @work(thread=True, exclusive=True, group="estimate")
    def read_catalog(self) -> None:
        rows = catalog.scan(getattr(self.app, "files", ()), getattr(self.app, "dirs", None))
        self.app.call_from_thread(self._catalog_read, rows)

    def _catalog_read(self, rows: list) -> None:
        self.recordings = rows
        self.show_estimate()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id in ("model", "tokens", "layers") and self.recordings is not None:
            self.show_estimate()

    def show_estimate(self) -> None:
        """Progress files are small JSON: read again at each keystroke, so a recording that just ended counts."""
        value = {key: self.query_one(f"#{key}", Input).value for key in ("model", "tokens", "layers")}
        speed = estimate.latest_speed(self.recordings or [], value["model"])
        try:
            tokens = int(value["tokens"].replace(",", "").replace("_", ""))
        except ValueError:
            tokens = None
        if speed is None:
            text = "no estimate yet: no complete recording of this model with a measured speed"
        else:
            depth = estimate.layers_run(value["layers"], speed.model_layers)
            text = estimate.describe(tokens, speed, layers_run=depth)
            text = f"estimate: {text}, recording alone" if text else ""
        self.query_one("#estimate", Static).update(Text(printable(text)))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == FIELDS[-1][0]:
            self.action_start()
        else:
            self.focus_next()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_start()

    def action_start(self) -> None:
        values = {key: self.query_one(f"#{key}", Input).value for key, *_ in FIELDS}
        try:
            job = jobs.start_record(**check(values))
        except UserError as exc:
            self.query_one("#error", Static).update(Text(printable(str(exc))))
            return
        self.app.started_jobs.add(job.output)
        self.app.notify(printable(f"recording {job.output.name} started (pid {job.pid})"), markup=False)
        self.app.pop_screen()

    def action_back(self) -> None:
        self.app.pop_screen()
