"""Crafted and damaged caches: every command that reads a cache answers in one line or works, never a
traceback or a hang, and never changes the file it reads.

One valid part cache (part 1 of 2, analysed) is recorded once; each variant is a copy of it with one
thing broken (meta keys removed, types changed, values out of range, datasets deleted or reshaped,
attributes gone, bytes flipped, huge strings). Every variant goes through info, export, report, npl show,
merge (with the good part 2) and analyze, in a driver process that calls `ffnscope.app.cli.main` once
per command with the process's stdout and stderr (file descriptors 1 and 2) captured: one Python start
for all of them. A command that runs past HANG_S, or a driver that dies, fails that variant, and the
rest go on in a fresh driver."""
from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import env_for_subprocess
from tests.helpers import record_tiny

HANG_S = 60  # a hang guard only: each command takes about a second
HUGE = "x" * (20 << 20)  # the 20 MB strings that once made `report` run for minutes
ERROR = "ffnscope: error: "

# the driver: runs every command of every variant in-process, output captured at the file descriptors
# (C libraries and warnings included), one JSON line per command on a descriptor of its own
DRIVER = r"""
import hashlib, json, os, sys, tempfile, traceback
from ffnscope.app.cli import main

report = os.fdopen(os.dup(1), "w")

def captured(argv):
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    sys.stdout.flush(); sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(files[0].fileno(), 1); os.dup2(files[1].fileno(), 2)
    crash = None
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        rc, crash = None, "".join(traceback.format_exception(exc))[-4000:]
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        os.close(saved[0]); os.close(saved[1])
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read().decode("utf-8", "replace"))
        f.close()
    return rc, texts, crash

for name, commands in json.loads(open(sys.argv[1]).read()):  # a file: the jobs are longer than one argument may be
    for argv in commands:
        report.write(json.dumps({"start": name, "argv": argv}) + "\n"); report.flush()
        if argv[0] == "@sha256":
            line = {"variant": name, "argv": argv, "sha256": hashlib.sha256(open(argv[1], "rb").read()).hexdigest()}
        else:
            rc, (out, err), crash = captured(argv)
            line = {"variant": name, "argv": argv, "rc": rc, "stdout": out[:3000], "stdout_len": len(out),
                    "stderr": err[:3000], "stderr_len": len(err), "crash": crash}
        report.write(json.dumps(line) + "\n"); report.flush()
"""


# --- the variants -------------------------------------------------------------------------------
def _meta(edit):
    """A variant that edits the meta dict."""
    def mutate(path: Path) -> None:
        with h5py.File(path, "a") as f:
            meta = json.loads(f.attrs["meta"])
            edit(meta)
            f.attrs["meta"] = json.dumps(meta)
    return mutate


def _meta_text(text):
    def mutate(path: Path) -> None:
        with h5py.File(path, "a") as f:
            f.attrs["meta"] = text
    return mutate


def _pop(section, key=None):
    def edit(meta):
        if key is None:
            del meta[section]
        else:
            del meta[section][key]
    return _meta(edit)


def _set(section, key, value):
    def edit(meta):
        meta[section][key] = value
    return _meta(edit)


def _h5(edit):
    """A variant that edits the HDF5 file itself."""
    def mutate(path: Path) -> None:
        with h5py.File(path, "a") as f:
            edit(f)
    return mutate


def _delete(name):
    return _h5(lambda f: f.__delitem__(name))


def _replace(name, make):
    """Dataset `name` replaced by make(its array)."""
    def edit(f):
        array = f[name][()]
        del f[name]
        f[name] = make(array)
    return _h5(edit)


def _attr(name, key, value):
    def edit(f):
        target = f if name == "/" else f[name]
        if value is None:
            del target.attrs[key]
        else:
            target.attrs[key] = value
    return _h5(edit)


def _set_value(name, index, value):
    def edit(f):
        array = f[name][()]
        array[index] = value
        del f[name]
        f[name] = array
    return _h5(edit)


