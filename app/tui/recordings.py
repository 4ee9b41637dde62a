"""Recordings: the caches in the user cache directory and those given on the command line, with
the jobs writing them (live progress from their progress files). Start, cancel and resume
recordings; open one, or mark several and compare them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from ffnscope.app.safe_text import printable
from ffnscope.app.tui.base import FramedScreen
from ffnscope.app.tui.cells import duration
from ffnscope.app.tui.table import Column, VirtualTable
from ffnscope.cache.errors import UserError
from ffnscope.engine.explore import catalog
from ffnscope.engine.jobs import launcher as jobs
from ffnscope.engine.paths import recordings_dir

# names elided in the middle: "smollm2-default.h5" and its NPL job's "smollm2-default.h5.npl.h5" differ
COLUMNS = [Column("mark", "", 1, "left"), Column("name", "recording", 0, "left", min=14, elide="middle"),
           Column("model", "model", 12, "left", elide="middle"), Column("tokens", "tokens", 9),
           Column("date", "date", 10, "left"), Column("status", "status", 24, "left")]
REFRESH_S = 1.0


@dataclass
class Row:
    path: Path
    summary: catalog.RecordingSummary | None
    job: jobs.Job | None

    def status(self) -> str:
        job, s = self.job, self.summary
        if job is not None and job.status == jobs.RUNNING:
            if job.phase in ("recording", "checkpoint") and job.fraction is not None:
                rate = f" {job.tokens_per_s:,.0f} tok/s" if job.tokens_per_s else ""
                eta = f" ETA {duration(job.eta_s)}" if job.eta_s is not None else ""
                return f"{100 * job.fraction:.0f}%{rate}{eta}"
            return job.activity
        ended_early = job is not None and job.status in (jobs.STOPPED, jobs.INTERRUPTED, jobs.FAILED)
        # a recording stopped during its own analyses is complete: its row says "not analyzed"
        recorded = s is not None and s.status == catalog.COMPLETE and job is not None and job.kind == "record"
        if ended_early and not (recorded and job.status != jobs.FAILED):
            return job.status + (": r resumes" if job.status != jobs.FAILED else "")
        if s is None:
            return job.status if job is not None else ""
        if s.status == catalog.ERROR:
            return "error"
        if s.status == catalog.COMPLETE:
            return "complete" if s.analyzed else "complete, not analyzed"
        return s.status

    def message(self) -> str:
        """The line under the table: why a row failed, where a job logs."""
        s, job = self.summary, self.job
        if s is not None and s.error:  # the row names the file: its full path would push the reason off screen
            return s.error.replace(str(self.path), self.path.name)
        if job is not None and job.message and job.status != jobs.RUNNING:
            return f"{job.kind} {job.status}: {job.message}"
        if job is not None and job.status == jobs.RUNNING:
            return f"{job.kind} job pid {job.pid}, log {job.log}"
        return str(self.path)


class RecordingsScreen(FramedScreen):
    HELP_TITLE = "Recordings: caches and the jobs writing them"
    BINDINGS = FramedScreen.BINDINGS + [
        Binding("enter", "open", "open"), Binding("n", "new", "new"), Binding("x", "cancel", "cancel job"),
        Binding("r", "resume", "resume"), Binding("A", "analyze", "analyze"), Binding("m", "mark", "mark"),
        Binding("c", "compare", "compare"),
        Binding("d", "dismiss", "dismiss ended job", show=False),
    ]
    EXTRA_HELP = [("j k ↑ ↓", "move")]
    DEFAULT_CSS = FramedScreen.DEFAULT_CSS + "RecordingsScreen #message { height: 2; color: $text-muted; }"

    def __init__(self, files: list[Path], dirs: list[Path] | None):
        super().__init__()
        self.files, self.dirs = files, dirs
        self.rows: list[Row] = []
        self.marked: set[Path] = set()

    def compose(self) -> ComposeResult:
        yield from self.frame_top()
        yield VirtualTable(COLUMNS, id="recordings")
        yield Static(id="message")
        yield from self.frame_bottom()

    def on_mount(self) -> None:
        self.set_header("ffnscope", "", "Recordings")
        self.query_one(VirtualTable).focus()
        self.scanning = self.scan()
        self.set_interval(REFRESH_S, self.rescan)

    def rescan(self) -> None:
        """The periodic scan, skipped while the last one runs (it may be waiting for an open)."""
        if self.scanning.is_finished:
            self.scanning = self.scan()

    @work(thread=True, exclusive=True, group="scan")
    def scan(self) -> None:
        # after the recording being opened: HDF5 runs one call at a time, and the list (each file's metadata,
        # checked) read beside the open made the open wait for it
        while self.app.opening is not None and not self.app.opening.is_finished:
            time.sleep(0.01)
        dirs = self.dirs if self.dirs is not None else [recordings_dir()]
        opened = {rec.path: (rec.reader, rec.mtime[0]) for rec in list(self.app.recordings.values())}
        summaries = catalog.scan(self.files, dirs, opened)  # an open recording is not opened and checked again
        job_list = jobs.list_jobs(dirs, self.files)
        by_path = {j.output.resolve(): j for j in job_list}
        rows = [Row(s.path, s, by_path.pop(s.path.resolve(), None)) for s in summaries]
        rows += [Row(j.output, None, j) for j in by_path.values() if j.status == jobs.RUNNING]
        self.app.call_from_thread(self._show, rows)

    def _show(self, rows: list[Row]) -> None:
        table = self.query_one(VirtualTable)
        current = self.current
        self.rows = rows
        paths = [r.path for r in rows]
        cursor = paths.index(current.path) if current is not None and current.path in paths else None
        table.show(len(rows), self._cell, cursor=cursor)
        self._message()
        self.app.jobs_changed(rows)

    @property
    def current(self) -> Row | None:
        table = self.query_one(VirtualTable)
        return self.rows[table.cursor] if 0 <= table.cursor < len(self.rows) else None

    def _cell(self, i: int, key: str) -> str:
        row = self.rows[i]
        s = row.summary
        if key == "mark":
            return "*" if row.path in self.marked else ""
        if key == "name":
            return printable(row.path.name)
        if key == "model":
            return printable(", ".join(filter(None, (s.model, s.weights)))) if s else ""  # e.g. "…, Q4_1 GGUF"
        if key == "tokens":
            return f"{s.n_tokens:,}" if s and s.n_tokens is not None else ""
        if key == "date":
            return (s.created or "")[:10] if s else time.strftime("%Y-%m-%d", time.localtime(row.job.started or 0))
        if key == "status":
            return printable(row.status())  # a job's phase is read from its progress file
        return ""

    def _message(self) -> None:
        row = self.current
        self.query_one("#message", Static).update(Text(printable(row.message()) if row else
                                                       "no recordings yet: n starts one"))

    def on_virtual_table_moved(self, event: VirtualTable.Moved) -> None:
        self._message()

    def on_virtual_table_chosen(self, event: VirtualTable.Chosen) -> None:
        self.action_open()

    # --- actions ----------------------------------------------------------------------------------
    def action_open(self) -> None:
        row = self.current
        if row is None:
            return
        if row.summary is None or row.summary.status == catalog.ERROR:
            self.app.notify(printable(row.message()), severity="error", markup=False)
            return
        self.app.open_recording(row.path)

    def action_new(self) -> None:
        from ffnscope.app.tui.record_form import RecordFormScreen

        self.app.push_screen(RecordFormScreen())

    def action_cancel(self) -> None:
        row = self.current
        if row is None or row.job is None or row.job.status != jobs.RUNNING:
            self.app.notify("no running job on this row", severity="warning")
            return
        if jobs.cancel(row.job):
            self.app.notify(printable(f"asked {row.path.name} to stop; {jobs.kept_work(row.job)}"), markup=False)
        self.scan()

    def action_resume(self) -> None:
        row = self.current
        if row is None or row.job is None:
            self.app.notify("no job to resume on this row", severity="warning")
            return
        try:
            job = jobs.resume(row.job)
        except UserError as exc:
            self.app.notify(printable(str(exc)), severity="error", markup=False)
            return
        self.app.started_jobs.add(job.output)
        self.scan()

    def action_analyze(self) -> None:
        row = self.current
        if row is not None and row.summary is not None and row.summary.status == catalog.COMPLETE:
            self.app.start_analysis(row.path)
            self.scan()
        else:
            self.app.notify("only a complete recording can be analyzed", severity="warning")

    def action_dismiss(self) -> None:
        """Forget an ended job (its progress file goes; the cache and the log stay)."""
        row = self.current
        if row is None or row.job is None or row.job.status == jobs.RUNNING:
            self.app.notify("no ended job on this row (x cancels a running one)", severity="warning")
            return
        try:
            jobs.dismiss(row.job)
        except UserError as exc:
            self.app.notify(printable(str(exc)), severity="error", markup=False)
            return
        self.app.notify(printable(f"dismissed the {row.job.status} {row.job.kind} job on {row.path.name}"),
                        markup=False)
        self.scan()

    def action_mark(self) -> None:
        row = self.current
        if row is None:
            return
        self.marked.symmetric_difference_update({row.path})
        table = self.query_one(VirtualTable)
        table.refresh()
        table.action_move(1)

    def action_compare(self) -> None:
        paths = [r.path for r in self.rows if r.path in self.marked and r.summary and r.summary.ok]
        if len(paths) < 2:
            self.app.notify("mark two or more recordings with m, then c compares them", severity="warning")
            return
        self.app.compare(paths)
