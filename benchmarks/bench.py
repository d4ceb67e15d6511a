"""The single-machine benchmark suite behind ``weightcast bench`` (and ``make bench``).

:func:`run_suite` (parent process, not collective) does, in order:

1. records the machine (cores, memory, kernel, CPU, versions, load average);
2. makes or fetches the checkpoints (:mod:`benchmarks.checkpoints`);
3. measures the physical limits (:mod:`benchmarks.physical`) on the largest checkpoint;
4. for every N: one torchrun job running every applicable loader on every checkpoint
   ``trials`` times, trials of different loaders interleaved, the page cache warmed right
   before each trial (:mod:`benchmarks.jobs`, :mod:`benchmarks.rank`); at ``cold_nproc`` the
   same job then runs the cold set: the replicate loaders on the first checkpoint, each file
   dropped from the page cache (``posix_fadvise(DONTNEED)``) before each trial;
5. end to end: fresh torchrun jobs, clock started before launching torchrun and stopped when
   every rank has loaded and touched every page (page cache warmed just before the launch);
6. ``weightcast plan --simulate`` with the measured bandwidths (:mod:`benchmarks.simulate`);
7. with ``gpu``, the CUDA figures (:mod:`benchmarks.gpu`);

then summarizes, writes the JSON results, the plots and the markdown (:mod:`benchmarks.markdown`).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmarks import checkpoints
from benchmarks.jobs import run_job
from benchmarks.loaders import LOADERS

# the slow last in each round; the memory-hungry (LAST) after every other trial of the job: a
# loader killed mid-job costs a relaunch (the ranks import everything again)
WARM_LOADERS = ("wc_replicate_node-shared", "from_pretrained", "load_file", "mmap_touch", "wc_tp_node-shared",
                "tp_auto", "wc_auto_node-shared", "accelerate", "wc_tp_collective", "wc_auto_collective",
                "wc_replicate_collective", "fastsafetensors_tp", "fastsafetensors", "runai")
LAST = ("runai",)
COLD_LOADERS = ("wc_replicate_node-shared", "from_pretrained", "load_file", "mmap_touch", "fastsafetensors")
E2E_LOADERS = ("wc_replicate_node-shared", "from_pretrained")


@dataclass(frozen=True, slots=True)
class Options:
    out: str = "bench_data"
    checkpoints: tuple[str, ...] = ("llama-1b", "minilm")
    nprocs: tuple[int, ...] = (1, 2, 4)
    trials: int = 3
    loaders: tuple[str, ...] = WARM_LOADERS
    cold_nproc: int | None = 4
    cold_loaders: tuple[str, ...] = COLD_LOADERS
    cold_trials: int = 3
    e2e_nproc: int | None = 4
    e2e_loaders: tuple[str, ...] = E2E_LOADERS
    e2e_trials: int = 1
    physical: bool = True
    simulate: bool = True
    gpu: bool = False
    quiet: bool = False
    job_timeout: float = 900.0
    md: str | None = "BENCHMARKS.md"
    plots: str = "benchmarks/results"
    json_path: str | None = None
    command: str = "weightcast bench"


def quick_options(**overrides: Any) -> Options:
    """A few minutes: tiny synthetic Llama + MiniLM, N = 1 and 2, one trial, no end-to-end."""
    out = overrides.get("out", "bench_data")
    base = Options(out=out, checkpoints=("tiny", "minilm"), nprocs=(1, 2), trials=1, cold_nproc=2, cold_trials=1,
                   e2e_nproc=None, md=os.path.join(out, "BENCHMARKS-quick.md"), plots=os.path.join(out, "plots"))
    return replace(base, **overrides)


def machine() -> dict:
    """The facts BENCHMARKS.md states about the machine the figures come from."""
    import importlib.metadata as md

    import psutil
    import torch
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "safetensors", "accelerate", "fastsafetensors",
                "runai-model-streamer", "huggingface_hub", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_bytes": psutil.virtual_memory().total,
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "loadavg_start": os.getloadavg()}


@dataclass
class Suite:
    """Everything one run gathers (the JSON results are ``asdict`` of it)."""
    options: dict
    machine: dict
    checkpoints: dict = field(default_factory=dict)
    physical: dict | None = None
    records: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    e2e: list = field(default_factory=list)
    simulate: list = field(default_factory=list)
    gpu: dict | None = None
    seconds: float = 0.0


class Progress:
    """One tqdm bar over the bytes every planned trial loads (N x checkpoint per trial)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet,
                        desc="bench", dynamic_ncols=True, smoothing=0.05)
        self.quiet = quiet

    def note(self, text: str) -> None:
        if not self.quiet:
            self.bar.write(text)

    def step(self, nbytes: int, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(nbytes)

    def shrink(self, nbytes: int) -> None:
        """Planned trials that did not run (skipped or failed) leave the total."""
        self.bar.total = max(self.bar.n, self.bar.total - nbytes)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def skip_reason(loader: str, source: str, world: int) -> str | None:
    """Why ``loader`` cannot run on this checkpoint with ``world`` ranks (checked before running;
    each reason was observed as the loader's own error), or None."""
    placement = LOADERS[loader].placement
    if placement == "tp" and world == 1:
        return "tensor parallelism needs N >= 2"
    if placement != "tp":
        return None
    if loader == "tp_auto":
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(source)
        if not getattr(config, "base_model_tp_plan", None):
            return (f"transformers: `tp_size={world}` was requested, but `{config.architectures[0]}` has no "
                    "`tp_plan`")
        return None
    from benchmarks.loaders import tp_dims
    try:
        dims = tp_dims(source, world)
    except Exception as exc:  # noqa: BLE001 - the device map's own message says why
        return f"weightcast tp map: {str(exc).splitlines()[0][:200]}"
    if not any(d is not None for d in dims.values()):
        return "no tensor-parallel plan for this model: tp would replicate every tensor"
    if loader == "fastsafetensors_tp":
        return _fst_indivisible(source, dims, world)
    return None


def _fst_indivisible(source: str, dims: dict, world: int) -> str | None:
    from weightcast.orchestrator.checkpoint import load_index
    index = load_index(source)
    for name, dim in dims.items():
        if dim is not None and index.tensor(name).shape[dim] % world:
            return (f"fastsafetensors get_sharded needs dims N divides: {name} dim {dim} has "
                    f"{index.tensor(name).shape[dim]} rows")
    return None


def plan_steps(suite: Suite, opts: Options, world: int) -> list[list]:
    """The steps of the job on ``world`` ranks: warm trials of every checkpoint, loaders
    interleaved, then (at ``cold_nproc``) the cold trials of the first checkpoint. Loaders that
    cannot run are recorded in ``suite.skipped`` instead."""
    sets = [(name, "warm", opts.loaders, opts.trials) for name in suite.checkpoints]
    if world == opts.cold_nproc:
        sets.append((next(iter(suite.checkpoints)), "cold", opts.cold_loaders, opts.cold_trials))
    steps = []
    for name, mode, loaders, trials in sets:
        runnable = []
        for loader in loaders:
            why = skip_reason(loader, suite.checkpoints[name]["path"], world)
            if why:
                suite.skipped.append({"checkpoint": name, "world": world, "mode": mode, "loader": loader,
                                      "reason": why})
            else:
                runnable.append(loader)
        steps += [[loader, t, name, mode] for t in range(trials) for loader in runnable]
    return [s for s in steps if s[0] not in LAST] + [s for s in steps if s[0] in LAST]


def _sources(suite: Suite) -> dict[str, str]:
    return {name: c["path"] for name, c in suite.checkpoints.items()}


def _run_world(suite: Suite, opts: Options, prog: Progress, world: int, steps: list[list]) -> None:
    def on_record(r: dict) -> None:
        size = suite.checkpoints[r["checkpoint"]]["bytes"]
        prog.step(world * size, f"{r['checkpoint']} {r['mode']} N={world} {r['loader']} {r['wall_s']:.2f}s")

    job = run_job(_sources(suite), world, steps, os.path.join(opts.out, "runs"), f"n{world}",
                  timeout=opts.job_timeout, on_record=on_record)
    suite.records += job.records
    done = {(r["loader"], r["trial"], r["checkpoint"], r["mode"]) for r in job.records}
    prog.shrink(sum(world * suite.checkpoints[s[2]]["bytes"] for s in steps if tuple(s) not in done))
    for f in job.failures:
        suite.failures.append(f)
        prog.note(f"  {f['checkpoint']} {f['mode']} N={world}: {f['loader']} could not run: {f['error'][:200]}")


def _e2e(suite: Suite, opts: Options, prog: Progress, name: str) -> None:
    """Fresh torchrun jobs: launch -> every rank loaded and touched (page cache warmed first)."""
    from benchmarks.procfs import checkpoint_files, warm
    info = suite.checkpoints[name]
    world = opts.e2e_nproc
    for t in range(opts.e2e_trials):
        for loader in opts.e2e_loaders:
            warm(checkpoint_files(info["path"]))
            t_launch = time.time()
            job = run_job(_sources(suite), world, [[loader, t, name, "none"]], os.path.join(opts.out, "runs"),
                          f"e2e-n{world}-{loader}-{t}", timeout=opts.job_timeout, t_launch=t_launch)
            for r in job.records:
                seconds = r["time"] - t_launch
                suite.e2e.append({"checkpoint": name, "world": world, "loader": loader, "trial": t,
                                  "seconds": seconds, "load_s": r["wall_s"]})
                prog.step(world * info["bytes"], f"{name} end-to-end N={world} {loader} {seconds:.2f}s")
            suite.failures += [{**f, "mode": "end-to-end"} for f in job.failures]


def _simulate(suite: Suite, opts: Options) -> None:
    from benchmarks.physical import lower_bounds
    from benchmarks.simulate import cluster_yaml, predict
    if not suite.physical:
        return
    os.makedirs(os.path.join(opts.out, "runs"), exist_ok=True)
    for name, info in suite.checkpoints.items():
        for world in opts.nprocs:
            for cold in (False, True):
                if cold and world != opts.cold_nproc:
                    continue
                path = cluster_yaml(os.path.join(opts.out, "runs", f"cluster-n{world}{'-cold' if cold else ''}.yaml"),
                                    world, suite.physical, cold)
                bounds = lower_bounds(suite.physical, info["bytes"], world, cold)
                for dm in ("replicate", "tp", "auto"):
                    for transport in ("node-shared", "collective"):
                        if dm == "tp" and world == 1:
                            continue
                        suite.simulate.append({"checkpoint": name, "world": world, "mode": "cold" if cold else "warm",
                                               "device_map": dm, "transport": transport,
                                               "lower_bound_s": bounds.get(dm),
                                               **predict(info["path"], path, dm, transport)})


def run_suite(opts: Options) -> Suite:
    """Run everything the options ask for (see the module docstring); returns the Suite."""
    t0 = time.perf_counter()
    suite = Suite(options=asdict(opts), machine=machine())
    for name in opts.checkpoints:
        path = checkpoints.ensure(name, opts.out)
        from weightcast.orchestrator.checkpoint import load_index
        index = load_index(path)
        suite.checkpoints[name] = {"path": os.path.abspath(path), "bytes": index.total_bytes,
                                   "file_bytes": checkpoints.checkpoint_bytes(path), "files": len(index.files),
                                   "tensors": len(index.tensors)}
    plans = {world: plan_steps(suite, opts, world) for world in opts.nprocs}
    if opts.cold_nproc and opts.cold_nproc not in plans:
        plans[opts.cold_nproc] = [s for s in plan_steps(suite, opts, opts.cold_nproc) if s[3] == "cold"]
    first = next(iter(suite.checkpoints))
    total = sum(w * suite.checkpoints[s[2]]["bytes"] for w, steps in plans.items() for s in steps)
    if opts.e2e_nproc:
        total += opts.e2e_nproc * suite.checkpoints[first]["bytes"] * opts.e2e_trials * len(opts.e2e_loaders)
    prog = Progress(total, opts.quiet)
    try:
        if opts.physical:
            from benchmarks.physical import measure
            biggest = max(suite.checkpoints, key=lambda n: suite.checkpoints[n]["bytes"])
            suite.physical = measure(suite.checkpoints[biggest]["path"], lambda m: prog.note(f"physical: {m}"))
            suite.physical["host_memory"] = suite.machine["memory_bytes"]
        for world, steps in plans.items():
            _run_world(suite, opts, prog, world, steps)
        if opts.e2e_nproc:
            _e2e(suite, opts, prog, first)
    finally:
        prog.close()
    if opts.simulate:
        _simulate(suite, opts)
    if opts.gpu:
        from benchmarks.gpu import run as run_gpu
        suite.gpu = run_gpu(first, suite.checkpoints[first]["path"], os.path.join(opts.out, "runs"), opts.trials)
    suite.machine["loadavg_end"] = os.getloadavg()
    suite.seconds = time.perf_counter() - t0
    return suite


def write_outputs(suite: Suite, opts: Options) -> dict[str, str]:
    """The JSON results, the plots and the markdown; returns what was written where."""
    from benchmarks import markdown, report
    written = {}
    rows = report.summarize(suite.records)
    json_path = opts.json_path or os.path.join(opts.out, "results.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as fh:
        json.dump({**asdict(suite), "rows": rows}, fh, indent=1, default=str)
    written["json"] = json_path
    written.update(markdown.plots(suite, rows, opts.plots))
    if opts.md:
        written["markdown"] = markdown.write(suite, rows, opts.md, written)
    return written
