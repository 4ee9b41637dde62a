"""The `ffnscope` command: `main` and the commands (its options are built in parser.py). Heavy modules
(torch, transformers) are imported only by the commands that need them, so `--help`, `info` and
`merge` start in a blink."""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from ffnscope.app.parser import build_parser
from ffnscope.cache.errors import UserError
from ffnscope.cache import schema


def _resolve_part(args) -> None:
    """--part auto from the launcher's environment and {part} in --out, before the output is locked:
    each process of a split locks and writes its own part's file."""
    import os

    from ffnscope.engine.record.config import auto_part, part_out

    auto = args.part == "auto"
    if auto:
        args.part = auto_part(os.environ)
    args.out = part_out(args.out, args.part, auto=auto)


def cmd_record(args) -> int:
    from ffnscope.app.record_view import run_record

    if not args.analyze:
        return run_record(args)

    def after(_state, progress, lm) -> None:  # the recording is complete; the progress file still says running
        try:  # suppression uses the recorded model as loaded, instead of loading it again
            _run_analyses(args.out, progress, allow_pickle=args.allow_pickle, model=lm)
        except UserError as exc:
            raise UserError(f"the recording in {args.out} is complete, but its analysis failed: {exc}") from None

    return run_record(args, after=after)


@contextmanager
def _sigterm_interrupts():
    """SIGTERM stops an analysis like ctrl-c (so the progress file says stopped, not running)."""
    def handler(_signum, _frame):
        raise KeyboardInterrupt

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_analyses(path: Path, progress, only=None, settings=None, allow_pickle=False,
                  model=None) -> dict[str, str]:
    """engine.analysis.job.analyze with its steps in the progress file: phase "analyzing", and
    "analysis" naming the one under way; `model`: the recorded model, when the caller holds it."""
    from ffnscope.engine.analysis.job import analyze

    from ffnscope.engine.safe_text import printable

    def log(message: str) -> None:
        print(printable(message), file=sys.stderr)
        if message.startswith("analyzing: "):
            progress.update(force=True, phase="analyzing", analysis=message[len("analyzing: "):].strip())

    progress.update(force=True, phase="analyzing", analysis=None)
    with _sigterm_interrupts():
        status = analyze(path, only, settings, log=log, allow_pickle=allow_pickle, model=model)
    progress.update(force=True, analysis=None)
    print("analyses: " + ", ".join(f"{name} {state}" for name, state in status.items()), file=sys.stderr)
    return status


def cmd_info(args) -> int:
    from ffnscope.app.info_view import print_info

    print_info(args.file)
    return 0


def cmd_merge(args) -> int:
    from ffnscope.cache.merge import merge

    _check_out_file(args.out)
    state = merge(args.files, args.out, force=args.force)
    from ffnscope.engine.safe_text import printable

    print(printable(f"merged {len(args.files)} caches into {args.out}: {state.n_tokens} tokens"))
    return 0


