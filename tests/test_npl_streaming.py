"""NPL at 66B scale on one host: layers beyond --host-memory / --device-memory stream from the model's files
with the same results, and a fit in several groups of pairs sends each group's maps to the sidecar's
temporary as the group ends (memory holds one group's maps), the sidecar itself replaced only at the end."""
import gc
import weakref

import h5py
import numpy as np
import pytest
import torch

import ffnscope.engine.npl.capture as capture_module
import ffnscope.engine.npl.job as job_module
from ffnscope.cache.errors import UserError
from ffnscope.cache.npl_store import NplReader, NplWriter, StoredMaps, sidecar_path
from ffnscope.engine.jobs.stop import Stopped, StopToken
from ffnscope.engine.model.load import load_model
from ffnscope.engine.model.runner import LayerRunner
from ffnscope.engine.npl.job import NplFitConfig, NplFunctionalConfig, NplSubstituteConfig, fit_job, \
    functional_job, substitute_job
from ffnscope.engine.npl.plan import (MEMORY_ENV, MemoryLimits, _sizes, group_bytes, held_maps, host_floor,
                                      runner_resident)
from tests.helpers import record_tiny
from tests.tiny_models import tiny_model_dir

QUIET = dict(log=lambda _m: None)
PAIRS = "adjacent,1:1,3:0"
SEQ_LEN, BATCH = 32, 8192  # the recording's seq_len (tests.helpers), NplFitConfig's batch_tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("npl-streaming")
    model = tiny_model_dir(tmp / "model", "llama")
    cache = tmp / "c.h5"
    record_tiny(cache, model, [text_file])
    return cache, model


def _datasets(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, o: out.__setitem__(k, (o[()].tobytes(), dict(o.attrs))) if isinstance(o, h5py.Dataset)
                     else out.__setitem__(k, dict(o.attrs)) if k.startswith("maps/") else None)
    return out


class _Runners(LayerRunner):
    """A LayerRunner that remembers what it kept resident and how many layers it read from the files."""
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.from_files = 0
        _Runners.made.append(self)

    def weights(self, index):
        if index >= self.resident and self._in_files(index):
            self.from_files += 1
        return super().weights(index)


def test_runner_plan_streams_layers_beyond_the_host_budget(setup):
    _cache, model = setup
    lm = load_model(str(model))
    w, _r = _sizes(lm, SEQ_LEN, BATCH)
    floor, cpu = host_floor(lm, SEQ_LEN, BATCH), torch.device("cpu")
    assert runner_resident(lm, cpu, BATCH, SEQ_LEN) == 4                                  # no limit: all
    assert runner_resident(lm, cpu, BATCH, SEQ_LEN, limits=MemoryLimits(host=floor)) == 0
    # room for k layers beyond the floor keeps k resident (one more would be the streaming slot)
    assert runner_resident(lm, cpu, BATCH, SEQ_LEN, limits=MemoryLimits(host=floor + 2 * w.per_layer)) == 2
    # what the job holds itself comes out of the host budget first
    assert runner_resident(lm, cpu, BATCH, SEQ_LEN, 1000, MemoryLimits(host=floor + 2 * w.per_layer + 1000)) == 2
    assert runner_resident(lm, cpu, BATCH, SEQ_LEN, 1000, MemoryLimits(host=floor + 2 * w.per_layer)) == 1
    assert runner_resident(lm, cpu, BATCH, SEQ_LEN, limits=MemoryLimits(device=w.base + 3 * w.per_layer)) == 2
    with pytest.raises(UserError, match=r"--host-memory .* does not hold the maps .* smallest plan") as err:
        runner_resident(lm, cpu, BATCH, SEQ_LEN, host_reserve=10 ** 6, limits=MemoryLimits(host=floor),
                        what="the maps")
    assert "\n" not in str(err.value)


