"""Running benchmark jobs: ``torchrun --standalone --nproc-per-node N -m benchmarks.rank SPEC``.

:func:`run_job` runs a list of steps (``[loader, trial, checkpoint, mode]``) on N local ranks
(one job per N: the ranks import torch and the loaders once) and returns the
records rank 0 appended, plus one failure per loader that could not run. A loader that raises
(on any rank) or a job that dies or runs out of time costs that loader its remaining steps; the
job is relaunched with the other loaders' steps. Called by :mod:`benchmarks.bench` (parent).
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

ProgressFn = Callable[[dict], None]


@dataclass
class JobResult:
    records: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    started: list[dict] = field(default_factory=list)  # one "started" event per launch


def rank_env() -> dict[str, str]:
    """The environment every benchmark rank gets (FASTSAFETENSORS_ODIRECT is set per trial by
    :mod:`benchmarks.rank`: O_DIRECT, fastsafetensors' default, for cold trials only)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               RUNAI_STREAMER_DIST="1", PYTHONUNBUFFERED="1")
    return env


def torchrun_cmd(world: int, spec_path: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "benchmarks.rank", spec_path]


def _read_lines(path: str, skip: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        lines = fh.read().splitlines()
    out = []
    for line in lines[skip:]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written
    return out


def _launch(world: int, spec: dict, workdir: str, tag: str, env: dict) -> tuple[subprocess.Popen, str]:
    spec_path = os.path.join(workdir, f"{tag}.spec.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    log = os.path.join(workdir, f"{tag}.log")
    proc = subprocess.Popen(torchrun_cmd(world, spec_path), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, cwd=_repo_root())
    return proc, log


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait(proc: subprocess.Popen, results: str, deadline: float, on_record: ProgressFn | None) -> None:
    """Wait for the job (or the deadline), reporting each new trial record as it appears."""
    seen = 0
    while True:
        lines = _read_lines(results, seen)
        seen += len(lines)
        for r in lines:
            if "loader" in r and on_record is not None:
                on_record(r)
        if proc.poll() is not None or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-n:]
    except OSError:
        return ""


def run_job(sources: dict[str, str], world: int, steps: list[list], workdir: str, tag: str, *,
            timeout: float = 900.0, on_record: ProgressFn | None = None, t_launch: float | None = None,
            extra_spec: dict | None = None) -> JobResult:
    """Run ``steps`` (``[loader, trial, checkpoint, mode]``) on ``world`` ranks, relaunching
    after a failing loader; ``sources`` maps checkpoint names to directories. See module doc."""
    workdir = os.path.abspath(workdir)  # the ranks run in the repository root
    os.makedirs(workdir, exist_ok=True)
    out = JobResult()
    todo = [list(s) for s in steps]
    attempt = 0
    while todo:
        attempt += 1
        results = os.path.join(workdir, f"{tag}.{attempt}.jsonl")
        for stale in glob.glob(results + "*"):
            os.remove(stale)
        spec = {"sources": sources, "steps": todo, "results": results, "timeout": min(timeout, 600.0),
                "t_launch": t_launch or time.time(), **(extra_spec or {})}
        proc, log = _launch(world, spec, workdir, f"{tag}.{attempt}", rank_env())
        try:
            _wait(proc, results, time.monotonic() + timeout, on_record)
        finally:
            _stop(proc)
        lines = _read_lines(results, 0)
        out.started += [r for r in lines if r.get("event") == "started"]
        done = [r for r in lines if "loader" in r]
        out.records += done
        todo = todo[len(done):]
        if not todo:
            break
        failed = _failure(results, todo[0], proc.returncode, log)
        out.failures.append({**failed, "world": world})
        key = (failed["loader"], failed["checkpoint"], failed["mode"])
        todo = [s for s in todo if (s[0], s[2], s[3]) != key]
    return out


def _failure(results: str, current: list, returncode: int | None, log: str) -> dict:
    """The failure of the step the job stopped in: a rank's own record, else the job's log."""
    for path in sorted(glob.glob(results + ".fail.*")):
        with open(path) as fh:
            rec = json.load(fh)
        return {"loader": rec["loader"], "checkpoint": rec["checkpoint"], "mode": rec["mode"],
                "error": rec["error"], "detail": rec["traceback"][-1500:]}
    why = "timed out" if returncode in (None, -9) else f"exit status {returncode}"
    return {"loader": current[0], "checkpoint": current[2], "mode": current[3],
            "error": f"the job died ({why}) in this loader", "detail": _tail(log)}
