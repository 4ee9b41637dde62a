"""Option bounds: every numeric option of every command refuses huge, zero, negative, non-finite, non-numeric
and hostile values, and huge layer ranges, with one line naming the option (exit 2, no traceback, no
control character), in the parser or before anything is allocated; a refused command writes nothing (no
progress file, no lock, no cache); a refused --resume leaves the interrupted job's progress file as it was;
`ffnscope jobs` suggests --resume only where a checkpoint exists."""
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tracemalloc
import unicodedata
from pathlib import Path

import pytest

from ffnscope.cache.errors import UserError
from ffnscope.cache.store import read_state
from ffnscope.engine.jobs.progress import progress_path, read_progress
from tests.conftest import env_for_subprocess
from tests.helpers import EVERY_SHARD, record_tiny, start_until_shard

HUGE = "99999999999999999999"
TITLE = "\x1b]0;pwned\x07"         # sets the terminal's title
RED = "\x1b[31m7\x1b[0m"           # colours the rest of the line
HANG_GUARD_S = 120                 # a refusal takes seconds; a range built as a set never ends
MEMORY_CAP = 4 << 30               # address space of each command: a refusal needs a fraction of it

REC = ["record", "--model", "{M}", "--data", "{D}", "--out", "{O}", "--device", "cpu", "--quiet",
       "--tokens", "256", "--seq-len", "32", "--samples", "8"]
COMMON_BAD = ("0", "-1", HUGE, "inf", "nan", "x", TITLE)


def _cases():
    """(id, argv template, the option the one line must name); later options override REC's."""
    cases = []

    def add(command, option, values, needle=None):
        for value in values:
            cases.append((f"{command[0]}{'-' + command[1] if command[0] == 'npl' else ''}{option}={value!r}",
                          [*command, option, value], needle or option))

    record = REC
    add(record, "--tokens", (*COMMON_BAD, "1000000000000"))  # the last: its token streams exceed this machine
    add(record, "--seq-len", ("0", "1", HUGE, "nan", TITLE, "65"))  # 65: above the model's 64 positions
    add(record, "--seed", ("-1", HUGE, "nan", "x"))
    add(record, "--tau", ("inf", "-inf", "nan", "1e39", "x", TITLE))
    add(record, "--tau-rule", ("median-max:inf", "median-max:nan", "median-max:0", "median-max:1e300",
                               "quantile:1", "quantile:nan", "quantile:inf", TITLE))
    add(record, "--layers", (f"0-{HUGE}", HUGE, "4", "3-1", "-1", "", RED))  # the model has 0-3
    add(record, "--ngram-layers", (f"0-{HUGE}", HUGE, "4", RED))
    add(record, "--ngram-max-freq", ("0", "2", "inf", "nan", TITLE))
    add(record, "--calib-tokens", ("0", "-1", HUGE, "nan"))
    add(record, "--topk", ("0", "-1", "1000000000", HUGE, "inf"))
    add(record, "--samples", ("-1", "1000000000", HUGE, "nan"))
    add(record, "--shard-tokens", ("0", "-1", HUGE))
    add(record, "--batch-tokens", ("0", "-1", HUGE))
    add(record, "--device-memory", ("0", "-1", "x", HUGE + "TiB", TITLE))
    add(record, "--host-memory", ("0", "-1", "x", HUGE + "TiB", "1000000TiB"))  # the last: above this machine's
    add(record, "--part", ("0/1", "2/1", "1/0", f"1/{HUGE}", "-1/2"))
    add(record, "--device", ("tpu", TITLE))
    add(record, "--out", ("",))

    analyze = ["analyze", "{C}"]
    add(analyze, "--set", ("min_occurrences=0", "min_occurrences=-1", f"min_occurrences={HUGE}", "min_run=nan",
                           "coverage=inf", "coverage=nan", "coverage=2", f"top={HUGE}", "top=1000000",
                           f"{TITLE}=1", f"top={TITLE}"))
    add(analyze, "--min-occurrences", COMMON_BAD)
    export = ["export", "{C}", "--out", "{O}"]
    add(export, "--layers", (f"0-{HUGE}", HUGE, "9", RED))
    add(["export", "{C}"], "--out", ("",))
    add(["report", "{C}"], "--position-plots", ("-1", HUGE, "nan", "x", TITLE))

    fit = ["npl", "fit", "{C}", "--device", "cpu"]
    add(fit, "--tokens", ("0", "-1", HUGE, "nan"))
    add(fit, "--holdout", ("0", "1", "nan", "inf", TITLE))
    add(fit, "--ridge", ("-1", "inf", "nan", "1e300"))
    add(fit, "--memory", ("0", "x", HUGE + "TiB"))
    add(fit, "--seed", ("-1", HUGE))
    add(fit, "--batch-tokens", ("0", HUGE))
    add(fit, "--device-memory", ("0",))
    add(fit, "--host-memory", ("0", "1000000TiB"))
    add(fit, "--pairs", ("grid:0", f"0:{HUGE}", f"{HUGE}:0", TITLE))
    add(["npl", "fit", "{C}"], "--device", ("tpu",))
    substitute = ["npl", "substitute", "{C}", "--device", "cpu"]
    add(substitute, "--seeds", ("0", "-1", "1000000000", HUGE, "nan"))
    add(substitute, "--tokens", ("0", HUGE))
    add(substitute, "--chunks", ("0", "5", f"1-{HUGE}", RED))
    add(substitute, "--batch-tokens", ("0", HUGE))
    functional = ["npl", "functional", "{C}", "--device", "cpu"]
    add(functional, "--tokens", ("0", HUGE, "nan"))
    add(functional, "--batch-tokens", ("0", HUGE))

    add(["merge", "{C}", "{C}"], "--out", ("",))
    add(["tui"], "--tokens", ("0", HUGE, "nan", TITLE))
    cases.append(("jobs-hostile-dir", ["jobs", "{W}/" + TITLE], "not a directory"))
    cases.append(("jobs-dismiss-hostile", ["jobs", "--dismiss", "{W}/" + RED], "no job"))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, model_dirs, text_file) -> Path:
    path = tmp_path_factory.mktemp("bounds") / "good.h5"
    record_tiny(path, model_dirs["opt"], [text_file])
    return path


