"""--part auto: the part from torchrun's or a Slurm array's environment, {part} in --out, the GPU of a
torchrun process; and a real two-process torchrun recording whose merge equals one recording."""
import subprocess
import sys
from pathlib import Path

import pytest

from ffnscope.cache.errors import UserError
from ffnscope.cache.store import read_state
from ffnscope.engine.record.config import auto_device, auto_part, part_out
from tests.conftest import env_for_subprocess
from tests.helpers import FAST, assert_same_cache, record_tiny


@pytest.mark.parametrize("env, part", [
    ({"RANK": "0", "WORLD_SIZE": "1"}, (1, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (4, 4)),
    # torchrun inside a Slurm array: torchrun's ranks say which part
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "7",
      "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 2)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "16"}, (1, 16)),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, (1, 8)),
    # ids need not start at 0 or 1 (--array=5-8)
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "8",
      "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),
    # a stepped array (--array=0-6:2): ids 0 2 4 6
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "6",
      "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (4, 4)),
])
def test_auto_part_from_the_environment(env, part):
    assert auto_part(env) == part


@pytest.mark.parametrize("env, needles", [
    ({}, ["RANK and WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT",
          "--part i/n"]),
    ({"LOCAL_RANK": "0"}, ["RANK and WORLD_SIZE"]),
    ({"RANK": "0"}, ["WORLD_SIZE is not set"]),
    ({"WORLD_SIZE": "2"}, ["RANK is not set"]),
    ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x'", "whole number"]),
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["part 3/2", "out of range"]),
    ({"SLURM_ARRAY_TASK_ID": "3"}, ["SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT are not set"]),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"}, ["SLURM_ARRAY_TASK_COUNT is not set"]),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"},
     ["part 9/4", "out of range"]),
    # --array=1,2,9: three tasks, but not an evenly spaced range
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
      "SLURM_ARRAY_TASK_COUNT": "3"}, ["evenly spaced"]),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "4"}, ["evenly spaced"]),
])
def test_auto_part_refusals_say_what_to_set(env, needles):
    with pytest.raises(UserError) as err:
        auto_part(env)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_part_placeholder_in_out():
    assert part_out(Path("d/run.part{part}.h5"), (3, 8), auto=True) == Path("d/run.part3.h5")
    assert part_out(Path("part-{part}.h5"), (1, 1)) == Path("part-1.h5")
    assert part_out(Path("run.h5"), (2, 8)) == Path("run.h5")       # an explicit i/n names its own file
    assert part_out(Path("run.h5"), (1, 1), auto=True) == Path("run.h5")  # one process: one file
    with pytest.raises(UserError, match=r"put \{part\} in --out, like --out d/run\.part\{part\}\.h5"):
        part_out(Path("d/run.h5"), (1, 2), auto=True)


@pytest.mark.parametrize("env, count, device", [
    ({}, 0, "cpu"),
    ({"LOCAL_RANK": "3"}, 0, "cpu"),
    ({}, 4, "cuda"),
    ({"LOCAL_RANK": "0"}, 4, "cuda:0"),
    ({"LOCAL_RANK": "3"}, 4, "cuda:3"),
    ({"LOCAL_RANK": "1"}, 1, "cuda"),  # a launcher that shows each process only its own GPU
])
def test_auto_device_follows_local_rank(env, count, device):
    assert auto_device(env, count) == device


def test_auto_device_refuses_more_processes_than_gpus():
    with pytest.raises(UserError, match="LOCAL_RANK 4 but this node shows 4 GPUs"):
        auto_device({"LOCAL_RANK": "4"}, 4)
    with pytest.raises(UserError, match="LOCAL_RANK='a'"):
        auto_device({"LOCAL_RANK": "a"}, 2)


def test_torchrun_parts_merge_to_one_recording(model_dirs, text_file, tmp_path):
    """Two torchrun processes record part 1/2 and 2/2 into run.part1.h5 and run.part2.h5; merged, they
    equal one recording of the same settings."""
    model_dir = model_dirs["gpt2"]
    assert FAST == dict(seq_len=32, shard_tokens=256, batch_tokens=64, samples=40, topk=4, device="cpu",
                        calib_tokens=128)  # the command line below spells these out
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                "-m", "ffnscope", "record", "--part", "auto", "--model", str(model_dir), "--data", str(text_file),
                "--out", str(tmp_path / "run.part{part}.h5"), "--tokens", "768", "--seq-len", "32",
                "--shard-tokens", "256", "--batch-tokens", "64", "--samples", "40", "--topk", "4",
                "--calib-tokens", "128", "--device", "cpu", "--quiet"]
    run = subprocess.run(torchrun, env=env_for_subprocess(), capture_output=True, text=True, timeout=240,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    parts = sorted(tmp_path.glob("run.part*.h5"))
    assert [p.name for p in parts] == ["run.part1.h5", "run.part2.h5"]
    assert [read_state(p, "testing").meta["recording"]["part"] for p in parts] == [[1, 2], [2, 2]]
    merged = tmp_path / "run.h5"
    done = subprocess.run([sys.executable, "-m", "ffnscope", "merge", *map(str, parts), "--out", str(merged)],
                          env=env_for_subprocess(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record_tiny(tmp_path / "whole.h5", model_dir, [text_file])
    assert read_state(merged, "testing").meta["recording"]["parts"] == [[1, 2], [2, 2]]
    assert_same_cache(tmp_path / "whole.h5", merged, float_rtol=1e-12)
