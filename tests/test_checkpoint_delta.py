"""Issue 18: appending a shard costs the shard, and a checkpoint writes pos_fire's change since a base,
not pos_fire again; kills around a new base resume to the uninterrupted recording."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from ffnscope.cache import schema, store
from ffnscope.cache.errors import UserError
from ffnscope.cache.reader import CacheReader
from ffnscope.cache.state import DataState, GramCounts, PosIncrements, merge_sorted_counts
from ffnscope.cache.store import read_state, remove_segments, remove_stale_segments, segments_dir, write_segment
from ffnscope.engine.record import executor
from ffnscope.engine.record.config import RecordConfig
from ffnscope.engine.record.grams import data_counts
from ffnscope.engine.record.job import record
from tests.helpers import FAST, assert_same_cache

OPTIONS = dict(FAST, tau=0.0)  # 2048 tokens: 8 shards of 8 sequences of 32


def _shard(lo: int, hi: int, seq_len: int = 4, vocab: int = 50) -> DataState:
    tokens = np.random.default_rng(lo).integers(0, vocab, (hi - lo, seq_len)).astype(np.int32)
    unigram, grams = data_counts(tokens, vocab, 1)
    return DataState(tokens, np.arange(lo, hi), tokens.astype(np.uint8) % 3, unigram, grams)


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_appending_a_shard_never_copies_what_is_held():
    """Shards in data order are appended: with room reserved (a recording knows its size) what is held never
    moves; without, the buffer doubles, so 64 appends move it at most 7 times (before: a copy of everything
    per shard). Either way the streams and counts equal concatenating and reducing everything at once."""
    reserved, doubling = _shard(0, 0), _shard(0, 0)
    reserved.reserve(3 * 64)
    buffers = {"reserved": set(), "doubling": set()}
    shards = [_shard(3 * k, 3 * k + 3) for k in range(64)]
    for shard in shards:
        reserved.add(shard)
        doubling.add(shard)
        buffers["reserved"].add(_address(reserved.tokens))
        buffers["doubling"].add(_address(doubling.tokens))
    assert len(buffers["reserved"]) == 1 and len(buffers["doubling"]) <= 7
    for state in (reserved, doubling):
        for name in ("tokens", "seq_index", "domains"):
            np.testing.assert_array_equal(getattr(state, name), np.concatenate([getattr(s, name) for s in shards]))
        np.testing.assert_array_equal(state.unigram, sum(s.unigram for s in shards))
        for n in (2, 3):
            whole = GramCounts.reduce([s.grams[n] for s in shards])
            np.testing.assert_array_equal(state.grams[n].gram, whole.gram)
            np.testing.assert_array_equal(state.grams[n].count, whole.count)


def test_parts_out_of_order_are_sorted_into_place():
    later, earlier = _shard(10, 14), _shard(0, 4)
    tokens = np.concatenate([earlier.tokens, later.tokens])
    later.add(earlier)
    np.testing.assert_array_equal(later.seq_index, [0, 1, 2, 3, 10, 11, 12, 13])
    np.testing.assert_array_equal(later.tokens, tokens)


def test_merging_sorted_counts_equals_reducing_them():
    rng = np.random.default_rng(0)
    for size_a, size_b in ((0, 5), (5, 0), (200, 50), (50, 200)):
        a = GramCounts.reduce([GramCounts(rng.integers(0, 300, size_a), rng.integers(1, 9, size_a))])
        b = GramCounts.reduce([GramCounts(rng.integers(0, 300, size_b), rng.integers(1, 9, size_b))])
        merged, reduced = merge_sorted_counts(a, b), GramCounts.reduce([a, b])
        np.testing.assert_array_equal(merged.gram, reduced.gram)
        np.testing.assert_array_equal(merged.count, reduced.count)


def test_increments_take_the_narrowest_type_and_say_when_a_base_is_due():
    increments = PosIncrements()
    increments.start(200)
    increments.add(0, np.full((2, 3), 200, np.int32))
    assert increments.layers[0].dtype == np.uint8 and not increments.full_after(55)
    increments.start(100)  # 300 sequences: uint16, what was counted kept
    increments.add(0, np.full((2, 3), 100, np.int32))
    assert increments.layers[0].dtype == np.uint16 and (increments.layers[0] == 300).all()
    assert not increments.full_after(65535 - 300) and increments.full_after(65536 - 300)
    increments.rebase("base000007.h5")
    assert (increments.base, increments.seqs, increments.layers) == ("base000007.h5", 0, {})


# --- recordings --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.tiny_models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("model") / "llama", "llama")


def _record(out, model, data, **extra):
    config = RecordConfig(out=out, model=str(model), data=[str(data)], tokens=2048, **OPTIONS, **extra)
    return record(config, log=lambda _m: None)


@pytest.fixture(scope="module")
def whole(llama, text_file, tmp_path_factory):
    """The uninterrupted recording (a checkpoint after every shard)."""
    out = tmp_path_factory.mktemp("whole") / "whole.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(executor.Recorder, "CHECKPOINT_RATIO", 0.0)
        _record(out, llama, text_file)
    return out


def test_a_checkpoint_writes_pos_fire_as_its_narrow_increment(llama, text_file, tmp_path, monkeypatch):
    """The checkpoint after the second shard stores no pos_fire (no base yet: a dataset never written) and
    the 16 sequences' increments as uint8, a quarter of pos_fire's bytes; read back, base plus increments
    are pos_fire exactly, through read_state and the lazy reader alike."""
    monkeypatch.setattr(executor.Recorder, "CHECKPOINT_RATIO", 0.0)
    real, seen = executor.write_state, {}

    def inspecting(path, state, status, *args, **kwargs):
        real(path, state, status, *args, **kwargs)
        if state.shards_done == 2:
            seen["pos_fire"] = {i: layer.pos_fire.copy() for i, layer in state.layers.items()}
            with h5py.File(path, "r") as f:
                seen["stored"] = {i: (f[schema.layer_group(i)]["pos_fire"].id.get_storage_size(),
                                      f[schema.layer_group(i)][schema.POS_FIRE_DELTA].dtype,
                                      f[schema.layer_group(i)][schema.POS_FIRE_DELTA].id.get_storage_size())
                                  for i in state.layers}
            seen["read"] = read_state(path, "testing")
            with CacheReader(path) as reader:
                seen["rows"] = {i: reader.array(i, "pos_fire", slice(3, 9)) for i in state.layers}
    monkeypatch.setattr(executor, "write_state", inspecting)
    _record(tmp_path / "c.h5", llama, text_file)
    for index, pos_fire in seen["pos_fire"].items():
        assert pos_fire.sum() > 0
        assert seen["stored"][index] == (0, np.uint8, pos_fire.nbytes // 4)
        np.testing.assert_array_equal(seen["read"].layers[index].pos_fire, pos_fire)
        np.testing.assert_array_equal(seen["rows"][index], pos_fire[3:9])


def _narrow(seqs: int) -> np.dtype:
    """PosIncrements.dtype with tiny limits: a new base after every second shard of 8 sequences."""
    return np.dtype(np.uint8) if seqs <= 20 else np.dtype(np.int32)


class _Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs (no except clause of the job catches it)."""


