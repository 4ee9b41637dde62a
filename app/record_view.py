"""`ffnscope record`: the recording job with a rich progress bar, then the per-layer table."""
from __future__ import annotations

import sys

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ffnscope.app.console import console as make_console
from ffnscope.app.safe_text import printable


def _config(args):
    from ffnscope.engine.record.config import RecordConfig

    return RecordConfig(
        out=args.out, model=args.model, data=args.data, tokens=args.tokens, seq_len=args.seq_len,
        seed=args.seed, field=args.field, dtype=args.dtype, device=args.device, tau=args.tau,
        tau_rule=args.tau_rule, calib_tokens=args.calib_tokens,
        layers=args.layers, ngram_layers=args.ngram_layers, ngram_max_freq=args.ngram_max_freq, topk=args.topk,
        samples=args.samples, shard_tokens=args.shard_tokens, batch_tokens=args.batch_tokens,
        device_memory=args.device_memory, host_memory=args.host_memory, part=args.part,
        resume=args.resume, force=args.force, trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle)


def _kept(out) -> str:
    """What a stopped recording kept: its checkpoint, counted in shards."""
    from ffnscope.cache.errors import UserError
    from ffnscope.cache.reader import CacheReader

    try:
        with CacheReader(out) as reader:
            done, total = reader.shards_done, reader.provenance.recording.n_shards
    except (UserError, OSError, KeyError):
        done, total = 0, None
    if done:
        return f"the last checkpoint in {out} stands ({done} of {total} shards)"
    return f"no shard was finished, so {out} holds no recorded tokens yet"


def run_record(args, after=None) -> int:
    console = make_console(stderr=True)
    from ffnscope.engine.record.config import check_output

    config = _config(args)
    check_output(config)  # a bad --out, layers the model's config lacks: refused before torch is imported
    from ffnscope.engine.jobs.stop import Stopped
    from ffnscope.engine.record.job import record
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.fields[tokens]}"), TextColumn("{task.fields[rate]}"),
                        TimeRemainingColumn(), console=console, disable=args.quiet or not console.is_terminal,
                        transient=True)
    task = progress.add_task("loading", total=1.0, tokens="", rate="")

    def on_progress(f: dict) -> None:
        where = (f"calibrating {f['calibration_pass']}/{f['calibration_passes']}" if f["phase"] == "calibrating"
                 else f"shard {f['shard']}/{f['n_shards']}")
        progress.update(task, completed=f["tokens_done"] / max(f["tokens_total"], 1),
                        description=f"{where} layer {f['layer']}/{f['n_layers'] - 1}",
                        tokens=f"{f['tokens_done']:,}/{f['tokens_total']:,} tok",
                        rate=f"{f['tokens_per_s']:,.0f} tok/s")

    try:
        with progress:
            state = record(config, command=sys.argv, on_progress=on_progress, after=after,
                           log=lambda m: console.print(printable(m), markup=False, highlight=False))
    except Stopped:
        console.print(printable(f"ffnscope: stopped; {_kept(config.out)}. Continue with the same command and "
                                "--resume"), markup=False, highlight=False)
        return 130
    console.print(printable(f"recorded {state.n_tokens:,} tokens into {config.out}"), markup=False, highlight=False)
    from ffnscope.app.info_view import print_info

    print_info(config.out)
    return 0
