"""Jobs: recordings and analyses run as separate processes that outlive whoever started them.

A job is `python -m ffnscope record|analyze ...` in a new session (no SIGHUP when the terminal or
the SSH connection goes), stdin from /dev/null, stdout and stderr appended to `<output>.log`. What
it is doing is in its progress file, `<output>.progress.json` (engine.jobs.progress), which is the one
place other processes (the TUI, `ffnscope jobs`) read; a `Job` is a snapshot of that file.

Light on purpose: nothing here imports torch, so listing jobs is instant.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ffnscope.cache import atomic
from ffnscope.cache.errors import UserError
from ffnscope.engine.paths import unique_paths, user_cache_dir
from ffnscope.engine.jobs.progress import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    PROGRESS_SUFFIX,
    RUNNING,
    STATUSES,
    STOPPED,
    one_line,
    own_progress,
    progress_path,
    read_progress,
)

KINDS = ("record", "analyze", "npl")

# processes started by this process: polled so that finished ones are reaped, not left as zombies
_children: dict[int, subprocess.Popen] = {}


@dataclass
class Job:
    """A snapshot of one job's progress file."""
    output: Path                  # the cache the job writes (record) or analyses (analyze)
    kind: str                     # "record" or "analyze"
    pid: int | None
    status: str                   # running, stopped, failed, complete or interrupted
    phase: str                    # starting, loading model, packing data, calibrating, recording,
                                  # checkpoint, analyzing
    tokens_done: int | None = None
    tokens_total: int | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None    # seconds left, as of `updated`
    message: str = ""             # one line: why it stopped or failed, or what it produced
    started: float | None = None  # epoch seconds
    updated: float | None = None  # epoch seconds of the last write
    analysis: str | None = None   # while analyzing: the analysis under way (dead, ngrams, ...)
    shard: int | None = None
    n_shards: int | None = None
    layer: int | None = None
    n_layers: int | None = None
    command: list[str] = field(default_factory=list)  # the job's argv (argv[0] is the program)
    cwd: str | None = None
    progress_file: Path | None = None
    log: Path | None = None       # where the job's stdout and stderr go

    @property
    def active(self) -> bool:
        return self.status == RUNNING

    @property
    def fraction(self) -> float | None:
        """Done fraction of the recording, 0..1, when known."""
        if self.tokens_done is None or not self.tokens_total:
            return None
        return min(1.0, max(0.0, self.tokens_done / self.tokens_total))

    @property
    def activity(self) -> str:
        """The phase in words: 'recording shard 2/5', 'analyzing ngrams'."""
        if self.phase == "analyzing" and self.analysis:
            return f"analyzing {self.analysis}"
        if self.phase == "recording" and self.shard and self.n_shards:
            return f"recording shard {self.shard}/{self.n_shards}"
        return self.phase

    def refreshed(self) -> "Job":
        """The job as its progress file says now (itself if the file is gone)."""
        return read_job(self.output) or self


def log_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".log")


def _output_of(progress_file: Path) -> Path:
    return progress_file.with_name(progress_file.name[: -len(PROGRESS_SUFFIX)])


# --- reading --------------------------------------------------------------------------------------
def _kind_of(command: list[str]) -> str:
    for arg in command[1:]:
        if arg in KINDS:
            return arg
    return "record"


def process_alive(pid: int | None, command: list[str] | None = None) -> bool:
    """Whether `pid` is still the job (cache.atomic.process_alive: live, no zombie, and running the
    job's `command`, so a reused pid is not taken for it). A child of this process that has ended is
    reaped first, or it would stay a zombie."""
    child = _children.get(pid) if pid else None
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)
        return False
    return atomic.process_alive(pid, command)


def _num(value, kind):
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None


def job_from_progress(progress: dict, progress_file: Path) -> Job:
    command = [str(a) for a in progress.get("command") or []]
    pid = _num(progress.get("pid"), int)
    status = str(progress.get("status") or RUNNING)
    if status == RUNNING and not process_alive(pid, command):
        # the file was read before the process was found gone: it may have written its final status
        # in between (a stop, a failure), so read it once more before calling it interrupted
        again = read_progress(_output_of(progress_file))
        if isinstance(again, dict) and again.get("pid") == progress.get("pid") and again.get("status") != RUNNING:
            return job_from_progress(again, progress_file)
        status = INTERRUPTED
    output = _output_of(progress_file)
    message = str(progress.get("message") or "")
    if status == INTERRUPTED and not message:
        message = "the job's process ended without finishing (killed, crashed or the machine restarted)"
    return Job(
        output=output, kind=_kind_of(command), pid=pid, status=status,
        phase=str(progress.get("phase") or ""), tokens_done=_num(progress.get("tokens_done"), int),
        tokens_total=_num(progress.get("tokens_total"), int),
        tokens_per_s=_num(progress.get("tokens_per_s"), float), eta_s=_num(progress.get("eta_s"), float),
        message=message, started=_num(progress.get("started"), float),
        updated=_num(progress.get("updated"), float), analysis=progress.get("analysis"),
        shard=_num(progress.get("shard"), int), n_shards=_num(progress.get("n_shards"), int),
        layer=_num(progress.get("layer"), int), n_layers=_num(progress.get("n_layers"), int),
        command=command, cwd=progress.get("cwd"), progress_file=progress_file, log=log_path(output))