def _killed_at(monkeypatch, name: str, when):
    """cache.store's `name`, as the executor calls it, raising _Killed instead of its call where
    when(args) holds."""
    real = getattr(executor, name)

    def killing(*args, **kwargs):
        if when(args):
            raise _Killed
        return real(*args, **kwargs)
    monkeypatch.setattr(executor, name, killing)


@pytest.mark.parametrize("where", ["after a base", "between a base and its checkpoint"])
def test_kills_around_a_new_base_resume_to_the_uninterrupted_recording(llama, text_file, tmp_path, monkeypatch,
                                                                       whole, where):
    """New bases after shards 2, 4 and 6 (increments made to fill up after 20 sequences). Killed after shard
    5's checkpoint, which names base000004 and the increments since, or after base000004 was written but
    before the checkpoint naming it (the last is shard 3's, on base000002, the new base named by none): the
    partial cache reads as that checkpoint, a replaced base is gone, a missing base is refused; the resume
    equals the uninterrupted recording and leaves nothing behind."""
    out = tmp_path / "killed.h5"
    monkeypatch.setattr(executor.Recorder, "CHECKPOINT_RATIO", 0.0)
    monkeypatch.setattr(PosIncrements, "dtype", staticmethod(_narrow))
    if where == "after a base":
        _killed_at(monkeypatch, "write_segment", lambda args: args[1] == "000005")
        kept, left = 5, {"base000004.h5"}
    else:
        _killed_at(monkeypatch, "write_state", lambda args: args[1].shards_done == 4)
        kept, left = 3, {"base000002.h5", "base000004.h5"}
    with pytest.raises(_Killed):
        _record(out, llama, text_file)
    assert read_state(out, "testing").shards_done == kept
    assert {p.name for p in segments_dir(out).iterdir() if p.name.startswith("base")} == left
    named = f"base{kept - kept % 2:06d}.h5"
    (segments_dir(out) / named).rename(tmp_path / named)
    with pytest.raises(UserError, match=f"segment files are missing.*{named}"):
        read_state(out, "testing")
    (tmp_path / named).rename(segments_dir(out) / named)

    monkeypatch.undo()
    _record(out, llama, text_file, resume=True)
    assert_same_cache(whole, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["killed.h5", "killed.h5.progress.json"]


def test_checkpoints_name_maps_of_segments_and_resume_through_them(llama, text_file, tmp_path, monkeypatch,
                                                                  whole):
    """Folding every 2 segments into a map (MAP_FANOUT 2; 64 in use): the checkpoint after shard 6 names
    two maps, not six segments (each a source of every stream and run: flat however many shards), yet
    reads as the 6 shards; a segment missing under a map is found and refused; the resume, which merges the
    pairs through the maps, equals the uninterrupted recording and leaves nothing behind."""
    out = tmp_path / "killed.h5"
    monkeypatch.setattr(executor.Recorder, "CHECKPOINT_RATIO", 0.0)
    monkeypatch.setattr(store, "MAP_FANOUT", 2)
    _killed_at(monkeypatch, "write_segment", lambda args: args[1] == "000006")
    with pytest.raises(_Killed):
        _record(out, llama, text_file)
    folder = segments_dir(out).name
    with h5py.File(out, "r") as f:
        for key in ("data/tokens", "samples/acts", "layers/000/ngram1/gram"):
            assert {s.file_name for s in f[key].virtual_sources()} == {f"{folder}/map2-000004.h5",
                                                                        f"{folder}/map1-000006.h5"}, key
    partial = read_state(out, "testing")
    assert partial.shards_done == 6
    np.testing.assert_array_equal(partial.data.tokens, read_state(whole, "testing").data.tokens[:6 * 8])
    (segments_dir(out) / "000001.h5").rename(tmp_path / "000001.h5")
    with pytest.raises(UserError, match=f"segment files are missing \\({folder}/000001.h5\\)"):
        read_state(out, "testing")
    (tmp_path / "000001.h5").rename(segments_dir(out) / "000001.h5")

    monkeypatch.undo()
    _record(out, llama, text_file, resume=True)
    assert_same_cache(whole, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["killed.h5", "killed.h5.progress.json"]


def test_segments_are_never_removed_through_a_symlink(tmp_path):
    """A symlink in place of the segments folder, or inside it, is neither followed nor removed; writing a
    segment there is refused."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "000000.h5").write_bytes(b"not ours")
    cache = tmp_path / "c.h5"
    segments_dir(cache).symlink_to(elsewhere, target_is_directory=True)
    remove_segments(cache)
    assert not remove_stale_segments(cache)
    assert (elsewhere / "000000.h5").exists() and segments_dir(cache).is_symlink()
    shard = _shard(0, 2)
    with pytest.raises(UserError, match="not a directory of ours"):
        write_segment(cache, "000000", shard, None)
    segments_dir(cache).unlink()
    segments_dir(cache).mkdir()
    (segments_dir(cache) / "link.h5").symlink_to(elsewhere / "000000.h5")
    (segments_dir(cache) / "000001.h5").write_bytes(b"left by a kill")
    remove_segments(cache)
    assert [p.name for p in segments_dir(cache).iterdir()] == ["link.h5"]
    assert (elsewhere / "000000.h5").read_bytes() == b"not ours"