def _snapshot(directory: Path) -> dict:
    """Every file and folder below `directory`, hidden ones included (locks, temporaries, segments)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_cli(*args, cwd=None):
    """`ffnscope ARGS` in a subprocess under the hang guard and the memory cap; -> CompletedProcess."""
    try:
        return subprocess.run([sys.executable, "-m", "ffnscope", *map(str, args)], capture_output=True, text=True,
                              env=env_for_subprocess(), timeout=HANG_GUARD_S, preexec_fn=_limit_memory, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: ffnscope {' '.join(map(repr, args))} ran past {HANG_GUARD_S} s")


def assert_one_clean_line(result, needle: str) -> str:
    """Exit 2, one line `ffnscope: error: ...` naming `needle`, no traceback, no control character."""
    err = result.stderr
    assert "Traceback" not in err, err[-1500:]
    assert result.returncode == 2, (result.returncode, err[-1500:])
    controls = sorted({ch for ch in err if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf")})
    assert not controls, f"control characters {controls} in {err!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ffnscope: error: "), err
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_is_refused_in_one_line_writing_nothing(tmp_path, cache, model_dirs, text_file, argv, needle):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(cache, work / "good.h5")
    names = {"M": model_dirs["opt"], "D": text_file, "O": work / "out.h5", "C": work / "good.h5", "W": work}
    before = _snapshot(work)
    result = run_cli(*(part.format(**names) for part in argv), cwd=work)
    assert_one_clean_line(result, needle)
    after = _snapshot(work)
    assert after == before, f"written: {sorted(set(after) ^ set(before))}"


def test_host_memory_check_names_the_largest_setting(tmp_path, model_dirs, text_file, monkeypatch):
    """What a recording would allocate is weighed against the memory available now, before any of it is
    allocated; the refusal names the setting asking for most, and nothing is written."""
    from ffnscope.engine.record import config as config_module
    from ffnscope.engine.record.config import RecordConfig
    from ffnscope.engine.record.job import record

    monkeypatch.setattr(config_module, "available_memory", lambda: 64 << 20)  # 64 MiB free
    out = tmp_path / "big.h5"
    settings = dict(model=str(model_dirs["opt"]), data=[str(text_file)], tokens=256, seq_len=32, device="cpu",
                    samples=8, batch_tokens=64)
    with pytest.raises(UserError, match=r"^--topk 65536 makes this recording allocate about .* lower --topk"):
        record(RecordConfig(out=out, topk=65536, **settings), log=lambda _m: None)
    assert list(tmp_path.iterdir()) == []
    record(RecordConfig(out=out, topk=4, **settings), log=lambda _m: None)  # what fits is recorded
    assert read_state(out, "testing").status == "complete"


# --- progress files -------------------------------------------------------------------------------------
LONG = ["--tokens", "16384", "--seq-len", "32", "--shard-tokens", "512", "--batch-tokens", "64", "--samples", "40",
        "--topk", "4", "--device", "cpu", "--quiet"]


def _record_cmd(model_dir, data, out, *extra, wrapper=EVERY_SHARD):
    return [sys.executable, "-c", wrapper, "record", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), *LONG, *extra]


def _jobs(directory: Path) -> str:
    env = {**env_for_subprocess(), "COLUMNS": "100"}
    shown = subprocess.run([sys.executable, "-m", "ffnscope", "jobs", str(directory)], capture_output=True,
                           text=True, env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def test_refused_resume_leaves_the_interrupted_job_as_it_was(tmp_path, model_dirs, text_file):
    out = tmp_path / "killed.h5"
    proc = start_until_shard(_record_cmd(model_dirs["opt"], text_file, out), out, 3)
    proc.kill()
    proc.communicate(timeout=60)
    # a kill inside a write leaves its temporary, which the next command removes with a line of its own
    # (tests/test_leftovers.py): gone here, so the refusals below are one line whenever the kill lands
    from ffnscope.cache.atomic import remove_stale_temporaries

    remove_stale_temporaries(out)
    assert read_state(out, "testing").status == "partial"
    shown = _jobs(tmp_path)
    assert "interrupted" in shown and "resume it from its last checkpoint: ffnscope record" in shown, shown
    assert "--resume" in shown.split("resume it from its last checkpoint:")[1].splitlines()[0]
    progress = progress_path(out).read_bytes()
    other_data = tmp_path / "other.txt"
    other_data.write_text(Path(text_file).read_text()[::-1])
    for model, data, extra, needle in ((model_dirs["opt"], text_file, ["--tokens", "8192"], "recorded with"),
                                       (model_dirs["opt"], other_data, [], "recorded with"),
                                       (model_dirs["gpt2"], text_file, [], "recorded with")):
        refused = subprocess.run([sys.executable, "-m", "ffnscope", *_record_cmd(model, data, out, *extra)[3:],
                                  "--resume"], capture_output=True, text=True, env=env_for_subprocess(), timeout=300)
        assert_one_clean_line(refused, needle)
        assert progress_path(out).read_bytes() == progress, "the interrupted job's progress file changed"
        assert not (tmp_path / f".{out.name}.lock").exists()
    assert subprocess.run([sys.executable, "-m", "ffnscope", "jobs", "--clean", str(tmp_path)], capture_output=True,
                          env=env_for_subprocess(), timeout=60).returncode == 0
    assert progress_path(out).read_bytes() == progress  # interrupted: kept, its command resumes it


# `python -c KILL_IN_CALIBRATION ARGS...` is `ffnscope ARGS...` killed (SIGKILL) as it calibrates: after every
# up-front check, before the first checkpoint
KILL_IN_CALIBRATION = """import os, runpy, signal, sys
import ffnscope.engine.record.executor as executor
def calibrate(self, tokens):
    os.kill(os.getpid(), signal.SIGKILL)