def read_job(output: Path) -> Job | None:
    """The job whose progress file sits beside `output`, or None."""
    progress = read_progress(output)
    if not isinstance(progress, dict):
        return None
    return job_from_progress(progress, progress_path(output))


def list_jobs(dirs: Iterable[Path] = (), files: Iterable[Path] = ()) -> list[Job]:
    """Jobs of every progress file in `dirs` (not recursive) and in the recordings directory, and of
    those beside `files`. Running jobs first, then the most recently updated."""
    candidates: list[Path] = []
    for directory in [user_cache_dir() / "recordings", *map(Path, dirs)]:
        try:
            candidates += sorted(p for p in directory.iterdir() if p.name.endswith(PROGRESS_SUFFIX))
        except OSError:
            continue
    candidates += [progress_path(Path(f)) for f in files]
    jobs = [job for job in (read_job(_output_of(c)) for c in unique_paths(candidates)) if job is not None]
    jobs.sort(key=lambda j: (j.status != RUNNING, -(j.updated or 0.0)))
    return jobs


# --- starting -------------------------------------------------------------------------------------
def _launch(output: Path, args: list[str], env: dict | None = None, cwd: str | None = None) -> Job:
    """Start `python -m ffnscope ARGS` as a job writing `output`, and write its first progress file."""
    output = Path(output)
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cwd = cwd if cwd and Path(cwd).is_dir() else None
    log = log_path(output)
    try:  # never through a symlink, nor into a hard link of someone's file
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        log_file = open(os.open(log, flags, 0o666), "ab")
    except OSError as exc:
        raise UserError(f"cannot write the job log {log} ({exc.strerror or exc}); choose a writable place") from None
    if not atomic.sole_file(os.fstat(log_file.fileno())):
        log_file.close()
        raise UserError(f"{log} is not ffnscope's job log (another name of a file, or not a file); remove it, then "
                        "start the job again")
    path = progress_path(output)
    with log_file:
        # the job writes its own progress file as soon as it can, and the launcher's never replaces it: the
        # previous job's (not running: the callers checked) goes before the job starts, then this one is
        # created where the job's is not yet
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(f"cannot replace the progress file {path} ({exc.strerror or exc}); choose a "
                            "writable place") from None
        log_file.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} ffnscope {' '.join(args)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen([sys.executable, "-m", "ffnscope", *args], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=env, cwd=cwd)
    _children[proc.pid] = proc
    # until the job's own (it imports torch first), and if it fails before writing one, this one says what
    # was started
    now = time.time()
    first = {"pid": proc.pid, "status": RUNNING, "output": str(output), "command": ["ffnscope", *args],
             "started": now, "updated": now, "phase": "starting", "cwd": cwd or os.getcwd()}
    atomic.create_text(path, json.dumps(first), f"cannot write the progress file {path}")
    return read_job(output) or job_from_progress(first, path)


def _check_free(output: Path) -> None:
    job = read_job(output)
    if job is not None and job.status == RUNNING:
        raise UserError(f"another ffnscope job (pid {job.pid}) is working on {output}; wait for it or cancel it")


def start_record(out: Path, *, model: str = "default", data: Iterable[str] = ("builtin",),
                 tokens: int = 1_000_000, layers: str | None = None, device: str = "auto",
                 device_memory: str | int | None = None, host_memory: str | int | None = None,
                 seq_len: int | None = None, extra: Iterable[str] = (), analyze: bool = True,
                 force: bool = False, env: dict | None = None) -> Job:
    """Start `ffnscope record ... --out OUT --quiet [--analyze]` as a job. `extra` are more record
    options as command-line strings (like ["--tau", "0.5", "--shard-tokens", "65536"]). Raises
    UserError at once for what the job would refuse: a job already on OUT, an existing OUT without
    `force`, a missing output directory."""
    out = Path(out).absolute()
    extra = [str(a) for a in extra]
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    _check_free(out)
    if out.exists() and not force and "--force" not in extra and "--resume" not in extra:
        raise UserError(f"{out} exists; resume its job, or start with force to record it again")
    data = [str(Path(d).absolute()) if d != "builtin" and Path(d).exists() else str(d) for d in data]
    args = ["record", "--model", _model_arg(model), "--data", *data, "--tokens", str(int(tokens)),
            "--out", str(out), "--device", device]
    if layers:
        args += ["--layers", str(layers)]
    if device_memory is not None:
        args += ["--device-memory", str(device_memory)]
    if host_memory is not None:
        args += ["--host-memory", str(host_memory)]
    if seq_len is not None:
        args += ["--seq-len", str(int(seq_len))]
    if force and "--force" not in extra:
        args.append("--force")
    args += extra
    args.append("--quiet")
    if analyze:
        args.append("--analyze")
    return _launch(out, args, env)


def _model_arg(model: str) -> str:
    """A model directory or file given relative to here becomes absolute (the job may run elsewhere);
    'default' and hub ids stay as they are."""
    path = Path(model)
    return str(path.absolute()) if model != "default" and path.exists() else model


def start_analyze(cache: Path, *, only: Iterable[str] | None = None, settings: Iterable[str] = (),
                  env: dict | None = None) -> Job:
    """Start `ffnscope analyze CACHE` as a job (only what is missing or stale is computed)."""
    cache = Path(cache).absolute()
    if not cache.is_file():
        raise UserError(f"cache not found: {cache}")
    _check_free(cache)
    args = ["analyze", str(cache)]
    if only:
        args += ["--only", *only]
    settings = list(settings)
    if settings:
        args += ["--set", *settings]
    return _launch(cache, args, env)


def start_npl(cache: Path, action: str, options: Iterable[str] = (), env: dict | None = None) -> Job:
    """Start `ffnscope npl ACTION CACHE OPTIONS` (fit, substitute, functional) as a job; it writes the
    sidecar CACHE.npl.h5 and keeps its progress file beside it."""
    from ffnscope.cache.npl_store import sidecar_path

    if action not in ("fit", "substitute", "functional"):
        raise UserError(f"unknown NPL job '{action}'; use fit, substitute or functional")
    cache = Path(cache).absolute()
    if not cache.is_file():
        raise UserError(f"cache not found: {cache}")
    out = sidecar_path(cache)
    _check_free(out)
    return _launch(out, ["npl", action, str(cache), *map(str, options), "--quiet"], env)


# --- stopping and resuming ------------------------------------------------------------------------
def cancel(job: Job, sig: int = signal.SIGINT) -> bool:
    """Ask a running job to stop: SIGINT (the recorder stops at its next batch, keeps its last
    checkpoint and says "stopped"). Signals only when the progress file still says running and its
    process is alive and still the job's (not a reused pid). -> whether a signal was sent."""
    now = read_job(job.output)
    if now is None or now.status != RUNNING or not now.pid:
        return False
    try:
        os.kill(now.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_after_shard(job: Job) -> bool:
    """Ask a running recording to stop once its current shard is checkpointed (SIGUSR1, which every
    ffnscope process handles: engine.jobs.stop). -> whether the signal was sent."""
    return job.kind == "record" and cancel(job, signal.SIGUSR1)


def cache_status(path: Path) -> str | None:
    """cache.schema's COMPLETE or PARTIAL for a readable cache, None otherwise (no torch: h5py
    attributes only; cache.schema and h5py are imported here, not with this module, which lists jobs)."""
    if not path.is_file():
        return None
    try:
        from ffnscope.cache.reader import CacheReader

        with CacheReader(path) as reader:
            return reader.status
    except (UserError, OSError, KeyError):
        return None


def resume(job: Job, env: dict | None = None) -> Job:
    """Start a stopped, failed or interrupted job again: a recording with --resume (and without
    --force) continues from its last checkpoint; a recording stopped after it was complete, during its
    analyses, gets an analyze job; an analyze job runs again (it redoes only what is missing)."""
    job = job.refreshed()
    if job.status == RUNNING:
        raise UserError(f"the job on {job.output} is still running (pid {job.pid})")
    if job.status == COMPLETE:
        raise UserError(f"the job on {job.output} is complete; nothing to resume")
    how, args = continuation(job)
    if how == "analyze" and job.kind == "record":
        return start_analyze(job.output, env=env)
    if how == "complete":
        raise UserError(f"{job.output} is already complete; nothing to resume")
    if not args:
        raise UserError(f"the progress file of {job.output} does not say which command to resume")
    return _launch(job.output, args, env, job.cwd)


def continuation(job: Job) -> tuple[str, list[str]]:
    """How an ended job goes on, as (how, its arguments after the program): an npl job runs again ("again");
    an analyze job too ("analyze": it redoes only what is missing); a recording continues from its checkpoint
    ("resume", --resume: a partial cache), runs its analyses when complete ("analyze", if it had --analyze;
    else "complete", nothing to do), or starts again ("again"; --force over a broken leftover). A recording
    killed before its first checkpoint (loading, packing, calibrating) has nothing to resume."""
    args = list(job.command[1:])
    if job.kind == "npl":  # all-or-nothing jobs
        return "again", args
    if job.kind == "analyze":
        return "analyze", args or ["analyze", str(job.output)]
    if not args:
        return "again", args
    from ffnscope.cache import schema

    status = cache_status(job.output)
    if status == schema.COMPLETE:
        return ("analyze", ["analyze", str(job.output)]) if "--analyze" in args else ("complete", [])
    args = [a for a in args if a not in ("--force", "--resume")]
    if status == schema.PARTIAL:
        return "resume", args + ["--resume"]
    return "again", args + (["--force"] if job.output.exists() else [])  # a leftover no checkpoint reads


def next_step(job: Job) -> str:
    """What to run for a stopped or interrupted job, in words with the command ('' for the others):
    `ffnscope jobs` shows it under the job."""
    if job.status not in (STOPPED, INTERRUPTED):
        return ""
    import shlex

    how, args = continuation(job)
    command = shlex.join(["ffnscope", *args])
    if job.cwd and os.path.realpath(job.cwd) != os.path.realpath(os.getcwd()):  # its paths may be relative to it
        command = f"cd {shlex.quote(job.cwd)} && {command}"
    if how == "resume":
        return f"resume it from its last checkpoint: {command}"
    if how == "analyze":
        return f"{'the recording is complete; ' if job.kind == 'record' else ''}analyze it: {command}"
    if how == "complete":
        return ""
    if not args:
        return "its progress file does not say which command started it"
    first = "no checkpoint was written, so nothing can be resumed; " if job.kind == "record" else ""
    return f"{first}start it again: {command}"


# --- dismissing ------------------------------------------------------------------------------------
CLEANED = (COMPLETE, FAILED)  # what `ffnscope jobs --clean` dismisses; stopped and interrupted jobs
                              # keep their progress file, which holds the command that resumes them


def dismiss(job: Job) -> Path:
    """Forget an ended job: its progress file goes (the cache and the job's log stay), so it leaves
    `ffnscope jobs` and the recordings screen. A running job is refused. -> the removed file."""
    now = job.refreshed()
    if now.status == RUNNING:
        raise UserError(f"the job on {now.output} is still running (pid {now.pid}); cancel it first")
    path = progress_path(now.output)
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"cannot remove {path} ({exc.strerror or exc})") from None
    return path


def kept_work(job: Job) -> str:
    """What a recording job that is stopped now keeps, in words (for the message of a cancel)."""
    if job.kind != "record":
        return "an NPL job writes nothing until it ends; run it again later" if job.kind == "npl" else \
            "finished analyses stay stored; analyze again to do the rest"
    if job.phase in ("analyzing", "done"):
        return "the recording is complete; only its analyses stop"
    from ffnscope.cache import schema
    from ffnscope.cache.reader import CacheReader

    done = 0
    if cache_status(job.output) == schema.PARTIAL:  # the checkpoint on disk, not the shard under way
        try:
            with CacheReader(job.output) as reader:
                done = reader.shards_done
        except (UserError, OSError, KeyError):
            done = 0
    if done and job.n_shards:
        return f"it keeps {done} of {job.n_shards} shards (its last checkpoint); r resumes from there"
    return "no shard is finished yet, so nothing is kept; r starts it again"


def wait(job: Job, timeout: float | None = None, poll: float = 0.2) -> Job:
    """Poll a job until it is no longer running (or `timeout` seconds pass); -> its last snapshot."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = job.refreshed()
        if job.status != RUNNING or (deadline is not None and time.monotonic() >= deadline):
            return job
        time.sleep(poll)


def fail_if_own(output: Path, message: str, status: str = FAILED) -> None:
    """Inside a job: mark its progress file failed (or stopped, for a signal) when the job ends before
    its own code got to it (a refused --out, a bad option), so it does not show as running or interrupted."""
    progress = read_progress(output)
    if not own_progress(progress):
        return
    progress.update(status=status, message=one_line(message), updated=time.time())
    try:
        atomic.write_text(progress_path(output), json.dumps(progress))
    except UserError:  # a full disk: the job's own one line says why it ended
        pass


__all__ = ["Job", "INTERRUPTED", "STATUSES", "RUNNING", "STOPPED", "FAILED", "COMPLETE",
           "log_path", "list_jobs", "read_job", "start_record", "start_analyze", "cancel", "resume", "wait",
           "process_alive", "fail_if_own", "continuation", "next_step"]