def _flip(fraction, count=1):
    """Bytes inverted at a fraction of the file's length (`count` of them in a row)."""
    def mutate(path: Path) -> None:
        data = bytearray(path.read_bytes())
        at = min(int(len(data) * fraction), len(data) - count)
        for i in range(at, at + count):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    return mutate


def _flip_at(offset, count=1):
    def mutate(path: Path) -> None:
        data = bytearray(path.read_bytes())
        for i in range(offset, offset + count):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    return mutate


def _flip_after(marker: bytes, offset: int, count: int):
    """Bytes inverted `offset` past the first `marker` in the file: the root's "format" attribute name
    is followed by the reference to its value, which h5py then cannot decode (an OSError on reading)."""
    def mutate(path: Path) -> None:
        data = bytearray(path.read_bytes())
        at = data.find(marker) + offset
        for i in range(at, at + count):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    return mutate


def _truncate(fraction):
    def mutate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return mutate


def _nest(meta):
    meta["model"]["config"]["deep"] = json.loads("[" * 200 + "]" * 200)


def _layer_group_as_dataset(f):
    del f["layers/003"]
    f["layers/003"] = np.zeros(4)


OK, FAILS, EITHER = "ok", "fails", "either"
# a damaged analysis: the views that use it refuse it, analyze computes it again (info, npl and merge may
# not read it at all)
REPAIRED = {"export": FAILS, "report": FAILS, "analyze": OK}
# name -> (mutation, what each command must do: one for all or command -> expectation (EITHER when not
# named), words its error line must hold)
VARIANTS = {
    "unchanged": (lambda path: None, OK, ()),
    "extra meta key": (_meta(lambda m: m.setdefault("extra", {"x": [1, 2]})), OK, ()),
    "long model name": (_set("model", "name", "m" * 3000), OK, ()),
    # 16 MB of meta in strings each within bounds: shown cut, never laid out whole
    "many long sources": (_set("data", "sources", [{"kind": "text", "path": "p" * 8000}] * 2000),
                          {"info": OK, "export": OK, "report": OK, "npl": OK, "analyze": OK}, ()),
    "many long domains": (_set("data", "domain_names", ["d" * 8000] * 256), OK, ()),
    # meta as a whole
    "meta not JSON": (_meta_text("{not json"), FAILS, ("meta",)),
    "meta empty text": (_meta_text(""), FAILS, ("meta",)),
    "meta empty object": (_meta_text("{}"), FAILS, ("meta", "model")),
    "meta a list": (_meta_text("[1, 2]"), FAILS, ("meta",)),
    "meta null": (_meta_text("null"), FAILS, ("meta",)),
    "meta deleted": (_attr("/", "meta", None), FAILS, ("meta",)),
    "meta a number": (_attr("/", "meta", 5), FAILS, ("meta",)),
    "meta bytes not UTF-8": (_attr("/", "meta", np.bytes_(b"\xff\xfe{")), FAILS, ("meta", "UTF-8")),
    "meta opaque": (_attr("/", "meta", np.void(b"\xff\xfe{")), FAILS, ("meta",)),
    "meta nested deep": (_meta_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}"), FAILS, ("meta",)),
    "meta huge": (_meta_text(json.dumps({"pad": HUGE})), FAILS, ("meta",)),
    # sections and keys removed
    "no model": (_pop("model"), FAILS, ("model",)),
    "no tokenizer": (_pop("tokenizer"), FAILS, ("tokenizer",)),
    "no data": (_pop("data"), FAILS, ("data",)),
    "no recording": (_pop("recording"), FAILS, ("recording",)),
    "no n_layers": (_pop("model", "n_layers"), FAILS, ("n_layers",)),
    "no d_ffn": (_pop("model", "d_ffn"), FAILS, ("d_ffn",)),
    "no model name": (_pop("model", "name"), FAILS, ("name",)),
    "no fingerprint": (_pop("model", "fingerprint"), FAILS, ("fingerprint",)),
    "no seq_len": (_pop("data", "seq_len"), FAILS, ("seq_len",)),
    "no taus": (_pop("recording", "taus"), FAILS, ("taus",)),
    "no primary_index": (_pop("recording", "primary_index"), FAILS, ("primary_index",)),
    "no layers": (_pop("recording", "layers"), FAILS, ("layers",)),
    "no ngram_layers": (_pop("recording", "ngram_layers"), FAILS, ("ngram_layers",)),
    "no n_shards": (_pop("recording", "n_shards"), FAILS, ("n_shards",)),
    # types and ranges
    "n_layers a word": (_set("model", "n_layers", "four"), FAILS, ("n_layers",)),
    "n_layers bool": (_set("model", "n_layers", True), FAILS, ("n_layers",)),
    "d_ffn negative": (_set("model", "d_ffn", -64), FAILS, ("d_ffn",)),
    "d_ffn other": (_set("model", "d_ffn", 65), FAILS, ("d_ffn",)),
    "vocab_size other": (_set("model", "vocab_size", 10), FAILS, ("vocab",)),
    "model name a number": (_set("model", "name", 123), FAILS, ("name",)),
    "model name 20 MB": (_set("model", "name", HUGE), FAILS, ("name",)),
    "model spec 20 MB": (_set("model", "spec", HUGE), FAILS, ("spec",)),
    "config string 20 MB": (_meta(lambda m: m["model"]["config"].__setitem__("x", HUGE)), FAILS, ("config",)),
    "config nested deep": (_meta(_nest), FAILS, ("nests deeper",)),
    "firing rule 20 MB": (_set("recording", "firing_rule", HUGE), FAILS, ("firing_rule",)),
    "domain names 20 MB": (_set("data", "domain_names", [HUGE]), FAILS, ("domain_names",)),
    "sources a string": (_set("data", "sources", "text.txt"), FAILS, ("sources",)),
    "sources numbers": (_set("data", "sources", [1, 2]), FAILS, ("sources",)),
    "seq_len zero": (_set("data", "seq_len", 0), FAILS, ("seq_len",)),
    "seq_len other": (_set("data", "seq_len", 33), FAILS, ("seq_len",)),
    "taus empty": (_set("recording", "taus", []), FAILS, ("taus",)),
    "taus words": (_set("recording", "taus", ["a", "b", "c", "d"]), FAILS, ("taus",)),
    "taus NaN": (_set("recording", "taus", [0.0, math.nan, 1.0, 2.0]), FAILS, ("taus",)),
    "taus without 0": (_set("recording", "taus", [0.25, 0.5, 1.0, 2.0]), FAILS, ("taus",)),
    "taus a string": (_set("recording", "taus", "0,0.5,1,2"), FAILS, ("taus",)),
    "taus fewer": (_set("recording", "taus", [0.0, 0.5]), FAILS, ("fire_count",)),
    "primary_index 99": (_set("recording", "primary_index", 99), FAILS, ("primary_index",)),
    "primary_index -1": (_set("recording", "primary_index", -1), FAILS, ("primary_index",)),
    "primary_index text": (_set("recording", "primary_index", "0"), FAILS, ("primary_index",)),
    "primary_tau a word": (_set("recording", "primary_tau", "zero"), FAILS, ("primary_tau",)),
    "primary_tau other": (_set("recording", "primary_tau", 3.0), FAILS, ("primary_tau",)),
    "tau_rule unknown": (_set("recording", "tau_rule", "bogus"), FAILS, ("tau_rule",)),
    "layer_taus a list": (_set("recording", "layer_taus", [1, 2]), FAILS, ("layer_taus",)),
    "layer_taus bad key": (_set("recording", "layer_taus", {"x": 1.0}), FAILS, ("layer_taus",)),
    "layers out of range": (_set("recording", "layers", [0, 1, 2, 99]), FAILS, ("layers",)),
    "layers fewer": (_set("recording", "layers", [0, 1]), FAILS, ("layers",)),
    "layers a string": (_set("recording", "layers", "0-3"), FAILS, ("layers",)),
    "ngram_layers unknown": (_set("recording", "ngram_layers", [7]), FAILS, ("ngram_layers",)),
    "part out of range": (_set("recording", "part", [3, 2]), FAILS, ("part",)),
    "part a string": (_set("recording", "part", "1/2"), FAILS, ("part",)),
    "seq_range short": (_set("recording", "seq_range", [5]), FAILS, ("seq_range",)),
    "ngram_bound a string": (_set("recording", "ngram_bound", "x"), FAILS, ("ngram_bound",)),
    "ngram_bound fires word": (_meta(lambda m: m["recording"]["ngram_bound"].__setitem__("fires", "many")),
                               FAILS, ("ngram_bound",)),
    "ngram_max_freq word": (_set("recording", "ngram_max_freq", "lots"), FAILS, ("ngram_max_freq",)),
    "tokens_per_s word": (_set("recording", "tokens_per_s", "fast"), FAILS, ("tokens_per_s",)),
    "created a number": (_meta(lambda m: m.__setitem__("created", 5)), FAILS, ("created",)),
    # root attributes
    "status deleted": (_attr("/", "status", None), FAILS, ("status",)),
    "status unknown": (_attr("/", "status", "weird"), FAILS, ("status",)),
    "shards_done a word": (_attr("/", "shards_done", "x"), FAILS, ("shards_done",)),
    "schema_version a word": (_attr("/", "schema_version", "two"), FAILS, ("schema",)),
    # datasets deleted, reshaped, retyped
    "no data/tokens": (_delete("data/tokens"), FAILS, ("data/tokens",)),
    "no data/seq_index": (_delete("data/seq_index"), FAILS, ("data/seq_index",)),
    "no data/unigram": (_delete("data/unigram"), FAILS, ("data/unigram",)),
    "no layer group": (_delete("layers/002"), FAILS, ("layers/002",)),
    "no fire_count": (_delete("layers/000/fire_count"), FAILS, ("fire_count",)),
    "no pos_fire": (_delete("layers/001/pos_fire"), FAILS, ("pos_fire",)),
    "no ngram_counted": (_delete("layers/000/ngram_counted"), FAILS, ("ngram_counted",)),
    "no ngram neuron": (_delete("layers/000/ngram1/neuron"), FAILS, ("ngram1",)),
    "no samples/acts": (_delete("samples/acts"), FAILS, ("samples/acts",)),
    "no vocab offsets": (_delete("tokenizer/vocab/offsets"), FAILS, ("tokenizer/vocab",)),
    "fire_count rows": (_replace("layers/000/fire_count", lambda a: a[:3]), FAILS, ("fire_count",)),
    "fire_count columns": (_replace("layers/000/fire_count", lambda a: a[:, :63]), FAILS, ("fire_count",)),
    "fire_count text": (_replace("layers/000/fire_count", lambda a: a.astype("S3")), FAILS, ("fire_count",)),
    "pos_fire rows": (_replace("layers/001/pos_fire", lambda a: a[:31]), FAILS, ("pos_fire",)),
    "g_sum scalar": (_replace("layers/002/g_sum", lambda a: a[0]), FAILS, ("g_sum",)),
    "tokens columns": (_replace("data/tokens", lambda a: a[:, :31]), FAILS, ("data/tokens",)),
    "tokens flat": (_replace("data/tokens", lambda a: a.reshape(-1)), FAILS, ("data/tokens",)),
    "tokens float": (_replace("data/tokens", lambda a: a.astype(np.float32)), FAILS, ("data/tokens",)),
    "seq_index rows": (_replace("data/seq_index", lambda a: a[:5]), FAILS, ("data/seq_index",)),
    "unigram short": (_replace("data/unigram", lambda a: a[:10]), FAILS, ("data/unigram",)),
    "acts layers": (_replace("samples/acts", lambda a: a[:3]), FAILS, ("samples/acts",)),
    "ngram columns differ": (_replace("layers/000/ngram1/count", lambda a: a[:-1]), FAILS, ("ngram1",)),
    "offsets short": (_replace("tokenizer/vocab/offsets", lambda a: a[:10]), FAILS, ("tokenizer/vocab",)),
    "extra layer group": (_h5(lambda f: f.copy(f["layers/003"], "layers/009")), FAILS, ("layers",)),
    "layer group named abc": (_h5(lambda f: f.copy(f["layers/003"], "layers/abc")), FAILS, ("layers/abc",)),
    "layer group a dataset": (_h5(_layer_group_as_dataset), FAILS, ("layers/003",)),
    "no layers group": (_delete("layers"), FAILS, ("layers",)),
    # analyses
    "positional kind 200": (_set_value("analysis/positional/kind", (0, 0), 200), REPAIRED, ("positional", "kind")),
    "params not JSON": (_attr("analysis/dead", "params", "{oops"), REPAIRED, ("dead", "params")),
    "params a list": (_attr("analysis/positional", "params", "[1, 2]"), REPAIRED, ("positional", "params")),
    "recording attr gone": (_attr("analysis/ngrams", "recording", None), REPAIRED, ("ngrams", "recording")),
    "no dead_fraction": (_delete("analysis/dead/dead_fraction"), REPAIRED, ("dead", "dead_fraction")),
    "mi rows": (_replace("analysis/positional/mi", lambda a: a[:3]), REPAIRED, ("positional", "mi")),
    "ngrams layers unknown": (_replace("analysis/ngrams/layers", lambda a: np.array([0, 9])), REPAIRED,
                              ("ngrams", "layers")),
    "no n_seqs": (_delete("analysis/positional/n_seqs"), REPAIRED, ("positional", "n_seqs")),
    "covered neuron out of range": (_replace("analysis/ngrams/n1/covered_neuron", lambda a: np.array([999], np.int32)),
                                    REPAIRED, ("ngrams",)),
    "trigger_fires columns": (_replace("analysis/ngrams/n1/trigger_fires", lambda a: a[:, :3]), REPAIRED,
                              ("ngrams", "trigger_fires")),
    "no covered_occurrences": (_delete("analysis/ngrams/n2/covered_occurrences"), REPAIRED,
                               ("ngrams", "covered_occurrences")),
    # bytes
    "truncated half": (_truncate(0.5), FAILS, ()),
    "truncated to nothing": (_truncate(0.0), FAILS, ()),
    "superblock flipped": (_flip_at(0, 8), FAILS, ()),
    **{f"bytes flipped at {fraction:g}": (_flip(fraction, 16), EITHER, ())
       for fraction in (0.0002, 0.001, 0.003, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)},
    **{f"one byte flipped at {offset}": (_flip_at(offset), EITHER, ()) for offset in (40, 96, 700, 1500, 3000)},
    "root attribute value unreadable": (_flip_after(b"format", 40, 32), FAILS, ()),
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory, model_dirs, text_file):
    """Parts 1 and 2 of one recording; part 1 analysed (so export and report have something to read)."""
    from ffnscope.engine.analysis.job import analyze

    base = tmp_path_factory.mktemp("crafted")
    paths = [base / f"part{i}.h5" for i in (1, 2)]
    for i, path in enumerate(paths, 1):
        record_tiny(path, model_dirs["opt"], [text_file], part=(i, 2))
    analyze(paths[0], log=lambda _m: None)
    return paths


