"""NPL: a recording's Neuron Predictability Lens results (the fitted maps and the paper's averages,
the layer-pair grid as a heatmap, Table 1, functional and background neurons), and the jobs that
make them: fit, substitute, functional. Jobs run as processes (engine.jobs.launcher); this screen follows
their progress file and reloads what they wrote. The dialogs that start them estimate their duration
from the recording's measured speed (engine.explore.estimate)."""
from __future__ import annotations

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Input, Static

from ffnscope.app.npl_text import fit_text, heatmap, results_text
from ffnscope.app.safe_text import printable
from ffnscope.app.tui.base import HELP_KEY, FramedScreen
from ffnscope.app.tui.cells import duration
from ffnscope.app.tui.modals import AskScreen, ChooseScreen, ConfirmScreen
from ffnscope.app.tui.recording import OpenRecording
from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import sidecar_path
from ffnscope.engine.explore import estimate
from ffnscope.engine.jobs import launcher as jobs
from ffnscope.engine.npl.overview import NplOverview, overview
from ffnscope.engine.npl.report import heldout_line

HINTS = {"fit": "f fits them (a job)", "substitute": "s runs it (a job)", "functional": "u finds them (a job)"}
FITS = [("adjacent|exact", "adjacent pairs j-1 -> j, exact fit (what substitution needs)"),
        ("adjacent|both", "adjacent pairs, exact fit and the paper's Adagrad recipe, compared"),
        ("adjacent,grid:4|exact", "adjacent pairs plus every 4th layer's grid (forward, backward, self)"),
        ("grid|exact", "every 2nd layer's grid: forward, backward and self maps (the paper's grid)")]
METRICS = ("token_l2", "mean_pearson", "fvu")


def _tokens_error(text: str) -> str | None:
    try:
        return None if int(text.replace(",", "").replace("_", "")) > 0 else "a positive number"
    except ValueError:
        return "write a whole number of tokens, like 131072"


def _tokens(text: str) -> int | None:
    return None if _tokens_error(text) else int(text.replace(",", "").replace("_", ""))


class TokensScreen(AskScreen):
    """AskScreen for a token count, with the job's estimated duration under the input, kept current."""

    def __init__(self, prompt: str, value: str, check, speed: estimate.Speed | None, work: float):
        super().__init__(prompt, value, check=check)
        self.speed, self.work = speed, work

    def on_mount(self) -> None:
        error = self.query_one(".error")
        error.parent.mount(Static(self._estimate(self.value), classes="estimate"), before=error)

    def _estimate(self, text: str) -> Text:
        return Text(printable(estimate.describe(_tokens(text), self.speed, self.work, rough=True)))

    def on_input_changed(self, event: Input.Changed) -> None:
        for line in self.query(".estimate"):
            line.update(self._estimate(event.value))


