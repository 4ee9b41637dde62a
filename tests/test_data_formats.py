"""Data sources researchers have on disk: .jsonl.gz, .jsonl.zst, .parquet and `save_to_disk` datasets
read as the plain .jsonl they hold would be (same documents, same order for the same seed)."""

import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ffnscope.engine.data import sources as data_module
from ffnscope.engine.data.sources import open_sources
from ffnscope.engine.data.packing import pack
from tests.tiny_tokenizer import BOS_ID, EOS_ID, make_tokenizer
from tests.test_data import user_error

DOMAINS = [None, "news", "code", None, "web"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        text = "   " if i % 97 == 5 else f"document {i}: " + "word " * (i % 7)
        record = {"text": text}
        if DOMAINS[i % len(DOMAINS)]:
            record["domain"] = DOMAINS[i % len(DOMAINS)]
        out.append(record)
    return out


def jsonl_bytes(rows: list[dict]) -> bytes:
    # A blank line and a trailing line without newline, which are not documents / are one.
    lines = [json.dumps(r) for r in rows]
    return ("\n".join(lines[:3] + [""] + lines[3:])).encode()


def table(rows: list[dict], field: str = "text") -> pa.Table:
    return pa.table({field: [r["text"] for r in rows], "domain": [r.get("domain") for r in rows],
                     "other": list(range(len(rows)))})


def write_dataset(root: Path, tab: pa.Table, shards: int = 2) -> Path:
    """A fake `save_to_disk` directory: Arrow IPC stream shards, state.json and dataset_info.json."""
    root.mkdir(parents=True)
    names = []
    step = -(-tab.num_rows // shards)
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        part = tab.slice(s * step, step)
        with pa.ipc.new_stream(str(root / name), part.schema) as writer:
            for batch in part.to_batches(max_chunksize=100):
                writer.write_batch(batch)
        names.append({"filename": name})
    (root / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "abc123",
                                                 "_split": "train"}))
    (root / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return root


def formats(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as .jsonl, .jsonl.gz, .parquet and a dataset, each with default domain 'data'."""
    out = {}
    for kind in ("jsonl", "gz", "parquet", "dataset"):
        (tmp_path / kind).mkdir()
    out["jsonl"] = tmp_path / "jsonl" / "data.jsonl"
    out["jsonl"].write_bytes(jsonl_bytes(rows))
    out["gz"] = tmp_path / "gz" / "data.jsonl.gz"
    out["gz"].write_bytes(gzip.compress(jsonl_bytes(rows)))
    out["parquet"] = tmp_path / "parquet" / "data.parquet"
    pq.write_table(table(rows), out["parquet"], row_group_size=700)
    out["dataset"] = write_dataset(tmp_path / "dataset" / "data", table(rows))
    return out


def read(path: Path, **kwargs) -> list[tuple[str, str]]:
    return [(d.text, d.domain) for d in open_sources([str(path)], **kwargs).documents()]


def test_formats_read_as_the_plain_jsonl(tmp_path, tokenizer):
    rows = records(2500)  # more than the first window of the shuffled order
    paths = formats(tmp_path, rows)
    for seed in (0, 3):
        expected = read(paths["jsonl"], seed=seed)
        assert len(expected) == 2500 - len([r for r in rows if r["text"].isspace()])
        for kind in ("gz", "parquet", "dataset"):
            assert read(paths[kind], seed=seed) == expected, kind

    def fingerprint(path: Path, seed: int) -> str:
        return pack(open_sources([str(path)], seed=seed).documents(), tokenizer, 32, 40, BOS_ID, EOS_ID).fingerprint()

    plain = fingerprint(paths["jsonl"], 1)
    assert plain != fingerprint(paths["jsonl"], 2)
    for kind in ("gz", "parquet", "dataset"):
        assert fingerprint(paths[kind], 1) == plain, kind


def test_mixed_with_other_sources_in_small_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_WINDOW_FIRST", 3)
    monkeypatch.setattr(data_module, "_WINDOW_MAX", 8)
    rows = records(60)
    paths = formats(tmp_path, rows)
    extra = tmp_path / "extra.txt"
    extra.write_text("an extra text file")

    def both(path: Path) -> list[tuple[str, str]]:
        return [(d.text, d.domain) for d in open_sources([str(path), str(extra)], seed=5).documents()]

    expected = both(paths["jsonl"])
    assert ("an extra text file", "extra") in expected
    for kind in ("gz", "parquet", "dataset"):
        assert both(paths[kind]) == expected, kind


def test_domains_and_describe(tmp_path):
    rows = records(10)
    paths = formats(tmp_path, rows)
    want = sorted((r["text"], r.get("domain") or "data") for r in rows if not r["text"].isspace())
    for kind in ("gz", "parquet", "dataset"):
        assert sorted(read(paths[kind])) == want, kind

    # Without a domain column the file's name (without its suffixes) or the dataset's folder labels.
    plain = pa.table({"text": ["alpha", "beta"]})
    pq.write_table(plain, tmp_path / "shard.parquet")
    assert sorted(read(tmp_path / "shard.parquet")) == [("alpha", "shard"), ("beta", "shard")]
    write_dataset(tmp_path / "wiki", plain, shards=1)
    assert sorted(read(tmp_path / "wiki")) == [("alpha", "wiki"), ("beta", "wiki")]

    described = open_sources([str(p) for p in paths.values()]).describe()
    json.dumps(described)
    assert [d["kind"] for d in described] == ["jsonl", "jsonl.gz", "parquet", "hf-dataset"]
    assert all(d["documents"] == 10 for d in described)
    assert described[1]["size"] == paths["gz"].stat().st_size
    assert described[2]["size"] == paths["parquet"].stat().st_size
    assert described[3]["fingerprint"] == "abc123"
    assert described[3]["size"] == sum(p.stat().st_size for p in paths["dataset"].glob("data-*.arrow"))


def test_dataset_directory_is_not_a_folder_of_text(tmp_path):
    root = write_dataset(tmp_path / "ds", pa.table({"text": ["only this"]}), shards=1)
    sources = open_sources([str(root)])
    assert [d.text for d in sources.documents()] == ["only this"]  # not state.json nor dataset_info.json
    assert sources.notes == []  # the .arrow file is read, not skipped as binary


def test_directory_reads_compressed_and_parquet_files(tmp_path):
    root = tmp_path / "mixed"
    (root / "web").mkdir(parents=True)
    (root / "web" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gz doc"}\n'))
    pq.write_table(pa.table({"text": ["pq doc"]}), root / "b.parquet")
    (root / "c.txt").write_text("txt doc")
    sources = open_sources([str(root)])
    assert sorted((d.text, d.domain) for d in sources.documents()) == [
        ("gz doc", "web"), ("pq doc", "mixed"), ("txt doc", "mixed")]
    assert sources.notes == []


def test_field_option(tmp_path):
    pq.write_table(pa.table({"content": ["x1", "x2"], "text": [1, 2]}), tmp_path / "c.parquet")
    assert sorted(read(tmp_path / "c.parquet", field="content")) == [("x1", "c"), ("x2", "c")]
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"content": "y"}\n'))
    assert read(tmp_path / "c.jsonl.gz", field="content") == [("y", "c")]


def test_missing_field_errors_name_file_field_and_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "a.parquet")
    message = user_error(lambda: open_sources([str(tmp_path / "a.parquet")]))
    assert str(tmp_path / "a.parquet") in message and "'text'" in message
    assert "'body'" in message and "'id'" in message and "--field" in message

    root = write_dataset(tmp_path / "ds", pa.table({"body": ["x"]}), shards=1)
    message = user_error(lambda: open_sources([str(root)], field="content"))
    assert str(root) in message and "'content'" in message and "'body'" in message

    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "ok"}\n\n{"body": "x"}\n'))
    message = user_error(lambda: list(open_sources([str(gz)]).documents()))
    assert f"{gz} line 3" in message and "'text'" in message and "'body'" in message

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    message = user_error(lambda: open_sources([str(tmp_path / "n.parquet")]))
    assert "'text'" in message and "int64" in message


def test_broken_files_give_one_line_errors(tmp_path):
    bad_gz = tmp_path / "bad.jsonl.gz"
    bad_gz.write_bytes(b"not gzip at all")
    assert str(bad_gz) in user_error(lambda: open_sources([str(bad_gz)]))
    bad_pq = tmp_path / "bad.parquet"
    bad_pq.write_bytes(b"not parquet")
    assert str(bad_pq) in user_error(lambda: open_sources([str(bad_pq)]))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:-30])
    assert str(truncated) in user_error(lambda: open_sources([str(truncated)]))
    damaged = write_dataset(tmp_path / "damaged", pa.table({"text": ["x" * 100] * 500}), shards=1)
    arrow = next(damaged.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-200])
    assert str(arrow) in user_error(lambda: open_sources([str(damaged)]))
    empty_ds = tmp_path / "empty_ds"
    empty_ds.mkdir()
    (empty_ds / "state.json").write_text("{}")
    assert "data-*.arrow" in user_error(lambda: open_sources([str(empty_ds)]))


def test_parquet_is_read_in_batches_not_whole(tmp_path, monkeypatch):
    rows = records(50)
    paths = formats(tmp_path, rows)
    expected = read(paths["jsonl"])

    def refuse(*args, **kwargs):
        raise AssertionError("read whole")

    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    assert read(paths["parquet"]) == expected


def _zstd_compress(data: bytes) -> bytes | None:
    try:
        from compression import zstd
        return zstd.compress(data)
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard.ZstdCompressor().compress(data)


def test_zst_works_or_says_how_to_install(tmp_path):
    rows = records(30)
    (tmp_path / "data.jsonl").write_bytes(jsonl_bytes(rows))
    path = tmp_path / "data.jsonl.zst"
    compressed = _zstd_compress(jsonl_bytes(rows))
    if compressed is None:
        path.write_bytes(b"\x28\xb5\x2f\xfd not really")
        message = user_error(lambda: open_sources([str(path)]))
        assert str(path) in message and "pip install zstandard" in message
    else:
        path.write_bytes(compressed)
        assert read(path) == read(tmp_path / "data.jsonl")
        assert open_sources([str(path)]).describe()[0]["kind"] == "jsonl.zst"


def test_zst_without_a_decompressor_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "compression.zstd", None)
    monkeypatch.setitem(sys.modules, "compression", None)
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd whatever")
    message = user_error(lambda: open_sources([str(path)]))
    assert message.startswith(str(path)) and "pip install zstandard" in message