def _made(good: Path, variant: str, directory: Path) -> Path:
    """directory/c.h5: a copy of the good cache with the variant's damage."""
    directory.mkdir(parents=True)
    cache = directory / "c.h5"
    shutil.copyfile(good, cache)
    VARIANTS[variant][0](cache)
    return cache


def _commands(cache: Path, other: Path, work: Path) -> list[list[str]]:
    readers = [["info", cache], ["export", cache, "--out", work / "x.csv"], ["report", cache],
               ["npl", "show", cache], ["merge", cache, other, "--out", work / "m.h5"]]
    return [[str(a) for a in argv] for argv in
            [["@sha256", cache], *readers, ["@sha256", cache], ["analyze", cache], ["@sha256", cache],
             ["report", cache]]]  # the report again: after analyze repaired what it could


def _drive(jobs: list, work: Path) -> dict[str, list[dict]]:
    """Run the driver over jobs [(variant, commands)]; -> variant -> its lines. A command past HANG_S or a
    driver that dies fails its variant (a "crash" line) and a fresh driver goes on with the rest."""
    lines: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    pending = list(jobs)
    while pending:
        (work / "jobs.json").write_text(json.dumps(pending))
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(work / "jobs.json")], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env_for_subprocess())
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        current, buffer, deadline = pending[0][0], b"", time.monotonic() + HANG_S + 30  # + the driver's start
        broke = False  # a hang or a dead driver: go on after the variant it was at
        while True:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                proc.kill()
                lines[current].append({"crash": f"no answer within {HANG_S} s (a hang)"})
                broke = True
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                if proc.wait() != 0:
                    lines[current].append({"crash": f"the driver died with status {proc.returncode}"})
                    broke = True
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = json.loads(raw)
                if "start" in line:
                    current, deadline = line["start"], time.monotonic() + HANG_S
                else:
                    lines[line["variant"]].append(line)
        proc.wait()
        proc.stdout.close()
        selector.close()
        names = [name for name, _ in pending]
        pending = pending[names.index(current) + 1:] if broke else []
    return lines