executor.Recorder.calibrate = calibrate
sys.argv[0] = "ffnscope"
runpy.run_module("ffnscope", run_name="__main__")
"""


# the same, killed as it loads the model: its progress file is there from the start (a model may take minutes
# to load), so `jobs` lists the job while it loads, and says what to do once it is killed there
KILL_IN_LOADING = """import os, runpy, signal, sys
import ffnscope.engine.record.job as job
def load_model(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
job.load_model = load_model
sys.argv[0] = "ffnscope"
runpy.run_module("ffnscope", run_name="__main__")
"""


@pytest.mark.parametrize("wrapper, phase", [(KILL_IN_CALIBRATION, "calibrating"), (KILL_IN_LOADING, "loading model")],
                         ids=["calibrating", "loading"])
def test_jobs_after_a_kill_before_the_first_checkpoint_says_start_again(tmp_path, model_dirs, text_file, wrapper,
                                                                        phase):
    out = tmp_path / "early.h5"
    killed = subprocess.run(_record_cmd(model_dirs["opt"], text_file, out, wrapper=wrapper),
                            capture_output=True, text=True, env=env_for_subprocess(), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_progress(out)["phase"] == phase and not out.exists()
    shown = _jobs(tmp_path)
    assert "interrupted" in shown and "--resume" not in shown, shown
    assert "nothing can be resumed; start it again: ffnscope record --model" in shown, shown
    # and what that says is what the TUI's resume starts
    from ffnscope.engine.jobs import launcher

    assert launcher.continuation(launcher.read_job(out)) == ("again", [a for a in _record_cmd(
        model_dirs["opt"], text_file, out)[3:]])


def test_refused_commands_write_no_progress_file(tmp_path, cache, model_dirs, text_file):
    """Refusals found only once the model is loaded or the data packed: nothing beside --out (or the cache)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dirs["opt"], pickled)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cases = [(["--data", str(empty)], "no text"), (["--host-memory", "1MiB"], "--host-memory"),
             (["--part", "1/9"], "part 1/9"), (["--model", str(pickled)], "pickle")]
    for extra, needle in cases:
        work = tmp_path / "work"
        work.mkdir()
        argv = [a.format(M=model_dirs["opt"], D=text_file, O=work / "out.h5") for a in REC]
        assert_one_clean_line(run_cli(*argv, *extra), needle)
        assert list(work.iterdir()) == [], extra
        work.rmdir()
    work = tmp_path / "npl"
    work.mkdir()
    shutil.copyfile(cache, work / "c.h5")
    assert_one_clean_line(run_cli("npl", "fit", work / "c.h5", "--device", "cpu", "--host-memory", "1MiB", "--quiet"),
                          "--host-memory")
    assert [p.name for p in work.iterdir()] == ["c.h5"]


def test_progress_file_is_never_followed_or_read_whole(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"pid": 1, "status": "running", "command": ["ffnscope", "record"]}')
    linked = tmp_path / "linked.h5"
    progress_path(linked).symlink_to(secret)
    assert read_progress(linked) is None
    planted = tmp_path / "planted.h5"
    with open(progress_path(planted), "wb") as f:  # 1 GiB, sparse: no disk is used
        f.truncate(1 << 30)
    tracemalloc.start()
    try:
        assert read_progress(planted) is None
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(progress_path(fifo))  # opened for reading, a FIFO would wait for a writer forever: in a subprocess
    shown = _jobs(tmp_path)  # under _jobs' timeout
    assert "no jobs" in shown, shown