def test_fit_under_a_host_cap_streams_layers_and_gives_the_same_sidecar(setup, tmp_path, monkeypatch):
    cache, model = setup
    reference = tmp_path / "all-resident.npl.h5"
    monkeypatch.setattr(capture_module, "LayerRunner", _Runners)
    _Runners.made = []
    fit_job(NplFitConfig(cache, pairs=PAIRS, tokens=3200, device="cpu", method="both", force=True), **QUIET)
    assert [r.resident for r in _Runners.made] == [4]
    sidecar_path(cache).rename(reference)
    lm = load_model(str(model))
    w, _r = _sizes(lm, SEQ_LEN, BATCH)
    pairs = [(0, 1), (1, 1), (1, 2), (2, 3), (3, 0)]
    methods = ["exact", "adagrad"]
    batch = round(10_000 / SEQ_LEN) * SEQ_LEN  # Adagrad's forward batch (FitOptions.forward_batch)
    own = group_bytes(pairs, lm.adapter.d_ffn, methods, "float64", batch) + held_maps(len(pairs), lm.adapter.d_ffn,
                                                                                      methods)
    host = host_floor(lm, SEQ_LEN, batch) + own + w.per_layer  # one layer resident, the others streamed
    _Runners.made = []
    report = fit_job(NplFitConfig(cache, pairs=PAIRS, tokens=3200, device="cpu", method="both", host_memory=host),
                     **QUIET)
    (runner,) = _Runners.made
    assert runner.resident == 1 and runner.from_files > 0
    assert _datasets(report.path) == _datasets(reference)           # every map, metric and the data, bit for bit
    with NplReader(report.path) as a, NplReader(reference) as b:
        assert {k: v for k, v in a.meta["fit"].items() if k not in ("created", "seconds")} == \
            {k: v for k, v in b.meta["fit"].items() if k not in ("created", "seconds")}
    # the report reads its maps from the sidecar, on demand
    assert isinstance(report.result.maps, StoredMaps)
    assert list(report.result.maps["exact"]) == pairs
    with NplReader(reference) as b:
        np.testing.assert_array_equal(report.result.maps["adagrad"][(1, 2)].W, b.load_map(1, 2, "adagrad")[0])
    # substitution and functional neurons stream the same way, with the same results
    d, results = lm.adapter.d_ffn, {}
    maps = 3 * (4 * d * d + 8 * d)                                  # M_0->1 .. M_2->3, held by the substitution
    for limits in ({}, {"host_memory": host_floor(lm, SEQ_LEN, BATCH) + maps}):
        _Runners.made = []
        sub = substitute_job(NplSubstituteConfig(cache, mappings=("npl", "zero"), seeds=1, **limits), **QUIET)
        fun = functional_job(NplFunctionalConfig(cache, **limits), **QUIET)
        rows = [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in sub.rows]  # timing aside
        results[bool(limits)] = (rows, fun.rows, [r.resident for r in _Runners.made],
                                 [r.from_files > 0 for r in _Runners.made])
    assert results[False][2:] == ([4, 4], [False, False])
    assert results[True][2] == [0, 1] and results[True][3] == [True, True]  # the maps' room: one more layer
    assert results[True][:2] == results[False][:2]


def test_memory_limits_are_refused_up_front(setup, monkeypatch):
    cache, model = setup
    for config in (NplFitConfig(cache, host_memory=0), NplSubstituteConfig(cache, device_memory=-1),
                   NplFunctionalConfig(cache, host_memory=-5)):
        job = {NplFitConfig: fit_job, NplSubstituteConfig: substitute_job, NplFunctionalConfig: functional_job}
        with pytest.raises(UserError, match=r"^--(host|device)-memory must be positive$"):
            job[type(config)](config, **QUIET)
    def no_packing(*_a, **_k):
        raise AssertionError("data read")

    monkeypatch.setattr(job_module, "pack_text", no_packing)
    with pytest.raises(UserError, match=r"--host-memory 1\.0 MiB does not hold the model's smallest plan"):
        fit_job(NplFitConfig(cache, tokens=3200, device="cpu", host_memory=1 << 20, force=True), **QUIET)
    # --memory beyond what the host cap leaves is capped by it: refused before any data is read
    floor = host_floor(load_model(str(model)), SEQ_LEN, BATCH)
    with pytest.raises(UserError, match=r"for one layer pair .* but --host-memory .* less the model's smallest plan"):
        fit_job(NplFitConfig(cache, tokens=3200, device="cpu", memory=10 ** 12, host_memory=floor + 1000,
                             force=True), **QUIET)