@pytest.fixture(scope="module")
def outcomes(parts, tmp_path_factory):
    """variant -> (its cache, its lines): every variant through every command, once."""
    base = tmp_path_factory.mktemp("variants")
    jobs, caches = [], {}
    for i, name in enumerate(VARIANTS):
        caches[name] = cache = _made(parts[0], name, base / f"v{i:03d}")
        jobs.append((name, _commands(cache, parts[1], cache.parent)))
    lines = _drive(jobs, base)
    return {name: (caches[name], lines[name]) for name in VARIANTS}


def _check_line(line: dict, expect, needles: tuple, cache: Path) -> None:
    what = " ".join(line["argv"])
    if isinstance(expect, dict):
        expect = expect.get(line["argv"][0], EITHER)
    assert line.get("crash") is None, f"{what}: {line['crash']}"
    if line["rc"] == 0 and expect != FAILS:
        assert "Traceback" not in line["stderr"], f"{what}: {line['stderr']}"
        assert line["stdout_len"] > 0, f"{what}: no output"
        return
    if expect == OK:
        raise AssertionError(f"{what} failed on a good cache: rc {line['rc']}: {line['stderr']}")
    assert line["rc"] == 2, f"{what}: rc {line['rc']}: {line['stderr'][-2000:]}"
    # progress lines ("analyzing: suppression") may come before the one error line
    errors = [text for text in line["stderr"].splitlines() if text.strip() and not text.startswith("analyzing: ")]
    assert len(errors) == 1 and errors[0].startswith(ERROR), f"{what}: {line['stderr'][-2000:]}"
    assert line["stderr_len"] < 1000, f"{what}: a message of {line['stderr_len']} characters"
    assert "Traceback" not in line["stderr"]
    if expect == FAILS:  # (a damage that leaves the file readable may make merge name the other part)
        assert str(cache) in errors[0], errors[0]
        for needle in needles:
            assert needle in errors[0], f"{what}: {needle!r} not in {errors[0]}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_command_answers_in_one_line(outcomes, variant):
    cache, lines = outcomes[variant]
    _, expect, needles = VARIANTS[variant]
    assert lines, "the driver never reached this variant"
    for line in lines:
        assert line.get("crash") is None, f"{variant}: {line['crash']}"
    commands = [line for line in lines if "rc" in line]
    hashes = [line["sha256"] for line in lines if "sha256" in line]
    assert [line["argv"][0] for line in commands] == ["info", "export", "report", "npl", "merge", "analyze", "report"]
    for line in commands[:-1]:
        _check_line(line, expect, needles, cache)
    # after analyze: a repaired analysis reads again; otherwise the same answer as before
    _check_line(commands[-1], OK if expect is REPAIRED else EITHER if commands[-2]["rc"] == 0 else expect,
                needles, cache)
    assert len(hashes) == 3 and hashes[0] == hashes[1], "a command that only reads the cache changed it"
    if commands[-2]["rc"] != 0:
        assert hashes[1] == hashes[2], "analyze failed and yet changed the cache"


