"""Write and read recording caches (HDF5; cache.schema holds the version and names).

A cache is only ever replaced whole (cache.atomic): the new image goes to a temporary file beside
it, is flushed to disk, and is renamed over the old one. A kill at any moment leaves either the previous
checkpoint or the new one, never a torn file, and only the final write says `complete`.

A partial cache (a checkpoint) keeps what grows with every shard out of that whole-file rewrite: each
shard's token stream and activation samples go once into a segment file of their own (written whole
the same way) in the directory `.NAME.segments` beside it, and the checkpoint's `data/tokens`,
`data/seq_index`, `data/domains`, `samples/index` and `samples/acts` are HDF5 virtual datasets over the
segments it names, so every reader sees the usual layout. A segment also holds the shard's n-gram pairs
as sorted runs, which the checkpoint's `layers/LLL/ngramN` name and readers sum on read (cache.runs).
Every MAP_FANOUT segments are folded into a map segment standing for them, so a checkpoint names a few
files whatever the number of shards (fold_segments).
Of the statistics of a fixed size a checkpoint writes pos_fire, the largest by far (seq_len x d_ffn a
layer), only as its increment since a base (PosIncrements, narrow integers), naming the base: a segment
file holding pos_fire whole, written when the increments would grow as wide as pos_fire (and at a resume);
a reader adds the two (read_array).
A checkpoint is written after its segments and only ever names segments on disk; a segment it does not
name is left over from a kill and goes at the next start (remove_segments). The complete cache holds
everything itself, compressed, the pairs merged from the runs once, and the directory goes once it is
written (docs/cache-format.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import os
import re
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import h5py
import numpy as np

from ffnscope.cache import schema
from ffnscope.cache.atomic import QuietFile, open_our_dir, remove_ours, replacing, storage_error
from ffnscope.cache.errors import UserError
from ffnscope.cache.runs import (RUNS_ATTR, columns, merged_chunks, put_runs, put_virtual_pairs, run_key,
                                 spill_merged, sum_runs)
from ffnscope.cache.state import (G_ORDERS, NGRAM_ORDERS, DataState, GramCounts, LayerState, PosIncrements,
                                  RecordingState, Samples, Sparse)
from ffnscope.cache.validate import check_recording

_GZIP = dict(compression="gzip", compression_opts=1, shuffle=True)


_BLOCK_BYTES = 64 << 20  # an uncompressed array goes to the file in blocks of this size (h5py copies each)


def put_array(group: h5py.Group, name: str, array: np.ndarray, compress: bool = True) -> None:
    """A dataset with the store's options: gzip level 1 with shuffle, for arrays worth compressing."""
    _stop_if_failed(group)
    array = np.ascontiguousarray(array)
    options = _GZIP if compress and array.size >= 4096 else {}
    if options or array.ndim == 0 or array.nbytes <= _BLOCK_BYTES:
        group.create_dataset(name, data=array, **options)
        return
    target = group.create_dataset(name, shape=array.shape, dtype=array.dtype)
    rows = max(1, _BLOCK_BYTES // max(1, array[0].nbytes))
    for lo in range(0, len(array), rows):
        target[lo:lo + rows] = array[lo:lo + rows]


def empty_array(group: h5py.Group, name: str, shape: tuple, dtype) -> h5py.Dataset:
    """An empty dataset with the options put_array would give the whole array (filled in blocks later)."""
    _stop_if_failed(group)
    size = int(np.prod(shape, dtype=np.int64))
    return group.create_dataset(name, shape=shape, dtype=dtype, **(_GZIP if size >= 4096 else {}))


def write_layer(group: h5py.Group, layer: LayerState, compress: bool = True, pairs=None, pos_fire=None) -> None:
    """One `layers/NNN` group. `pairs(group)`, if given, writes the n-gram pairs instead of layer.ngrams
    (write_state: from the segments' runs); `pos_fire(group)` pos_fire (a checkpoint: its base and increment)."""
    for name in schema.LAYER_ARRAYS:
        if name == "pos_fire" and pos_fire is not None:
            pos_fire(group)
        else:
            put_array(group, name, getattr(layer, name), compress)
    if layer.ngram_counted is not None:
        put_array(group, "ngram_counted", layer.ngram_counted, compress)
        if pairs is not None:
            pairs(group)
            return
        for n, sparse in layer.ngrams.items():
            for column in schema.NGRAM_COLUMNS:
                if getattr(sparse, column) is not None:
                    put_array(group, f"ngram{n}/{column}", getattr(sparse, column), compress)


def read_array(group: h5py.Group, name: str, rows=slice(None)) -> np.ndarray:
    """One array of a `layers/NNN` group, or a slice of its rows: a checkpoint's pos_fire is its base plus
    the increment since (schema.POS_FIRE_DELTA)."""
    array = group[name][rows]
    if name == "pos_fire" and schema.POS_FIRE_DELTA in group:
        array += group[schema.POS_FIRE_DELTA][rows]
    return array


def read_layer(group: h5py.Group, pairs: bool = True) -> LayerState:
    """One `layers/NNN` group; pairs=False: without its n-gram pairs (what grows with the data)."""
    arrays = {k: read_array(group, k) for k in schema.LAYER_ARRAYS}
    counted = group["ngram_counted"][:] if "ngram_counted" in group else None
    ngrams = {int(k[5:]): read_sparse(group[k]) for k in group
              if pairs and k.startswith("ngram") and k != "ngram_counted"}
    return LayerState(**arrays, ngram_counted=counted, ngrams=ngrams)


def nbytes(value) -> int:
    """Bytes of the arrays and strings in a value (dataclasses, dicts, lists and `arrays` walked): what
    writing it uncompressed takes, the bound a write checks the free space against."""
    if isinstance(value, np.ndarray):
        return value.nbytes + 4096  # the dataset's object header and chunk index
    if isinstance(value, (str, bytes)):
        return len(value) * (1 if isinstance(value, bytes) else 4) + 16
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes(v) + 16 for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if isinstance(getattr(value, "arrays", None), dict):
        return nbytes(value.arrays)
    return 8


_WRITING: dict[int, QuietFile] = {}  # the HDF5 files `replaced` writes (by file number) -> their QuietFile


@contextmanager
def replaced(path: Path, tag: str = "", copy: bool = False, failure: str | None = None, needs: int = 0):
    """An open HDF5 file that replaces `path` whole when the block ends, through the one writer of our
    files (cache.atomic.replacing: its temporary, space check, fsync, rename and one-line errors).
    `needs`: bytes of the data the block writes (nbytes). HDF5 writes the temporary through a QuietFile,
    so a full disk never fails a write inside HDF5 (it would not survive it): the disk's error is raised
    once HDF5 has closed the file, in place of whatever the block raised meanwhile."""
    with replacing(path, tag, copy, failure, needs) as tmp, QuietFile(tmp) as sink:
        with h5py.File(sink, "a" if copy else "w") as f:
            number = f.id.fileno
            _WRITING[number] = sink
            try:
                yield f
                f.flush()  # HDF5's buffered writes while the block's errors are still the block's
            except Exception:
                if sink.error is None:
                    raise
            finally:
                del _WRITING[number]
        sink.close()
        if sink.error is not None:
            raise sink.error


def _stop_if_failed(group: h5py.Group) -> None:
    """Raise the disk's failure in a file `replaced` writes, whose writes since go nowhere (QuietFile)."""
    sink = _WRITING.get(group.file.id.fileno)
    if sink is not None and sink.error is not None:
        raise sink.error


# --- segments of a partial cache (see the module) -------------------------------------------------
STREAMS = ("data/tokens", "data/seq_index", "data/domains", "samples/index", "samples/acts")
_SAMPLE_AXIS = {"samples/acts": 1}  # the axis a stream grows along (0 for the others)


def segments_dir(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.segments")


# what we write in a segments folder, and so all we ever delete there: segments, maps, bases, their
# temporaries (cache.atomic.temp_path) and the merge's scratch (cache.runs.spill_merged)
_SEGMENT = r"(?:\d{6,}|upto\d{6,}|base\d{6,}|map\d+-\d{6,})\.h5"
_SCRATCH = re.compile(r"merge\.\w+\.raw")
_WRITTEN = re.compile(rf"{_SEGMENT}|\.{_SEGMENT}\.\d+\.[0-9a-f]+(?:\.[\w.-]+)?\.tmp|{_SCRATCH.pattern}")


def _our_dir(directory: Path) -> bool:
    fd = open_our_dir(directory)
    if fd is not None:
        os.close(fd)
    return fd is not None


def _made_dir(directory: Path) -> Path:
    """`directory`, made if missing; refused unless it is a real directory of ours (cache.atomic.open_our_dir):
    never written or deleted in through a link, nor in someone else's directory."""
    try:
        directory.mkdir(exist_ok=True)
    except FileExistsError:
        pass  # a file or a dangling link in its place: refused below
    except OSError as exc:  # read-only, a full disk: the one line of a failed write
        raise storage_error(directory, reason=exc.strerror or str(exc)) from None
    if not _our_dir(directory):
        raise UserError(f"{directory} is not a directory of ours (a symlink, a file or another user's); "
                        "remove it, then run the command again")
    return directory


def _made_segments_dir(path: Path) -> Path:
    return _made_dir(segments_dir(path))


def _streams(data: DataState, samples: Samples) -> dict[str, np.ndarray]:
    return dict(zip(STREAMS, (data.tokens, data.seq_index, data.domains, samples.index, samples.acts)))


@dataclass(frozen=True)
class Segment:
    """One segment file (its name in segments_dir) and the shapes of the streams it holds."""
    name: str
    shapes: dict


def write_segment(path: Path, name: str, data: DataState, samples: Samples,
                  pairs: dict[int, dict[int, Sparse]] | None = None,
                  counted: dict[int, np.ndarray] | None = None, streams: bool = True) -> Segment:
    """The streams of one shard (or of everything before a resume) as segment `name` of cache `path`,
    with its n-gram pairs (layer -> order -> Sparse) as sorted runs (cache.runs), uncompressed: written
    once, read back only by a resume, the final merge or a reader of the checkpoint. `counted` (layer ->
    ngram_counted), for a resume: each such layer's run is the sum of the checkpoint at `path`'s pairs,
    merged from its runs as the final write merges them (memory bounded, never the pairs whole).
    streams=False: the runs alone (a recording's last shard: no checkpoint names it, and the final write
    takes the streams from memory)."""
    directory = _made_segments_dir(path)
    streams = _streams(data, samples) if streams else {}
    needs = nbytes(streams) + nbytes(pairs or {}) + (_pair_bytes(path) if counted else 0)
    with replaced(directory / f"{name}.h5", failure=f"could not write a checkpoint of {path}", needs=needs) as f:
        for key, array in streams.items():
            put_array(f, key, array, compress=False)
        shapes = put_runs(f, pairs or {})
        if counted:
            with h5py.File(path, "r") as checkpoint:
                for layer, mask in counted.items():
                    shapes.update(_merged_run(f, checkpoint, path, layer, mask))
    return Segment(f"{name}.h5", {**{key: array.shape for key, array in streams.items()}, **shapes})


def _checkpoint_runs(checkpoint: h5py.File, directory: Path, layer: int, n: int, stack: ExitStack) -> list:
    """The sorted runs a checkpoint's `ngramN` of `layer` is made of: the segments' runs its virtual
    datasets name (cache.runs), or the group itself where it holds summed pairs (older checkpoints)."""
    group = checkpoint[schema.layer_group(layer)].get(f"ngram{n}")
    if group is None:
        return []
    if not group.attrs.get(RUNS_ATTR, False) or not group["gram"].is_virtual:
        return [group]
    files = [Path(source.file_name).name for source in group["gram"].virtual_sources()]
    return [stack.enter_context(h5py.File(directory / name, "r"))[run_key(layer, n)] for name in files]


def _merged_run(f: h5py.File, checkpoint: h5py.File, path: Path, layer: int, counted: np.ndarray) -> dict[str, tuple]:
    """Layer `layer`'s pairs of `checkpoint` (the open cache at `path`) summed into one run per order of
    segment file `f`."""
    directory = segments_dir(path)
    write_merged_pairs(f.require_group(f"pairs/{layer:03d}"),
                       lambda n, stack: _checkpoint_runs(checkpoint, directory, layer, n, stack),
                       counted, directory, compress=False)
    return {run_key(layer, n): f[f"{run_key(layer, n)}/gram"].shape for n in NGRAM_ORDERS}


def _pair_bytes(path: Path) -> int:
    """Bytes of a checkpoint's n-gram pairs as stored (what a resume's merged runs take at most)."""
    with h5py.File(path, "r") as f:
        return sum(dataset.size * dataset.dtype.itemsize for layer in f["layers"].values()
                   for name, group in layer.items() if name.startswith("ngram") and name != "ngram_counted"
                   for dataset in group.values())


def write_base(path: Path, state: RecordingState) -> str:
    """Every layer's pos_fire, whole, as the base segment that checkpoints name with their increments since
    (PosIncrements) -> its file name in segments_dir."""
    name = f"base{state.shards_done:06d}.h5"
    needs = sum(nbytes(layer.pos_fire) for layer in state.layers.values())
    with replaced(_made_segments_dir(path) / name, failure=f"could not write a checkpoint of {path}",
                  needs=needs) as f:
        for index, layer in state.layers.items():
            put_array(f, f"{schema.layer_group(index)}/pos_fire", layer.pos_fire, compress=False)
    return name


def _put_pos_fire(group: h5py.Group, index: int, layer: LayerState, path: Path, increments: PosIncrements) -> None:
    """A checkpoint's pos_fire of one layer: the base it names (a virtual dataset over the base segment, or
    with none an unwritten dataset, which reads as zeros and takes no space) and the increments since."""
    shape, dtype = layer.pos_fire.shape, layer.pos_fire.dtype
    if increments.base is None:
        group.create_dataset("pos_fire", shape=shape, dtype=dtype)
    else:
        layout = h5py.VirtualLayout(shape, dtype)
        layout[...] = h5py.VirtualSource(f"{segments_dir(path).name}/{increments.base}",
                                         f"{schema.layer_group(index)}/pos_fire", shape)
        group.create_virtual_dataset("pos_fire", layout)
    if index in increments.layers:
        group.create_dataset(schema.POS_FIRE_DELTA, data=increments.layers[index])


def remove_segment(path: Path, name: str) -> None:
    """One segment file of cache `path` that no checkpoint names any more (a replaced base)."""
    _remove_written(segments_dir(path), lambda entry: entry == name)


def remove_segments(path: Path, keep=()) -> None:
    """Remove the segment files of cache `path` but those named in `keep` (a kill leaves ones no checkpoint
    names, and a complete cache needs none), and the directory once it is empty."""
    directory, names = segments_dir(path), set(keep)
    _remove_written(directory, lambda entry: entry not in names)
    if not names:
        try:
            directory.rmdir()
        except OSError:
            pass


def _remove_written(directory: Path, wanted) -> None:
    """Delete the entries of `directory` that we write there (_WRITTEN) and `wanted(name)` picks, when they are
    ours (cache.atomic.ours: never a symlink, a hard link of someone's file or a directory), and only in a real
    directory of ours: anything else there, or a symlink in its place, stays as it is."""
    fd = open_our_dir(directory)
    if fd is None:
        return
    try:
        for name in os.listdir(fd):
            if _WRITTEN.fullmatch(name) and wanted(name):
                remove_ours(name, dir_fd=fd)
    finally:
        os.close(fd)


def remove_stale_segments(path: Path) -> bool:
    """A segments folder beside a complete cache (a kill between the final write and its removal) goes;
    -> whether one did (what is not ours there keeps it). A partial cache's are its checkpoint's: they stay."""
    path = Path(path)
    if not _our_dir(segments_dir(path)):
        return False
    try:
        with h5py.File(path, "r") as f:
            if str(f.attrs.get("status")) != schema.COMPLETE:
                return False
    except OSError:  # no cache (a kill before the first checkpoint) or not one: nothing names them
        pass
    remove_segments(path)
    return not os.path.lexists(segments_dir(path))


def _put_concatenation(f: h5py.File, name: str, shape: tuple, dtype, parts: list, folder: str = "",
                       axis: int = 0) -> None:
    """Dataset `name` of `f`, of `shape`, as the concatenation along `axis` of `parts`, (segment, shape of its
    part): each segment file's own dataset `name`, named `folder` + its file name relative to f's folder, so
    the files are found wherever they move together. An empty one is stored as such (HDF5 maps nothing)."""
    if not shape[axis]:
        f.create_dataset(name, shape=shape, dtype=dtype)
        return
    layout = h5py.VirtualLayout(shape, dtype)
    offset, where = 0, [slice(None)] * len(shape)
    for segment, part in parts:
        if part[axis]:
            where[axis] = slice(offset, offset + part[axis])
            layout[tuple(where)] = h5py.VirtualSource(f"{folder}{segment.name}", name, part)
        offset += part[axis]
    if offset != shape[axis]:
        raise ValueError(f"the segments hold {offset} rows of {name}, the recording {shape[axis]}")
    f.create_virtual_dataset(name, layout)


MAP_FANOUT = 64  # segments a map stands for (fold_segments)


def fold_segments(path: Path, named: list[Segment], shards_done: int) -> list[Segment]:
    """What a checkpoint names (`named`, in data order) with every MAP_FANOUT consecutive segments of one
    level folded into a map of the next (write_map), level by level: a checkpoint then maps at most
    MAP_FANOUT a level into each dataset, not a source a shard (~45 us each, for every stream and run: with
    thousands of shards each checkpoint took seconds, growing). `shards_done` names the maps made now."""
    named = list(named)
    while len(named) >= MAP_FANOUT and len({_map_level(s) for s in named[-MAP_FANOUT:]}) == 1:
        level = _map_level(named[-1]) + 1
        named[-MAP_FANOUT:] = [write_map(path, f"map{level}-{shards_done:06d}.h5", named[-MAP_FANOUT:])]
    return named


def _map_level(segment: Segment) -> int:
    """0 for a segment of streams (a shard's, or everything before a resume), n for a map of level n-1 ones."""
    return int(segment.name[3:segment.name.index("-")]) if segment.name.startswith("map") else 0


def write_map(path: Path, name: str, members: list[Segment]) -> Segment:
    """A segment file standing for `members` (consecutive, in data order): each of their datasets, streams and
    pair runs, the concatenation of theirs, as virtual datasets over them (names relative to the folder)."""
    directory = _made_segments_dir(path)
    shapes = {key: _concatenated_shape([m.shapes[key] for m in members], _SAMPLE_AXIS.get(key, 0))
              for key in members[0].shapes}
    dtypes = {}  # every dataset a member holds (all hold the same), by path
    with h5py.File(directory / members[0].name, "r") as first:
        first.visititems(lambda key, item: dtypes.update({key: item.dtype}) if isinstance(item, h5py.Dataset)
                         else None)
    with replaced(directory / name, failure=f"could not write a checkpoint of {path}") as f:
        for dataset, dtype in dtypes.items():
            key = dataset if dataset in shapes else dataset.rpartition("/")[0]  # a run's column: the run's rows
            axis = _SAMPLE_AXIS.get(key, 0)
            _put_concatenation(f, dataset, shapes[key], dtype, [(m, m.shapes[key]) for m in members], axis=axis)
    return Segment(name, shapes)


def _concatenated_shape(shapes: list[tuple], axis: int) -> tuple:
    return (*shapes[0][:axis], sum(shape[axis] for shape in shapes), *shapes[0][axis + 1:])


def write_state(path: Path, state: RecordingState, status: str, needs: int | None = None,
                compress: bool = True, segments: list[Segment] | None = None,
                runs: list[Segment] | None = None, increments: PosIncrements | None = None) -> None:
    """`state.layers` is read once, in order, through .items(): a mapping that makes each layer when asked
    (tests/synthetic_cache.py) is written without the whole recording in memory; it then gives `needs`,
    the bytes the write takes (default: nbytes(state)). compress=False: no gzip (checkpoints).
    `segments`: a checkpoint's, holding the streams (STREAMS) and the n-gram pairs' runs, which this
    write then names instead of writing them; `increments` (a checkpoint's too): pos_fire is written as
    them and the base they name (_put_pos_fire). `runs`: segments whose runs the n-gram layers' pairs are
    merged from, streamed (the final write of a recording); the streams come from `state` then."""
    streams = _streams(state.data, state.samples)
    if needs is None:
        needs = nbytes(state) - (nbytes(streams) if segments is not None else 0)
        if increments is not None:
            needs += sum(nbytes(held) for held in increments.layers.values()) - \
                sum(nbytes(layer.pos_fire) for layer in state.layers.values())
        # the merged pairs, at most the runs' rows: in the scratch files and in the cache
        needs += 2 * sum(shape[0] * 28 for s in runs or () for key, shape in s.shapes.items()
                         if key.startswith("pairs/"))
    with replaced(path, failure=f"could not write {path}", needs=needs) as f:
        f.attrs["format"] = schema.FORMAT
        f.attrs["schema_version"] = schema.SCHEMA_VERSION
        f.attrs["status"] = status
        f.attrs["shards_done"] = state.shards_done
        f.attrs["meta"] = json.dumps(state.meta)
        data = f.create_group("data")
        put_array(data, "unigram", state.data.unigram, compress)
        for n, grams in state.data.grams.items():
            put_array(data, f"gram{n}/gram", grams.gram, compress)
            put_array(data, f"gram{n}/count", grams.count, compress)
        for index, layer in state.layers.items():
            write_layer(f.create_group(schema.layer_group(index)), layer, compress,
                        _pair_writer(path, index, layer, compress, segments, runs),
                        None if increments is None else partial(_put_pos_fire, index=index, layer=layer, path=path,
                                                                increments=increments))
        _put_strings(f, "tokenizer/vocab", state.vocab)
        _put_strings(f, "tokenizer/pieces", state.pieces)
        for key, array in streams.items():
            if segments is not None:
                _put_concatenation(f, key, array.shape, array.dtype, [(s, s.shapes[key]) for s in segments],
                                   f"{segments_dir(path).name}/", _SAMPLE_AXIS.get(key, 0))
            elif key == "samples/acts":
                chunks = (1, max(1, min(array.shape[1], 256)), array.shape[2]) if array.size else None
                f.create_dataset(key, data=array, chunks=chunks)
            else:
                put_array(f, key, array, compress)


def _pair_writer(path: Path, index: int, layer: LayerState, compress: bool, segments, runs):
    """What writes a layer's n-gram pairs (write_layer's `pairs`): a checkpoint names its segments'
    runs, the final write merges them, and anything else writes the layer's own (None)."""
    if segments is not None:
        return lambda group: put_virtual_pairs(group, index, segments_dir(path).name, segments)
    if runs is not None:
        return lambda group: _write_merged(group, index, layer.ngram_counted, path, runs, compress)
    return None


def _write_merged(group: h5py.Group, index: int, counted: np.ndarray, path: Path, runs: list[Segment],
                  compress: bool) -> None:
    """One layer's `ngramN/*`, merged from the segments' runs (scratch files in the segments folder)."""
    directory = segments_dir(path)

    def sources(n, stack):
        key = run_key(index, n)
        return [stack.enter_context(h5py.File(directory / s.name, "r"))[key] for s in runs
                if s.shapes.get(key, (0,))[0]]
    write_merged_pairs(group, sources, counted, directory, compress)


def write_merged_pairs(group: h5py.Group, sources, counted: np.ndarray, scratch: Path, compress: bool) -> None:
    """`ngramN/*` of one layer as the streamed sum of sorted runs (cache.runs.merged_chunks), neurons not
    `counted` dropped: `sources(n, stack)` gives order n's runs in data order (h5py groups, files opened
    on the ExitStack). Chunks go through raw files in the folder `scratch` (plain files: what a kill
    leaves there goes with the segments), then are copied in blocks into datasets laid out as put_array
    lays them out (their length known only after the merge)."""
    like = Sparse.empty(True)
    _made_dir(scratch)
    for name in os.listdir(scratch):  # a kill's are ours to replace; spill_merged must not write through another's
        if _SCRATCH.fullmatch(name) and not remove_ours(scratch / name):
            raise UserError(f"{scratch / name} is not a file of ffnscope's (a link or another user's); remove it, "
                            "then run the command again")
    for n in NGRAM_ORDERS:
        with ExitStack() as stack:
            chunks = merged_chunks(sources(n, stack), counted, n in G_ORDERS)
            rows, files = spill_merged(chunks, scratch, n in G_ORDERS)
        for column in columns(n):
            dtype = getattr(like, column).dtype
            target = group.create_dataset(f"ngram{n}/{column}", shape=(rows,), dtype=dtype,
                                          **(_GZIP if compress and rows >= 4096 else {}))
            if rows:
                source = np.memmap(files[column], dtype, "r", shape=(rows,))
                for lo in range(0, rows, _BLOCK_ROWS):
                    target[lo:lo + _BLOCK_ROWS] = source[lo:lo + _BLOCK_ROWS]
                del source
            files[column].unlink()


_BLOCK_ROWS = 1 << 22  # rows of a merged column copied into the final file at a time


def missing_segments(f: h5py.File) -> list[str]:
    """Segment files a checkpoint names that are not beside it (copied or moved without them): its streams'
    (which hold the pairs' runs too), through the maps it names, and its pos_fire base."""
    if f.attrs.get("status") == schema.COMPLETE:
        return []
    return sorted(_missing(f, [*STREAMS, *(f"layers/{name}/pos_fire" for name in f.get("layers", {}))]))


def _missing(f: h5py.File, keys: list[str]) -> set[str]:
    """The files that the virtual datasets `keys` of `f`, and the maps among them, name and are not there
    (names relative to f's folder)."""
    names = {s.file_name for key in keys if key in f and f[key].is_virtual for s in f[key].virtual_sources()}
    missing = set()
    for name in names:
        file = Path(f.filename).parent / name
        if not file.is_file():
            missing.add(name)
        elif file.name.startswith("map"):
            with h5py.File(file, "r") as members:
                missing |= {str(Path(name).parent / inner) for inner in _missing(members, list(STREAMS))}
    return missing


def open_file(path: Path, purpose: str) -> h5py.File:
    """Open a cache for reading with a one-line error for everything that is not one of ours."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"cache not found: {path}; record one with `ffnscope record`")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a recording cache file (.h5)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not a readable HDF5 file (truncated or foreign); "
                        f"record it again or restore a good copy before {purpose}") from None
    try:
        form, version = f.attrs.get("format"), f.attrs.get("schema_version", -1)
    except (OSError, KeyError, RuntimeError):  # damaged attribute data: h5py cannot decode it
        f.close()
        raise UserError(f"{path} is damaged (its attributes cannot be read); record it again or restore a good "
                        f"copy before {purpose}") from None
    if form != schema.FORMAT:
        f.close()
        raise UserError(f"{path} is an HDF5 file but not an ffnscope recording; give a cache written "
                        "by `ffnscope record`")
    version = int(version) if isinstance(version, (int, np.integer)) else -1  # "two": not a version we know
    if version != schema.SCHEMA_VERSION:
        f.close()
        fix = ("record it again (older caches rank contexts by g and lack the g sums suppression needs)"
               if version < schema.SCHEMA_VERSION else "upgrade ffnscope or record again")
        raise UserError(f"{path} uses cache schema v{version}, this ffnscope reads v{schema.SCHEMA_VERSION}; {fix}")
    missing = missing_segments(f)
    if missing:
        f.close()
        raise UserError(f"{path} is a partial recording whose segment files are missing ({missing[0]}"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); copy the directory "
                        f"{segments_dir(path).name} beside it, or record again")
    try:
        check_recording(f, path)  # meta, layout and shapes, before any reader uses them
    except UserError:
        f.close()
        raise
    return f


def _put_strings(f: h5py.File, name: str, strings: list[str]) -> None:
    """Strings as one UTF-8 blob plus offsets: exact for any text, NUL and control characters
    included (HDF5's variable-length strings stop at NUL)."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    put_array(f, f"{name}/bytes", np.frombuffer(b"".join(encoded), np.uint8))
    put_array(f, f"{name}/offsets", offsets)


def read_strings(f: h5py.File, name: str) -> list[str]:
    blob = f[f"{name}/bytes"][:].tobytes()
    offsets = f[f"{name}/offsets"][:]
    return [blob[a:b].decode("utf-8", "replace") for a, b in zip(offsets[:-1], offsets[1:])]


def read_sparse(group: h5py.Group) -> Sparse:
    """One `ngram{n}` group (g_sum only where the order carries it); a checkpoint's runs summed."""
    g_sum = group["g_sum"][:] if "g_sum" in group else None
    sparse = Sparse(group["gram"][:], group["neuron"][:], group["count"][:].astype(np.int64), g_sum)
    if group.attrs.get(RUNS_ATTR, False):
        return sum_runs(sparse, group.parent["ngram_counted"][:], g_sum is not None)
    return sparse


def read_state(path: Path, purpose: str, pairs: bool = True) -> RecordingState:
    """Load a whole cache into memory (for resume and merge); pairs=False: without the n-gram pairs (a
    resume carries them over from the checkpoint's runs, streamed: segment_runs_from)."""
    with open_file(path, purpose) as f:
        try:
            meta = json.loads(f.attrs["meta"])
            data = f["data"]
            grams = {int(name[4:]): GramCounts(data[name]["gram"][:], data[name]["count"][:])
                     for name in data if name.startswith("gram")}
            data_state = DataState(data["tokens"][:], data["seq_index"][:], data["domains"][:],
                                   data["unigram"][:], grams)
            layers = {int(name): read_layer(group, pairs) for name, group in f["layers"].items()}
            samples = Samples(f["samples/index"][:], f["samples/acts"][:])
            return RecordingState(meta, dict(sorted(layers.items())), data_state, samples,
                                  int(f.attrs["shards_done"]), str(f.attrs["status"]),
                                  read_strings(f, "tokenizer/vocab"), read_strings(f, "tokenizer/pieces"))
        except (KeyError, ValueError, OSError) as exc:
            raise UserError(f"{path} is damaged ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
                            "record it again") from None