def _check_out_file(out: Path) -> None:
    """An --out that can never be written is refused before any input is read."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name (a new file inside it, or another path)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--out {out}: directory {parent} does not exist; create it first")


def cmd_analyze(args) -> int:
    import os
    import time

    from ffnscope.cache.reader import CacheReader
    from ffnscope.engine.jobs.progress import COMPLETE, ProgressFile, running_job

    pid = running_job(args.file)
    if pid is not None:
        raise UserError(f"another ffnscope job (pid {pid}) is working on {args.file}; wait for it or stop it")
    from ffnscope.engine.analysis.job import parse_settings

    settings = parse_settings(args.settings)  # a bad --set gets its one-line error before any file is written
    if args.min_occurrences is not None:  # --min-occurrences N is --set ngrams.min_occurrences=N
        given = settings["ngrams"].get("min_occurrences")
        if given is not None and given != args.min_occurrences:
            raise UserError(f"--min-occurrences {args.min_occurrences} and --set ngrams.min_occurrences={given} "
                            "disagree; give one of them")
        args.settings = [*args.settings, f"ngrams.min_occurrences={args.min_occurrences}"]
    with CacheReader(args.file, "analyzing it") as reader:  # and so do a bad path and a partial cache
        if reader.status != schema.COMPLETE:
            raise UserError(f"{args.file} is a partial recording; finish it with `ffnscope record ... --resume` "
                            "first")
        top, vocab = settings["suppression"].get("top"), reader.provenance.model.vocab_size
        if top is not None and top > vocab:
            raise UserError(f"--set suppression.top={top} is above the model's vocabulary of {vocab:,} tokens; "
                            f"give {vocab} or less")
    start = time.perf_counter()
    try:
        progress = ProgressFile(args.file, args.argv)
    except OSError as exc:
        raise UserError(f"cannot write beside {args.file} ({exc.strerror or exc}); "
                        "analyses are stored in the cache, so its directory must be writable") from None
    with progress.outcome("stopped by signal; run analyze again (it redoes only what is missing)"):
        progress.update(force=True, cwd=os.getcwd())
        status = _run_analyses(args.file, progress, args.only, args.settings, args.allow_pickle)
    done = ", ".join(f"{name} {state}" for name, state in status.items())
    progress.update(phase="done")
    progress.finish(COMPLETE, done)
    from ffnscope.engine.safe_text import printable

    print(printable(f"{args.file}: {done} ({time.perf_counter() - start:.1f} s)"))
    return 0


def cmd_jobs(args) -> int:
    from rich.table import Table

    from ffnscope.app.console import console as make_console
    from ffnscope.app.safe_text import plain, printable
    from ffnscope.engine.jobs.launcher import (CLEANED, PROGRESS_SUFFIX, dismiss, list_jobs, next_step, read_job,
                                               stop_after_shard)
    from ffnscope.engine.jobs.progress import COMPLETE, FAILED, INTERRUPTED, RUNNING, STOPPED
    from ffnscope.engine.paths import user_cache_dir

    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        raise UserError(f"not a directory: {', '.join(missing)}; give directories that hold recordings")

    def job_on(out: Path):
        out = Path(str(out)[: -len(PROGRESS_SUFFIX)]) if str(out).endswith(PROGRESS_SUFFIX) else out
        job = read_job(out)
        if job is None:
            raise UserError(f"no job on {out} (no {out.name}{PROGRESS_SUFFIX} beside it)")
        return job

    if args.stop_after_shard:
        targets = [job_on(out) for out in args.stop_after_shard]
        for job in targets:  # every one checked before any is signalled
            if job.kind != "record":
                raise UserError(f"the job on {job.output} is a {job.kind} job; only a recording stops after a "
                                "shard (stop the others with ctrl-c or `kill -INT PID`)")
            if not job.active:
                raise UserError(f"the recording on {job.output} is not running ({job.status}); nothing to stop")
        for job in targets:
            if not stop_after_shard(job):
                raise UserError(f"the recording on {job.output} ended meanwhile; nothing to stop")
            print(printable(f"asked the recording on {job.output} (pid {job.pid}) to stop after its current "
                            "shard: it writes a checkpoint, then stops; --resume continues from there"))
        return 0
    if args.dismiss:
        targets = []
        for out in args.dismiss:
            job = job_on(out)
            if job.active:
                raise UserError(f"the job on {out} is still running (pid {job.pid}); cancel it first")
            targets.append(job)
        for job in targets:
            dismiss(job)
            print(printable(f"dismissed the {job.status} {job.kind} job on {job.output}"))
        return 0
    jobs = list_jobs(args.dirs)
    if args.clean:
        gone = [job for job in jobs if job.status in CLEANED]
        for job in gone:
            dismiss(job)
        print(printable(f"dismissed {len(gone)} complete or failed job{'' if len(gone) == 1 else 's'}"))
        return 0
    console = make_console()
    width = console.width  # the terminal's; 80 when piped, unless COLUMNS says otherwise
    # a progress file is untrusted (anyone can write one): every string from it goes through plain()
    if not jobs:
        places = ", ".join(str(d) for d in [user_cache_dir() / "recordings", *args.dirs])
        console.print(plain(f"no jobs in {places}"), highlight=False)
        return 0
    colours = {RUNNING: "cyan", COMPLETE: "green", FAILED: "red", INTERRUPTED: "yellow", STOPPED: "yellow"}
    rows, notes = [], []
    for job in jobs:
        tokens = "" if job.tokens_done is None else (
            f"{job.tokens_done:,}/{job.tokens_total:,}" if job.tokens_total else f"{job.tokens_done:,}")
        rate = f"{job.tokens_per_s:,.0f}" if job.tokens_per_s and job.active else ""
        state = printable(job.activity if job.active else job.status)
        state = state if len(state) <= 24 else state[:23] + "…"
        live = (_eta(job), str(job.pid or "")) if job.active else ("", "")
        rows.append((job, state, tokens, rate, *live))
        if job.message and not job.active:
            during = f" during {job.phase}" if job.phase and job.status != COMPLETE else ""
            notes.append((job.output.name, f"{job.kind} {job.status}{during}: {job.message}", next_step(job)))
    headers = ("job", "state", "tokens", "tok/s", "ETA", "pid")
    fixed = [max([len(headers[c])] + [len(r[c]) for r in rows]) for c in range(1, 6)]
    name_width = max(12, width - sum(fixed) - 2 * 5)  # two spaces between columns
    groups: dict[Path, list] = {}
    for row in rows:
        groups.setdefault(row[0].output.parent, []).append(row)
    for directory, members in groups.items():
        console.print(plain(f"in {_middle(_shown_path(directory) or '.', width - 3)}", "bold"), highlight=False)
        table = Table(box=None, header_style="bold", padding=(0, 2, 0, 0), pad_edge=False, show_edge=False)
        table.add_column("job", no_wrap=True, width=name_width)
        for header, justify in zip(headers[1:], ("left", "right", "right", "right", "right")):
            table.add_column(header, justify=justify, no_wrap=True)
        for job, state, tokens, rate, eta, pid in members:
            table.add_row(plain(_middle(printable(job.output.name), name_width)),
                          plain(state, colours.get(job.status, "white")), tokens, rate, eta, pid)
        console.print(table, width=width)
    for name, note, step in notes:  # one line each: the name is cut in the middle to fit, the message never wrapped
        console.print(plain(f"{_middle(name, max(12, width - len(note) - 2))}: {note}"), highlight=False, style="dim")
        if step:  # a command to copy: one line, however long
            console.print(plain(f"  {step}"), highlight=False, soft_wrap=True)
    return 0


def _middle(text: str, width: int) -> str:
    """Elided in the middle when longer than `width` ("smollm2-…lt.h5.npl.h5"): files that share a
    prefix or a suffix stay distinguishable."""
    if len(text) <= width or width < 5:
        return text
    tail = (width - 1) // 2
    return text[: width - 1 - tail] + "…" + text[len(text) - tail:]


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _eta(job) -> str:
    import time

    if job.eta_s is None:
        return ""
    left = max(0.0, job.eta_s - (time.time() - job.updated) if job.updated else job.eta_s)
    hours, rest = divmod(int(round(left)), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def cmd_export(args) -> int:
    from ffnscope.app.export_view import run_export

    _check_out_file(args.out)
    return run_export(args)


def cmd_report(args) -> int:
    from ffnscope.app.report_view import print_report

    print_report(args.files, position_plots=args.position_plots)
    return 0


def cmd_npl(args) -> int:
    from ffnscope.app.npl_view import run

    return run(args)


def cmd_tui(args) -> int:
    if args.tokens <= 0:
        raise UserError("--tokens must be positive")
    missing = [str(f) for f in args.files if not f.exists()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}; give recording caches (.h5)")
    from ffnscope.app.tui.app import FFNScopeApp

    FFNScopeApp(args.files, main_job=args.start_default, main_tokens=args.tokens).run()
    return 0


def cmd_reproduce(args) -> int:
    from ffnscope.app.reproduce_view import run_reproduce

    return run_reproduce(args)


COMMANDS = {"record": cmd_record, "info": cmd_info, "analyze": cmd_analyze, "export": cmd_export,
            "report": cmd_report, "merge": cmd_merge, "jobs": cmd_jobs, "tui": cmd_tui,
            "npl": cmd_npl, "reproduce": cmd_reproduce}


def _job_output(args) -> Path | None:
    """The file a record, analyze or npl job works on (its progress file sits beside it)."""
    if args.command == "npl" and args.npl_action != "show":
        from ffnscope.cache.npl_store import sidecar_path

        return sidecar_path(args.file)
    return {"record": lambda: args.out, "analyze": lambda: args.file}.get(args.command, lambda: None)()


def _argv_output(argv: list[str]) -> Path | None:
    """The same, from a command line argparse refused."""
    if "--out" in argv[:-1] and "record" in argv:
        return Path(argv[argv.index("--out") + 1])
    if "analyze" in argv[:-1]:
        return Path(argv[argv.index("analyze") + 1])
    for action in ("fit", "substitute", "functional"):
        if "npl" in argv and action in argv[:-1]:
            from ffnscope.cache.npl_store import sidecar_path

            return sidecar_path(Path(argv[argv.index(action) + 1]))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(raw)
    except SystemExit as exc:
        output = _argv_output(raw) if exc.code else None
        if output is not None:  # a job started with a bad option: say so in its progress file
            from ffnscope.engine.jobs.launcher import fail_if_own

            fail_if_own(output, "the command line was refused; see the job's log")
        raise
    if args.command is None:  # plain `ffnscope`: the explorer
        args = parser.parse_args(["tui"])
    args.argv = list(sys.argv) if argv is None else ["ffnscope", *raw]
    _stop_after_shard_on_sigusr1()
    try:
        if args.command == "record":
            _resolve_part(args)
        with _locks(args):  # before any state is read, until the last rename
            _remove_stale_temporaries(args)
            return COMMANDS[args.command](args)
    except UserError as exc:
        from ffnscope.engine.safe_text import printable  # paths and names in a message are untrusted

        print(f"ffnscope: error: {printable(exc)}", file=sys.stderr)
        _fail_own_job(args, str(exc))
        return 2
    except KeyboardInterrupt:
        print("ffnscope: interrupted", file=sys.stderr)
        _fail_own_job(args, "stopped before it started; start it again", stopped=True)
        return 130
    except BaseException as exc:
        _fail_own_job(args, f"{exc.__class__.__name__}: {exc}")
        raise


def _locks(args):
    """One writer per file: the files this command writes locked exclusive, the recordings it only
    reads while writing elsewhere (npl's cache, merge's parts) shared (ffnscope.cache.lock)."""
    from contextlib import nullcontext

    if args.command == "record":
        exclusive, shared = [args.out], []
    elif args.command == "analyze":
        exclusive, shared = [args.file], []
    elif args.command == "merge":
        exclusive, shared = [args.out], [p for p in args.files if Path(p).resolve() != Path(args.out).resolve()]
    elif args.command == "npl" and args.npl_action != "show":
        from ffnscope.cache.npl_store import sidecar_path

        exclusive, shared = [sidecar_path(args.file)], [args.file]
    elif args.command == "reproduce":  # reads both halves; writes into their merge, as analyze does
        exclusive, shared = [args.into] if args.into else [], list(args.files)
    else:
        return nullcontext()
    from ffnscope.cache.lock import locked_all

    return locked_all(exclusive, shared)


def _remove_stale_temporaries(args) -> None:
    """Temporary files that killed writers left go, with one line a place: beside the file this command
    writes and beside the recordings it reads (a recording killed while its hidden states were spilled to
    disk leaves a shard-sized one). Checkpoint segments only beside the output, which this command locked."""
    if args.command not in ("record", "analyze", "merge", "npl", "export", "reproduce"):
        return
    output = _job_output(args) or (getattr(args, "out", None) if args.command in ("merge", "export") else None) \
        or (args.into if args.command == "reproduce" else None)
    places = [output, getattr(args, "file", None), *(getattr(args, "files", None) or [])]
    from ffnscope.cache.atomic import remove_stale_temporaries
    from ffnscope.cache.store import remove_stale_segments, segments_dir
    from ffnscope.engine.paths import unique_paths
    from ffnscope.engine.safe_text import printable

    for place in unique_paths(Path(p) for p in places if p is not None and str(p) != "-"):
        removed = remove_stale_temporaries(place)
        if output is not None and place == Path(output) and remove_stale_segments(place):
            removed.append(segments_dir(place))  # a finished recording's checkpoint segments
        if removed:
            names = ", ".join(p.name for p in removed)
            print(printable(f"ffnscope: removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} "
                            f"that killed writers left beside {place}: {names}"), file=sys.stderr)


def _stop_after_shard_on_sigusr1() -> None:
    """SIGUSR1 (`ffnscope jobs --stop-after-shard`) asks a recording to stop after its current shard, from
    the process's start: by default it would end the process, model loading included."""
    import signal
    import threading

    from ffnscope.engine.jobs.stop import request_after_shard

    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, request_after_shard)


def _fail_own_job(args, message: str, stopped: bool = False) -> None:
    """A job that ends before its own progress handling started (a refused --out, a missing file)
    must not stay 'running' in the progress file its starter wrote."""
    output = _job_output(args)
    if output is not None:
        from ffnscope.engine.jobs.launcher import FAILED, STOPPED, fail_if_own

        fail_if_own(output, message, STOPPED if stopped else FAILED)


if __name__ == "__main__":
    sys.exit(main())