def _one_pair_budget(cache) -> int:
    """A fit budget that holds any one of PAIRS (with its maps, streamed to the sidecar) but no two."""
    d = 64  # tests.tiny_models
    pairs = [(0, 1), (1, 1), (1, 2), (2, 3), (3, 0)]
    return max(group_bytes([p], d, ["exact"], "float64", BATCH) for p in pairs) + held_maps(1, d, ["exact"])


class _Spy(NplWriter):
    """The job's writer, watched: which group each map arrived in, the temporary's maps after each put,
    and weak references to the maps it was handed."""
    log: list = []
    group = [1]

    def put(self, method, rec):
        super().put(method, rec)
        on_disk = sorted(k for m in self._file["maps"] for k in self._file["maps"][m])
        _Spy.log.append((self.group[0], method, (rec.source, rec.target), weakref.ref(rec.W), on_disk,
                         self.path.read_bytes() if self.path.exists() else None))


def test_a_fit_in_groups_writes_each_groups_maps_as_it_ends(setup, monkeypatch):
    cache, _model = setup
    out = sidecar_path(cache)
    fit_job(NplFitConfig(cache, pairs="1:2", tokens=3200, device="cpu", force=True), **QUIET)
    before = out.read_bytes()                                        # an older sidecar, to be replaced whole
    monkeypatch.setattr(job_module, "NplWriter", _Spy)
    monkeypatch.setenv(MEMORY_ENV, str(_one_pair_budget(cache)))
    _Spy.log, _Spy.group = [], [1]
    gone = []

    def on_progress(fields):
        if fields.get("group", _Spy.group[0]) != _Spy.group[0]:
            _Spy.group[0] = fields["group"]
            gc.collect()
            gone.append(all(ref() is None for _g, _m, _p, ref, _d, _s in _Spy.log))

    fit_job(NplFitConfig(cache, pairs=PAIRS, tokens=3200, device="cpu", force=True), on_progress=on_progress,
            **QUIET)
    groups = [g for g, *_ in _Spy.log]
    assert groups == [1, 2, 3, 4, 5]                                 # a map as each group ends, in order
    assert gone == [True] * 4                                        # and out of memory before the next group
    assert [on_disk for *_x, on_disk, _s in _Spy.log] == [["000_001"], ["000_001", "001_001"],
                                                         ["000_001", "001_001", "001_002"],
                                                         ["000_001", "001_001", "001_002", "002_003"],
                                                         ["000_001", "001_001", "001_002", "002_003", "003_000"]]
    assert all(seen == before for *_x, seen in _Spy.log)             # the sidecar untouched until the end
    with NplReader(out) as reader:
        assert reader.pairs() == [(0, 1), (1, 1), (1, 2), (2, 3), (3, 0)]
        assert reader.meta["fit"]["options"]["pair_groups"] == 5


def test_a_fit_stopped_between_groups_leaves_the_old_sidecar_whole(setup, monkeypatch):
    cache, _model = setup
    out = sidecar_path(cache)
    fit_job(NplFitConfig(cache, pairs="1:2", tokens=3200, device="cpu", force=True), **QUIET)
    before = out.read_bytes()
    monkeypatch.setenv(MEMORY_ENV, str(_one_pair_budget(cache)))
    stop, written = StopToken(), []
    monkeypatch.setattr(job_module, "NplWriter", _Spy)
    _Spy.log = []

    def on_progress(fields):
        if fields.get("group") == 3 and not stop.requested:
            written.extend(p for _g, _m, p, *_r in _Spy.log)
            assert list(out.parent.glob(f".{out.name}.*.tmp"))      # groups 1 and 2 are in the temporary
            stop.request()

    with pytest.raises(Stopped):
        fit_job(NplFitConfig(cache, pairs=PAIRS, tokens=3200, device="cpu", force=True), on_progress=on_progress,
                stop=stop, **QUIET)
    assert written == [(0, 1), (1, 1)]
    assert out.read_bytes() == before and not list(out.parent.glob(f".{out.name}.*.tmp"))
    with NplReader(out) as reader:
        assert reader.pairs() == [(1, 2)]