class NplScreen(FramedScreen):
    HELP_TITLE = "NPL: layer-to-layer maps, substitution perplexity, background neurons"
    BINDINGS = FramedScreen.BINDINGS + [
        Binding("f", "fit", "fit", tooltip="fit the layer-to-layer maps (a job)"),
        Binding("s", "substitute", "substitute", tooltip="substitution perplexity, Table 1 (a job)"),
        Binding("u", "functional", "background", tooltip="functional and background neurons (a job)"),
        Binding("x", "cancel", "cancel job", tooltip="cancel the NPL job running on this recording"),
        Binding("g", "metric", "grid metric", tooltip="the heatmap's metric: L2 per token, Pearson r, FVU"),
        Binding("M", "method", "maps shown", show=False, tooltip="the heatmap's maps: exact or Adagrad"),
        Binding("j,down", "scroll(2)", "scroll down", show=False), Binding("k,up", "scroll(-2)", "scroll up", show=False),
        Binding("left,h", "side(-8)", "scroll left", show=False),
        Binding("right,l", "side(8)", "scroll right", show=False), HELP_KEY,
    ]
    EXTRA_HELP = [("j k ↑ ↓", "scroll"), ("← → h l", "scroll the wide tables sideways")]
    # the grid and the tables keep their rows on one line each and scroll sideways (← →) when wider
    DEFAULT_CSS = FramedScreen.DEFAULT_CSS + """
    NplScreen VerticalScroll { height: 1fr; padding: 0 1; overflow-x: auto; }
    NplScreen .section { height: auto; margin-bottom: 1; }
    NplScreen .wide { width: auto; min-width: 100%; }
    """

    def __init__(self, rec: OpenRecording):
        super().__init__()
        self.rec = rec
        self.sidecar = sidecar_path(rec.path)
        self.view = NplOverview(self.sidecar)
        self.method: str | None = None
        self.metric = METRICS[0]
        self.job: jobs.Job | None = None
        self.loads = 0  # how many times the results were (re)read (tests wait on it)

    def compose(self) -> ComposeResult:
        yield from self.frame_top()
        yield Static(id="job", classes="status-line")
        with VerticalScroll():
            yield Static(id="fit", classes="section")
            for name in ("grid", "results"):
                yield Static(id=name, classes="section wide")
        yield from self.frame_bottom()

    def on_mount(self) -> None:
        self.set_header(self.rec.title(), self.rec.status, f"Recordings > {self.rec.name} > NPL")
        self.query_one(VerticalScroll).focus()
        self.load()
        self.follow()
        self.set_interval(1.0, self.follow)

    @work(thread=True, exclusive=True, group="npl")
    def load(self) -> None:
        view = overview(self.rec.path, self.rec.meta)
        self.app.call_from_thread(self._show, view)

    def _show(self, view: NplOverview) -> None:
        self.view = view
        if self.method not in view.pairs:
            self.method = "exact" if "exact" in view.pairs else next(iter(view.pairs), None)
        self.query_one("#fit", Static).update(fit_text(view, HINTS))
        self.query_one("#grid", Static).update(_no_wrap(heatmap(view, self.method, self.metric) if self.method
                                                        else Text()))
        self.query_one("#results", Static).update(_no_wrap(results_text(view, HINTS) if view.exists else Text()))
        self.loads += 1

    def follow(self) -> None:
        """The job on the sidecar, if any: its progress on the status line; reload when it ends."""
        before = self.job
        self.job = jobs.read_job(self.sidecar)
        job, line = self.job, Text()
        if job is not None and job.status == jobs.RUNNING:
            rate = f", {job.tokens_per_s:,.0f} tok/s" if job.tokens_per_s else ""
            done = f" {100 * job.fraction:.0f}%" if job.fraction is not None else ""
            eta = f", ETA {duration(job.eta_s)}" if job.eta_s is not None else ""
            line.append(printable(f" {self._job_name(job)}: {job.activity}{done}{rate}{eta} (x cancels)"))
        elif job is not None:
            line.append(printable(f" last job {self._job_name(job)}: {job.status}"
                                  f"{': ' + job.message if job.message else ''}"))
        self.query_one("#job", Static).update(line)
        if before is not None and before.status == jobs.RUNNING and (job is None or job.status != jobs.RUNNING):
            self.load()
            self.app.reload(self.rec.path)  # the neuron table gains the new NPL columns

    @staticmethod
    def _job_name(job: jobs.Job) -> str:
        action = next((a for a in ("fit", "substitute", "functional") if a in job.command), "")
        return f"npl {action}".strip()

    def _start(self, action: str, options: list[str], note: str = "") -> None:
        try:
            job = jobs.start_npl(self.rec.path, action, options)
        except UserError as exc:
            self.app.notify(printable(str(exc)), severity="error", markup=False)
            return
        self.app.started_jobs.add(job.output)
        if note:
            self.app.notify(note, markup=False)
        self.follow()

    def _busy(self) -> bool:
        if self.job is not None and self.job.status == jobs.RUNNING:
            self.app.notify("an NPL job is running on this recording; x cancels it", severity="warning")
            return True
        return False

    # --- actions ----------------------------------------------------------------------------------
    def action_fit(self) -> None:
        if self._busy():
            return

        def chosen(value):
            if value is None:
                return
            pairs, method = value.split("|")

            def sized(tokens):
                if tokens is None:
                    return
                options = ["--pairs", pairs, "--method", method, "--tokens", tokens.replace(",", "")]
                if self.view.exists or self.sidecar.exists():
                    def confirmed(yes):
                        if yes:
                            self._start("fit", options + ["--force"])
                    self.app.push_screen(ConfirmScreen("Replace the fitted maps (and the results made with them)?",
                                                       yes="Replace", no="Keep"), confirmed)
                else:
                    self._start("fit", options)
            self.app.push_screen(TokensScreen("Tokens of the recording's sources to fit on; metrics on the next 16 "
                                              "sequences past the recording's and the fit's",
                                              "131072", _tokens_error, estimate.recording_speed(self.rec.path),
                                              estimate.FIT_WORK), sized)
        self.app.push_screen(ChooseScreen("Fit NPL maps", FITS), chosen)

    def action_substitute(self) -> None:
        if self._busy():
            return
        if not self.view.exists:
            self.app.notify("fit the maps first (f)", severity="warning")
            return
        choices = [("", "Table 1: random (3 seeds), zero, identical, NPL; complete and partial"),
                   ("--finegrained", "Table 1 and the finer-grained grid by neuron halves (Fig. 4)"),
                   ("--explicit", "Table 1 plus explicit-only substitution")]

        def chosen(value):
            if value is not None:
                self._start("substitute", [value] if value else [])
        guess = self._estimate(estimate.SUBSTITUTE_WORK)
        held = heldout_line(self.view.meta.get("fit", {}).get("heldout"), self.view.meta.get("fit", {}).get(
            "heldout_tokens"))
        self.app.push_screen(ChooseScreen("Substitution perplexity on the fit's held-out sequences\n"
                                          + escape(printable(held))
                                          + (f"\nTable 1: {escape(guess)}" if guess else ""), choices), chosen)

    def action_functional(self) -> None:
        if self._busy():
            return
        if not self.view.exists:
            self.app.notify("fit the maps first (f)", severity="warning")
            return
        guess = self._estimate(estimate.FUNCTIONAL_WORK)  # it starts at once (no dialog): the estimate comes with it
        self._start("functional", [], f"npl functional: {guess}" if guess else "")

    def _estimate(self, work: float) -> str:
        """A job over the fit's held-out tokens: its rough duration, or "" when they are not known."""
        held = self.view.meta.get("fit", {}).get("heldout_tokens")
        if isinstance(held, bool) or not isinstance(held, (int, float)) or not held > 0:
            return ""
        return printable(estimate.describe(int(held), estimate.recording_speed(self.rec.path), work, rough=True))

    def action_cancel(self) -> None:
        if self.job is not None and jobs.cancel(self.job):
            self.app.notify("asked the NPL job to stop; it writes nothing when stopped")
        else:
            self.app.notify("no NPL job running", severity="warning")

    def action_metric(self) -> None:
        self.metric = METRICS[(METRICS.index(self.metric) + 1) % len(METRICS)]
        self._show(self.view)

    def action_method(self) -> None:
        methods = list(self.view.pairs)
        if methods:
            self.method = methods[(methods.index(self.method) + 1) % len(methods)] if self.method in methods \
                else methods[0]
            self._show(self.view)

    def action_scroll(self, lines: int) -> None:
        self.query_one(VerticalScroll).scroll_relative(y=lines, animate=False)

    def action_side(self, cells: int) -> None:
        self.query_one(VerticalScroll).scroll_relative(x=cells, animate=False)


def _no_wrap(text: Text) -> Text:
    """Table rows stay whole (the screen scrolls sideways) instead of wrapping at 80 columns."""
    text.no_wrap, text.overflow = True, "ignore"
    return text
