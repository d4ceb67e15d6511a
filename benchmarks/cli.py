"""``python -m benchmarks``: the single-machine benchmark suite (``make bench`` runs the default).

Loads a ~2.5 GB random bf16 Llama and the real all-MiniLM-L6-v2 on N = 1, 2, 4 local ranks with
weightcast and its peers, warm and cold, and writes the results JSON, PNG plots and the tables
of BENCHMARKS.md (between its markers). ``--quick`` is a few-minute smoke run of the same
harness on small checkpoints; ``--gpu`` adds the CUDA figures where a GPU exists. See
:mod:`benchmarks.bench`. The installed ``weightcast bench`` runs this module from a checkout.
"""
from __future__ import annotations

import argparse
import shlex
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark weightcast against its peers on this machine",
                       description="Benchmark weightcast against per-rank transformers, safetensors, "
                       "accelerate, fastsafetensors and Run:ai's streamer on N local ranks.")
    p.add_argument("--quick", action="store_true", help="small checkpoints, N = 1 and 2, one trial")
    p.add_argument("--gpu", action="store_true", help="also measure page cache -> GPU (needs CUDA)")
    p.add_argument("--json", default=None, metavar="FILE", help="results JSON (default: OUT/results.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="bench_data", metavar="DIR", help="checkpoints and raw runs (default bench_data)")
    p.add_argument("--md", default=None, metavar="FILE",
                   help="markdown to write (default BENCHMARKS.md; with --quick OUT/BENCHMARKS-quick.md)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="PNG directory (default benchmarks/results; with --quick OUT/plots)")
    p.add_argument("--no-md", action="store_true", help="write no markdown")
    p.add_argument("--checkpoints", default=None, help="comma list of llama-1b, minilm, tiny")
    p.add_argument("--nproc", default=None, help="comma list of local rank counts, e.g. 1,2,4")
    p.add_argument("--trials", type=int, default=None, help="trials per loader and N (default 3)")
    p.add_argument("--loaders", default=None, help="comma list of loaders (default: all)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold page-cache set")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (fresh process) set")
    p.add_argument("--no-physical", action="store_true", help="skip the physical limits (and the simulation)")
    p.set_defaults(func=run_bench)


def _csv(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def _command() -> str:
    """The command line as typed (``weightcast bench ...``)."""
    args = sys.argv[1:]
    if args and args[0] == "bench":
        args = args[1:]
    return " ".join(["python", "-m", "benchmarks", *(shlex.quote(a) for a in args)])


def options_from_args(args: argparse.Namespace):
    """The suite Options the flags describe."""
    from dataclasses import replace

    from benchmarks.bench import Options, quick_options
    from benchmarks.loaders import LOADERS
    from weightcast.orchestrator.errors import ConfigError
    opts = quick_options(out=args.out) if args.quick else Options(out=args.out)
    changes: dict = {"gpu": args.gpu, "quiet": args.quiet, "json_path": args.json,
                     "command": _command()}
    if args.md:
        changes["md"] = args.md
    if args.no_md:
        changes["md"] = None
    if args.plots:
        changes["plots"] = args.plots
    if args.checkpoints:
        changes["checkpoints"] = _csv(args.checkpoints)
    if args.nproc:
        changes["nprocs"] = tuple(int(x) for x in _csv(args.nproc))
    if args.trials:
        changes.update(trials=args.trials, cold_trials=args.trials, e2e_trials=args.trials)
    if args.loaders:
        loaders = _csv(args.loaders)
        unknown = [x for x in loaders if x not in LOADERS]
        if unknown:
            raise ConfigError("Unknown loader", where="--loaders", got=", ".join(unknown),
                              expected=f"some of {', '.join(LOADERS)}")
        changes["loaders"] = loaders
        changes["cold_loaders"] = tuple(x for x in opts.cold_loaders if x in loaders)
        changes["e2e_loaders"] = tuple(x for x in opts.e2e_loaders if x in loaders)
    if args.no_cold:
        changes["cold_nproc"] = None
    if args.no_e2e:
        changes["e2e_nproc"] = None
    if args.no_physical:
        changes.update(physical=False, simulate=False)
    return replace(opts, **changes)


def run_bench(args: argparse.Namespace) -> int:
    import signal
    # SIGTERM unwinds like Ctrl-C, so the running torchrun job is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from benchmarks.bench import run_suite, write_outputs
    opts = options_from_args(args)
    suite = run_suite(opts)
    written = write_outputs(suite, opts)
    runs = len(suite.records)
    print(f"bench: {runs} trials in {suite.seconds / 60:.1f} min; {len(suite.failures)} loader(s) failed, "
          f"{len(suite.skipped)} skipped")
    for what, path in written.items():
        print(f"  {what}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks [options]``: errors print without a traceback and exit 2."""
    from weightcast.orchestrator.errors import WeightcastError
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv if argv[:1] == ["bench"] else ["bench", *argv])
    try:
        return int(args.func(args) or 0)
    except WeightcastError as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m benchmarks: interrupted", file=sys.stderr)
        return 130
