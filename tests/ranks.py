"""Local ranks forked from a process that has imported torch, transformers and weightcast once.

:func:`spawn` is :func:`weightcast.launch.local.spawn` (same arguments, results, failure
detection, stop and clean-up) with one difference: a rank is not a new interpreter (``python -m
weightcast.launch.local``, which spends seconds importing torch and transformers) but a child of
a multiprocessing forkserver that preloaded them, started in milliseconds. The child does what
the new interpreter does: its own session, the rank's whole environment and working directory,
stderr to the launcher's ``rank{N}.err``, one intra-op thread (``OMP_NUM_THREADS``, which torch
read at import in the forkserver), :func:`weightcast.launch.local._main` (phase file, result file,
a WeightcastError reported without a traceback), the ``atexit`` handlers, then its exit status.

Tests whose subject is a load's result use it; tests of the launcher itself, of a new
interpreter's behaviour (start-up, exit) or of a rank's private memory keep the real launcher.
"""
from __future__ import annotations

import atexit
import functools
import json
import multiprocessing
import os
import subprocess
import sys
import traceback
from typing import Any

from weightcast.launch import local

PRELOAD = ["torch", "torch.distributed", "weightcast.workers.api", "weightcast.workers.staging", "tests.faults",
           "accelerate", "transformers.initialization", "transformers.modeling_utils",
           "transformers.models.llama.modeling_llama"]
"""What the forkserver imports once (every rank needs them; model skeletons need accelerate and
transformers). The process has one forkserver, shared with tests.faults' ranks."""


class _Rank:
    """A forked rank seen through the ``subprocess.Popen`` methods the launcher uses."""

    def __init__(self, process: Any) -> None:
        self.process, self.pid, self.returncode = process, process.pid, None

    def poll(self) -> int | None:
        if self.returncode is None and self.process.exitcode is not None:
            self.returncode = self.process.exitcode  # negative: killed by that signal, as Popen
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired("forked rank", timeout)
        return self.returncode


def forkserver() -> Any:
    """The multiprocessing context whose forkserver preloads :data:`PRELOAD` (tests.faults and
    :func:`start_forked` both fork their ranks from it)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_forked(tmp: str, rank: int, fn: str, args: dict, env: dict[str, str]) -> _Rank:
    """``start`` for :func:`weightcast.launch.local.spawn`: one rank forked from the forkserver."""
    paths = [os.path.join(tmp, f"rank{rank}.{ext}") for ext in ("json", "phase", "err")]
    process = forkserver().Process(target=_rank_main, args=(fn, json.dumps(args), *paths, env, os.getcwd()),
                                 daemon=False)
    process.start()
    return _Rank(process)


def _rank_main(fn: str, args: str, out: str, phase: str, err: str, env: dict[str, str], cwd: str) -> None:
    """The forked rank: what ``python -m weightcast.launch.local`` does in a new interpreter."""
    os.setsid()  # the launcher stops a rank through its process group
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    import torch
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    try:
        status = local._main([fn, args, out, phase])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - an uncaught error: a traceback and status 1, as the interpreter
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


spawn = functools.partial(local.spawn, start=start_forked)
