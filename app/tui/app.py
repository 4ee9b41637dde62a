"""The ffnscope explorer. Screens: recordings -> layers -> neurons -> neuron detail, compare, and
the recording form. Opening a cache (and building its neuron index) happens in a thread worker;
recordings and analyses are job processes that outlive the app."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterable

from textual import work
from textual.worker import Worker, get_current_worker
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from ffnscope.app.safe_text import printable
from ffnscope.app.tui.modals import ConfirmScreen, HelpScreen
from ffnscope.app.tui.recording import OpenRecording
from ffnscope.app.tui.recordings import RecordingsScreen
from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import SUFFIX as NPL_SUFFIX
from ffnscope.engine.jobs import launcher as jobs
from ffnscope.engine.paths import recordings_dir

DEFAULT_NAME = "smollm2-default.h5"
DEFAULT_TOKENS = 24576  # 12 sequences of 2048: the fewest at which positional neurons can be called at MI 0.05


class FFNScopeApp(App):
    TITLE = "ffnscope"
    BINDINGS = [Binding("f1", "help", "help", show=False), Binding("q", "quit", "quit", show=False),
                Binding("ctrl+q", "quit", "quit", show=False, priority=True)]

    def __init__(self, files: Iterable[Path] = (), dirs: list[Path] | None = None, *, main_job: bool = False,
                 main_model: str = "default", main_tokens: int = DEFAULT_TOKENS, export_dir: Path | None = None):
        """`files`: caches to list (one opens at once); `dirs`: where to look for more (default: the
        recordings directory); `main_job`: open `main_model`'s recording, recording it first."""
        super().__init__()
        self.files = [Path(f).absolute() for f in files]  # jobs report absolute paths
        self.dirs = dirs
        self.main_job = main_job
        self.main_model, self.main_tokens = main_model, main_tokens
        self.export_dir = Path(export_dir) if export_dir else None  # None: beside each recording
        self.started_jobs: set[Path] = set()   # outputs of jobs this app started (asked about on quit)
        self.follow: Path | None = None        # a recording to open as soon as its job is done
        self.recordings: dict[Path, OpenRecording] = {}
        self._open_lock = threading.Lock()
        self.opening: Worker | None = None  # the latest open; the recordings scan waits for it (RecordingsScreen.scan)
        self._jobs_running: set[Path] = set()

    def on_mount(self) -> None:
        self.push_screen(RecordingsScreen(self.files, self.dirs))
        if self.main_job:
            self.start_main_job()
        elif len(self.files) == 1:
            self.open_recording(self.files[0])

    # --- recordings -------------------------------------------------------------------------------
    def start_main_job(self) -> None:
        """Open the default model's recording; record it first if there is none."""
        name = DEFAULT_NAME if self.main_model == "default" else Path(self.main_model).name + ".h5"
        out = recordings_dir() / name
        job = jobs.read_job(out)
        from ffnscope.engine.explore.catalog import summarize

        summary = summarize(out) if out.exists() else None
        if job is not None and job.status == jobs.RUNNING:
            self.follow = out
        elif summary is not None and summary.status == "complete" and summary.analyzed:
            self.open_recording(out)
        else:
            try:
                if job is not None and summary is not None and summary.status == "partial":
                    job = jobs.resume(job)
                elif summary is not None and summary.status == "complete":
                    job = jobs.start_analyze(out)
                else:
                    job = jobs.start_record(out, model=self.main_model, data=["builtin"], tokens=self.main_tokens,
                                            force=out.exists())
            except UserError as exc:
                self.notify(printable(str(exc)), severity="error", markup=False, timeout=10)
                return
            self.started_jobs.add(job.output)
            self.follow = out
            self.notify(printable(f"recording {self.main_model} on the built-in corpus; its layers open when it is "
                                  "done"), markup=False, timeout=8)

    def jobs_changed(self, rows) -> None:
        """Called by the recordings screen after each scan: open a followed recording when its job
        is done, and reload recordings that a job has replaced."""
        running = {r.path for r in rows if r.job is not None and r.job.status == jobs.RUNNING}
        finished = self._jobs_running - running
        self._jobs_running = running
        for row in rows:
            if row.path in finished and row.job is not None and row.job.status == jobs.COMPLETE:
                self.notify(printable(f"{row.path.name}: {row.job.kind} complete"), markup=False)
        if self.follow is not None and self.follow not in running:
            row = next((r for r in rows if r.path == self.follow), None)
            if row is not None and row.summary is not None and row.summary.status == "complete":
                path, self.follow = self.follow, None
                self.open_recording(path)
            elif row is not None and row.job is not None and row.job.status in (jobs.FAILED, jobs.STOPPED,
                                                                                 jobs.INTERRUPTED):
                self.follow = None
        for path in finished:  # an NPL job's output is the sidecar beside its recording
            path = path.with_name(path.name[:-len(NPL_SUFFIX)]) if path.name.endswith(NPL_SUFFIX) else path
            rec = self.recordings.get(path.absolute())
            if rec is not None and rec.stale:
                self.reload(path)

    def open_recording(self, path: Path) -> None:
        self.opening = self._open(path)

    @work(thread=True, exclusive=True, group="open")
    def _open(self, path: Path) -> None:
        path = Path(path)
        try:
            rec = self._get(path)
        except UserError as exc:
            self.call_from_thread(self.notify, printable(str(exc)), severity="error", markup=False, timeout=10)
            return
        from ffnscope.app.tui.layers import LayersScreen

        if not get_current_worker().is_cancelled:  # a second enter while this one loaded: open once
            self.call_from_thread(self.push_screen, LayersScreen(rec))

    def _get(self, path: Path) -> OpenRecording:
        """The open recording of `path`, reopened when a job has replaced the file (worker threads)."""
        path = Path(path).absolute()
        with self._open_lock:
            rec = self.recordings.get(path)
            if rec is None or rec.stale:
                rec = self.recordings[path] = OpenRecording(path)
            return rec

    @work(thread=True, group="open")
    def reload(self, path: Path) -> None:
        """A job replaced an open recording: reopen it and refresh the screens showing it."""
        try:
            rec = self._get(path)
        except UserError:
            return
        self.call_from_thread(self._replace_screens, rec)

    def _replace_screens(self, rec: OpenRecording) -> None:
        """Every screen showing an older opening of this recording shows the new one."""
        rebound = [screen for screen in self.screen_stack
                   if getattr(screen, "rec", None) is not None and screen.rec.path == rec.path and screen.rec is not rec]
        for screen in rebound:
            screen.rebind(rec)
        if rebound:
            self.notify(printable(f"{rec.path.name} reloaded"), markup=False)

    @work(thread=True, group="open")
    def compare(self, paths: list[Path]) -> None:
        try:
            recs = [self._get(p) for p in paths]
        except UserError as exc:
            self.call_from_thread(self.notify, printable(str(exc)), severity="error", markup=False)
            return
        from ffnscope.app.tui.compare import CompareScreen

        self.call_from_thread(self.push_screen, CompareScreen(recs))

    def start_analysis(self, path: Path) -> None:
        try:
            job = jobs.start_analyze(path)
        except UserError as exc:
            self.notify(printable(str(exc)), severity="error", markup=False)
            return
        self.started_jobs.add(job.output)
        self.notify(printable(f"analyzing {Path(path).name} (pid {job.pid})"), markup=False)

    def export_path(self, rec: OpenRecording, suffix: str) -> Path:
        """Where an export of `rec` goes unless the user types another path: the recording's own
        folder (not the current directory), named after it."""
        return (self.export_dir or rec.path.parent) / (rec.path.with_suffix("").name + suffix)

    # --- conventions ------------------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def running_here(self) -> list[Path]:
        return [p for p in self.started_jobs if (job := jobs.read_job(p)) is not None and job.status == jobs.RUNNING]

    async def action_quit(self) -> None:
        running = self.running_here()
        if not running:
            self.exit()
            return
        names = ", ".join(p.name for p in sorted(running))

        def answer(yes: bool | None) -> None:
            if yes:
                self.exit()
        self.push_screen(ConfirmScreen(printable(f"{len(running)} job(s) started here still running ({names}). "
                                                 "They keep running after you quit, and show up again when "
                                                 "ffnscope reopens. Quit?"), yes="Quit", no="Stay"), answer)

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "Keys of this screen (f1)", self.action_help)
        yield SystemCommand("Recordings", "Back to the list of recordings", self.action_recordings)
        yield SystemCommand("New recording", "Start a recording job from a form", self.action_new_recording)
        for name, verb, help_text in (("Export", "export", "Export the table on this screen"),
                                      ("Filter: dead neurons", "dead",
                                       "Cycle dead at the firing rule / never activated (τ=0) / alive / any"),
                                      ("Filter: detectors", "detector", "Token, bigram or trigram detectors"),
                                      ("Filter: positional neurons", "positional", "Positional neurons by type"),
                                      ("Search triggers", "search", "Neurons with a trigger n-gram containing text"),
                                      ("Sort", "sort", "Sort the neuron table"),
                                      ("All neurons", "all", "The neuron table of every layer"),
                                      ("NPL", "npl", "Neuron Predictability Lens: maps, substitution, background"),
                                      ("Filter: background neurons", "background", "NPL background neurons only")):
            if hasattr(screen, f"action_{verb}"):
                yield SystemCommand(name, help_text, getattr(screen, f"action_{verb}"))

    def action_recordings(self) -> None:
        while len(self.screen_stack) > 2:
            self.pop_screen()

    def action_new_recording(self) -> None:
        from ffnscope.app.tui.record_form import RecordFormScreen

        self.push_screen(RecordFormScreen())


def run(files: Iterable[Path] = (), main_job: bool = False) -> int:
    FFNScopeApp(files, main_job=main_job).run()
    return 0