def test_the_command_line_says_what_the_driver_saw(outcomes, parts, tmp_path):
    """The driver calls main() in-process; the real command gives the same one line (a few variants, on
    fresh copies: analyze has repaired some of the driver's)."""
    for i, variant in enumerate(("meta not JSON", "no fire_count", "superblock flipped", "positional kind 200")):
        cache = _made(parts[0], variant, tmp_path / str(i))
        seen, lines = outcomes[variant]
        for command in ("info", "report"):
            r = subprocess.run([sys.executable, "-m", "ffnscope", command, str(cache)], capture_output=True, text=True,
                               env=env_for_subprocess(), timeout=HANG_S)
            inside = next(line for line in lines if line.get("argv") == [command, str(seen)])
            assert r.returncode == inside["rc"] == 2, (variant, r.stderr)
            assert r.stderr.replace(str(cache), str(seen)) == inside["stderr"], variant


TUI_VARIANTS = ("meta not JSON", "no fire_count", "positional kind 200", "taus empty", "bytes flipped at 0.5")


async def test_recordings_list_shows_one_line_reasons(parts, tmp_path):
    """The app lists damaged caches as error rows with their one-line reason, and opening one says it
    again instead of crashing the app (a cache listed from its meta once crashed it on opening)."""
    from ffnscope.app.tui.app import FFNScopeApp
    from ffnscope.app.tui.layers import LayersScreen
    from ffnscope.app.tui.recordings import RecordingsScreen
    from tests.tui_helpers import settle, wait_for, wait_screen

    names = TUI_VARIANTS + ("unchanged",)
    caches = [_made(parts[0], v, tmp_path / str(i)) for i, v in enumerate(names)]
    app = FFNScopeApp(caches, dirs=[])
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await wait_screen(pilot, RecordingsScreen)
        await wait_for(pilot, lambda: len(screen.rows) == len(caches), what="a row per file")
        rows = {row.path: row for row in screen.rows}
        for variant, cache in zip(names, caches):
            status, message = rows[cache].status(), rows[cache].message()
            if variant == "unchanged" or variant.startswith("bytes"):  # a flip may spare what the list reads
                assert status.startswith("complete") or status == "error", (variant, status)
            else:
                assert status == "error", (variant, status)
            if status == "error":
                assert "\n" not in message and "Traceback" not in message and len(message) < 400, (variant, message)
                assert "c.h5" in message and ("cannot be read" in message or "is damaged" in message), message
        for index, variant in enumerate(names):  # opening: the layers screen or a one-line notice, never a crash
            before = len(app._notifications)
            await pilot.press("home", *["down"] * index, "enter")
            await settle(pilot)
            await wait_for(pilot, lambda: isinstance(app.screen, LayersScreen) or len(app._notifications) > before,
                           what=f"{variant} opened or refused")
            if variant == "unchanged":
                assert isinstance(app.screen, LayersScreen)
            if isinstance(app.screen, LayersScreen):
                assert variant == "unchanged" or variant.startswith("bytes"), variant
                await pilot.press("escape")
                await wait_screen(pilot, RecordingsScreen)
            else:
                notice = list(app._notifications)[-1].message
                assert "\n" not in notice and "c.h5" in notice, (variant, notice)
    assert app.return_code in (None, 0)
