"""Run a check as an ordinary user, also when the tests run as root (as CI does).

Root reads every file whatever its mode, so a check of "this user cannot read that file" means
nothing under root. :func:`as_unprivileged` runs a function in a forked child that has dropped to
a throw-away system user (created with ``useradd`` for the call, removed with ``userdel`` after);
when the tests already run as an ordinary user it simply calls the function. The child is forked
rather than started with ``runuser``/``setpriv``: it keeps the modules this process imported, so
the user needs no access to the checkout or the virtual environment (a clone under /root, say).
Only paths the check touches must be reachable by the user: :func:`shared_tmpdir` makes one.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import pwd
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def shared_tmpdir() -> Iterator[str]:
    """A temporary directory every user can enter (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="weightcast-unpriv-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    """A new system user without home or shell (root only); deleted on exit."""
    name = f"wctest{os.getpid()}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", name], check=True, capture_output=True, timeout=60)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


def as_unprivileged(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """``fn()`` run as a user who is not root; its result, or its exception raised here."""
    if os.geteuid() != 0:
        return fn()
    with throwaway_user() as user:
        return _forked_as(user.pw_uid, user.pw_gid, fn, timeout)


def _forked_as(uid: int, gid: int, fn: Callable[[], Any], timeout: float) -> Any:
    """Fork; the child drops to ``uid``/``gid``, runs ``fn`` and pickles (ok, value) back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            _send(write_end, uid, gid, fn)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = _read_all(read_end, time.monotonic() + timeout)
    finally:
        os.close(read_end)
        _reap(pid)
    if not data:
        raise RuntimeError("the unprivileged child died without a result")
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value


def _send(fd: int, uid: int, gid: int, fn: Callable[[], Any]) -> None:
    """In the child: drop root, run ``fn``, write (ok, value or exception) to ``fd``."""
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        outcome = (True, fn())
    except BaseException as exc:  # noqa: BLE001 - sent to the parent
        outcome = (False, exc)
    try:
        data = pickle.dumps(outcome)
    except Exception:  # noqa: BLE001 - e.g. pytest's outcome exceptions do not pickle
        value = outcome[1]
        data = pickle.dumps((False, AssertionError(f"{type(value).__name__}: {value}")))
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _read_all(fd: int, deadline: float) -> bytes:
    """Everything written to ``fd`` until the writer closes it, or TimeoutError at ``deadline``."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError("the unprivileged child did not finish in time")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int) -> None:
    """Wait for the child, killing it first if it is still running (after a timeout)."""
    done, _ = os.waitpid(pid, os.WNOHANG)
    if not done:
        time.sleep(0.1)
        if not os.waitpid(pid, os.WNOHANG)[0]:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
