"""`ffnscope npl fit|substitute|functional|show FILE`: the Neuron Predictability Lens on a recording.
The first three are jobs (engine.npl.job: progress file beside the sidecar, ctrl-c stops cleanly);
`show` prints what the sidecar holds without loading a model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ffnscope.app.arg_types import (MAX_BATCH_TOKENS, MAX_RIDGE, MAX_SEEDS, bounded_float, byte_size, chunk_list,
                                    device, seed, tokens, whole)
from ffnscope.app.console import console as make_console
from ffnscope.app.safe_text import plain, printable

ACTIONS = ("fit", "substitute", "functional", "show")
DEFAULT_HELDOUT_SEQS = 16   # engine.npl.inputs (not imported here: --help stays light)
MAX_HELDOUT_SEQS = 1 << 20  # each a sequence the fit scores


def add_parser(sub) -> None:
    npl = sub.add_parser("npl", help="Neuron Predictability Lens: layer-to-layer maps, substitution perplexity",
                         description="Linear maps between the FFN activations of two layers (NPL paper), fit "
                                     "exactly from streamed sufficient statistics; substitution perplexity "
                                     "(Table 1, Fig. 4); functional and background neurons. Results go to "
                                     "FILE.npl.h5 beside the recording.")
    actions = npl.add_subparsers(dest="npl_action", metavar="ACTION", required=True)

    def common(p, model=True):
        p.add_argument("file", type=Path, help="the recording cache (.h5)")
        if model:
            p.add_argument("--device", type=device, default="auto",
                           help="cpu, cuda or cuda:N (default: cuda if present)")
            p.add_argument("--dtype", help="default: the recording's")
            p.add_argument("--model", help="default: the recording's model spec (checked by fingerprint)")
            p.add_argument("--batch-tokens", type=whole(1, MAX_BATCH_TOKENS), default=8192)
            p.add_argument("--device-memory", type=byte_size("--device-memory"),
                           help="bytes of weights kept on the device, like 24GiB; layers beyond it stream")
            p.add_argument("--host-memory", type=byte_size("--host-memory", host=True),
                           help="host memory the job may take, like 64GiB; on a CPU, layers beyond what it leaves "
                                "stream from the model's files")
            p.add_argument("--allow-pickle", action="store_true",
                           help="accept pickle weights (pytorch_model.bin) where the model has no safetensors")
            p.add_argument("--quiet", action="store_true", help="no progress bar")

    fit = actions.add_parser("fit", help="fit maps M_i->j; metrics on sequences the recording and fit did not use",
                             description="Fits on the first --tokens of the recording's sources (or --data), packed "
                                         "as the recording packed them; the held-out metrics come from the next "
                                         "--heldout-seqs sequences past both the recording's and the fit's (or from "
                                         "--heldout-data), none equal to a recorded or fit sequence.")
    common(fit)
    fit.add_argument("--pairs", default="adjacent",
                     help="adjacent (j-1 -> j, what substitution needs), grid (every 2nd layer, all pairs: "
                          "forward, backward, self), grid:K, or i:j,... (combinable; default: %(default)s)")
    fit.add_argument("--method", choices=("exact", "adagrad", "both"), default="exact",
                     help="exact: ridge solve of streamed X^T X, X^T Y in float64; adagrad: the paper's recipe "
                          "(lr 0.01, 10^4-token batches, one epoch); both: compare them (default: %(default)s)")
    fit.add_argument("--data", nargs="+", metavar="SRC", help="fit data (default: the recording's own sources)")
    fit.add_argument("--tokens", type=tokens, default=131072, help="tokens to fit on (default: %(default)s)")
    fit.add_argument("--heldout-seqs", type=whole(1, MAX_HELDOUT_SEQS), default=DEFAULT_HELDOUT_SEQS, metavar="N",
                     help="sequences held out for the metrics, past the recording's and the fit's "
                          "(default: %(default)s)")
    heldout_data(fit)
    removed(fit, "--holdout", "held-out sequences are no longer a fraction of the fit data: they come after the "
                              "recording's and the fit's; use --heldout-seqs N")
    fit.add_argument("--ridge", type=bounded_float(0, MAX_RIDGE), default=1e-6,
                     help="ridge, relative to the mean variance")
    fit.add_argument("--stats-dtype", choices=("float64", "float32"), default="float64",
                     help="the exact fit's batch products: float32 halves their memory and is faster on GPUs; "
                          "the accumulators stay float64 (default: %(default)s)")
    fit.add_argument("--memory", type=byte_size("--memory"),
                     help="bytes the fit's matrices may take, like 40GiB (default: what the device has free); "
                          "pairs that do not fit together go in several passes over the data")
    fit.add_argument("--seed", type=seed, help="document order (default: the recording's, so that the held-out "
                                                "sequences come after the recorded ones)")
    fit.add_argument("--force", action="store_true", help="replace existing maps (and their results)")

    subst = actions.add_parser("substitute", help="perplexity with chunks of layers substituted (Table 1)")
    common(subst)
    heldout_data(subst)
    removed(subst, "--data", "held-out text is given with --heldout-data FILE...", nargs="+")
    subst.add_argument("--tokens", type=tokens, help="at most this many held-out tokens (default: the fit's "
                                                     "held-out sequences, or 16 sequences of --heldout-data)")
    subst.add_argument("--chunks", type=chunk_list, help="which of the 4 chunks, like 1-4 or 2 (default: all)")
    subst.add_argument("--mappings", nargs="+", choices=("random", "zero", "identical", "npl"),
                       default=["random", "zero", "identical", "npl"])
    subst.add_argument("--seeds", type=whole(1, MAX_SEEDS, "each a pass over the data"), default=3,
                       help="random maps averaged (default: %(default)s)")
    subst.add_argument("--explicit", action="store_true",
                       help="also explicit-only substitution (later layers see actual outputs, the final "
                            "hidden state predicted ones)")
    subst.add_argument("--finegrained", action="store_true", help="also the Fig. 4 grid (neuron halves)")

    func = actions.add_parser("functional", help="functional and background neurons (NPL Sec. 5)")
    common(func)
    func.add_argument("--tokens", type=tokens, help="at most this many of the fit's held-out tokens (whole sequences)")

    show = actions.add_parser("show", help="print fitted maps, the layer-pair grid and results (no model needed)")
    common(show, model=False)
    show.add_argument("--method", default=None, help="which maps to draw (default: the first fitted)")


def heldout_data(p) -> None:
    p.add_argument("--heldout-data", nargs="+", metavar="FILE",
                   help="held-out text from other files, packed as the recording's data; refused if a sequence of "
                        "it equals one the recording or the fit used (default: the sources past both)")


def removed(p, option: str, why: str, nargs=None) -> None:
    """An option that no longer exists: refused in one line saying what replaced it (hidden from --help)."""
    def refuse(_text: str):
        raise argparse.ArgumentTypeError(f"{option} is gone: {why}")
    p.add_argument(option, type=refuse, nargs=nargs, help=argparse.SUPPRESS)


def run(args) -> int:
    return {"fit": _fit, "substitute": _substitute, "functional": _functional, "show": _show}[args.npl_action](args)


def _progress(args, console: Console) -> tuple[Progress, callable]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tokens]}"),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
                        disable=args.quiet or not console.is_terminal, transient=True)
    task = progress.add_task("starting", total=1.0, tokens="", rate="")

    def on_progress(f: dict) -> None:
        done, total = f.get("tokens_done"), f.get("tokens_total")
        fields = {"description": str(f.get("phase", ""))}
        if done is not None and total:
            fields.update(completed=done / total, tokens=f"{done:,}/{total:,} tok")
        if f.get("tokens_per_s"):
            fields["rate"] = f"{f['tokens_per_s']:,.0f} tok/s"
        progress.update(task, **fields)
    return progress, on_progress


def _job(args, run_job, config):
    from ffnscope.engine.jobs.stop import Stopped

    console = make_console(stderr=True)
    progress, on_progress = _progress(args, console)
    try:
        with progress:
            return run_job(config, command=sys.argv, on_progress=on_progress,
                           log=lambda m: console.print(plain(m), highlight=False))
    except Stopped:
        console.print("ffnscope: stopped; nothing was written (run the job again)", markup=False, highlight=False)
        raise KeyboardInterrupt from None


def _model_options(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, model=args.model, batch_tokens=args.batch_tokens,
                allow_pickle=args.allow_pickle, device_memory=args.device_memory, host_memory=args.host_memory)


def _fit(args) -> int:
    from ffnscope.engine.npl.job import NplFitConfig, fit_job

    report = _job(args, fit_job, NplFitConfig(
        args.file, pairs=args.pairs, method=args.method, data=args.data, tokens=args.tokens, seed=args.seed,
        heldout_seqs=args.heldout_seqs, heldout_data=args.heldout_data, ridge=args.ridge,
        stats_dtype=args.stats_dtype, memory=args.memory, force=args.force,
        **_model_options(args)))
    print(printable(f"wrote {report.path}"))  # a path (and what the lines name) can hold terminal escapes
    for line in report.lines:
        print(printable(line))
    return 0


def _substitute(args) -> int:
    from ffnscope.engine.npl.job import NplSubstituteConfig, substitute_job
    from ffnscope.engine.npl.report import heldout_line

    report = _job(args, substitute_job, NplSubstituteConfig(
        args.file, heldout_data=args.heldout_data, tokens=args.tokens, chunks=args.chunks,
        mappings=tuple(args.mappings),
        seeds=args.seeds, explicit=args.explicit, finegrained=args.finegrained, **_model_options(args)))
    print(report.table)
    if report.fine_table:
        print()
        print(report.fine_table)
    rates = report.tokens_per_s
    print(printable(heldout_line(report.heldout)))
    print(f"{report.tokens:,} predicted tokens; tokens/s: plain forward {rates['plain']:,.0f}, "
          f"with substitution {rates['substitution']:,.0f} ({rates['substitution'] / max(rates['plain'], 1e-9):.2f}x)")
    return 0


def _functional(args) -> int:
    from ffnscope.engine.npl.job import NplFunctionalConfig, functional_job
    from ffnscope.engine.npl.report import heldout_line

    report = _job(args, functional_job, NplFunctionalConfig(args.file, tokens=args.tokens, **_model_options(args)))
    print(report.table)
    print(printable(heldout_line(report.heldout)))
    return 0


def _show(args) -> int:
    from ffnscope.app.npl_text import fit_text, heatmap, results_text
    from ffnscope.cache.reader import CacheReader
    from ffnscope.engine.npl.overview import overview

    with CacheReader(args.file, "showing its NPL results") as reader:
        o = overview(args.file, reader.meta)
    console = make_console()
    console.print(fit_text(o))
    shown = [args.method] if args.method else ["exact"] if "exact" in o.pairs else list(o.pairs)[:1]
    for method in shown:
        console.print(heatmap(o, method))
    if o.exists:
        console.print(results_text(o))
    return 0 if not o.error else 2
