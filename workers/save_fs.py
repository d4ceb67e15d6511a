"""The file-system half of a save: a fresh temporary directory beside the target, durable
writes (fsync of files and directories, modes 0644 / 0755), and the commit that replaces the
target in one step, so a crash at any moment leaves the old or the new checkpoint complete.

Who calls what: ``weightcast.workers.save`` calls :func:`prepare` on rank 0 while planning,
:func:`write_json` / :func:`fsync_file` on the writing ranks, :func:`commit` on rank 0 after
every rank wrote its files, and :func:`cleanup` on every surviving rank after a failure.

The commit swaps the temporary directory and the target with ``renameat2(RENAME_EXCHANGE)``
(Linux; atomic), then removes what is now the old checkpoint. Where the exchange is unavailable
(other systems, some network file systems) it parks the target at ``OUT.old-<id>``, renames the
temporary directory to ``OUT`` and removes the parked one; :func:`cleanup` puts a parked
checkpoint back if a crash left ``OUT`` missing. Directories are always removed by first
renaming them to a unique name, so a removal never follows a directory that another rank has
just renamed into place.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from typing import Callable

from weightcast.orchestrator.errors import ConfigError, StorageError
from weightcast.orchestrator.save_plan import INDEX_NAME, SavePlan

FILE_MODE = 0o644
DIR_MODE = 0o755
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# weight files of a previous checkpoint that a new save replaces (others are carried over)
_STALE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|" + re.escape(INDEX_NAME))


def target_path(out_dir: str) -> str:
    """The absolute, symlink-resolved target directory; refuses non-directories and mount points."""
    out = os.path.realpath(os.path.abspath(os.path.expanduser(out_dir)))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError("The save target exists and is not a directory", where=out,
                          fix="pass a directory path (existing checkpoint directories are replaced)")
    if os.path.ismount(out):
        raise ConfigError("The save target is a mount point and cannot be replaced atomically", where=out,
                          fix="save into a directory inside it")
    return out


def prepare(plan: SavePlan) -> None:
    """Rank 0: create the parent directories and the empty temporary directory (mode 0755),
    held (see :func:`hold`) until :func:`release_all`; first reclaim what dead saves left."""
    parent = os.path.dirname(plan.out)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=DIR_MODE, exist_ok=True)
    reclaim_stale(plan.out)
    os.mkdir(plan.tmp, DIR_MODE)
    os.chmod(plan.tmp, DIR_MODE)
    hold(plan.tmp)


# Directories this process holds a shared lock on: path -> fd (released by release_all).
_HELD: dict[str, int] = {}


def hold(path: str, *, strict: bool = True) -> None:
    """Take a shared ``flock`` on the directory ``path`` for the rest of the save (every rank
    that writes into it), so no other save reclaims it (:func:`reclaim_stale`). The kernel drops
    the lock when the process dies, which is what marks the directory as a dead save's. With
    ``strict``, a directory that vanished or was replaced meanwhile is a StorageError; without,
    a missing directory is ignored (a rank that does not see it fails later, clearly)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except FileNotFoundError:
        if strict:
            raise StorageError("The save's temporary directory disappeared", where=path,
                               fix="another process removed it; save again") from None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:  # a file system without flock: the directory stays unlocked
        pass
    st = os.fstat(fd)
    try:
        same = os.stat(path).st_ino == st.st_ino and os.stat(path).st_dev == st.st_dev
    except FileNotFoundError:
        same = False
    if not same and strict:
        os.close(fd)
        raise StorageError("The save's temporary directory was removed while it was being locked", where=path,
                           fix="another save reclaimed it; run one save per target at a time and save again")
    _HELD[path] = fd


def release_all() -> None:
    """Drop every lock :func:`hold` took (each rank, at the end of a save, whatever happened)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def _unheld(path: str) -> int | None:
    """An fd holding an exclusive lock on ``path`` when no live process holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:  # held by a live save (or no flock here: never reclaim what we cannot tell)
        os.close(fd)
        return None


def reclaim_stale(out: str) -> list[str]:
    """Rank 0, before a save to ``out``: remove the ``OUT.tmp-*`` and trash directories of saves
    whose processes all died (no lock held), put back a parked ``OUT.old-*`` when ``OUT`` is
    missing, remove it when ``OUT`` exists. Not collective; never raises. -> what it removed."""
    parent, base = os.path.split(out)
    removed = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not (name.startswith(base + ".tmp-") or name.startswith(base + ".old-")):
            continue
        fd = _unheld(path)
        if fd is None:
            continue
        try:
            if name.startswith(base + ".old-") and ".trash-" not in name:
                if os.path.lexists(os.path.join(parent, base + ".tmp-" + name[len(base) + 5:])):
                    continue  # its save may be committing right now: the next save decides
                if not os.path.lexists(out):
                    os.rename(path, out)  # a save died between parking the old checkpoint and the swap
                    continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def fsync_file(path: str, mode: int = FILE_MODE) -> None:
    """Set ``path``'s mode and flush it to storage."""
    os.chmod(path, mode)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (names created or renamed in it) to storage."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as transformers writes its JSON files (indent 2, sorted keys, newline)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    fsync_file(path)


def check_written(plan: SavePlan) -> None:
    """Rank 0: every planned file is visible in the temporary directory (catches a target that
    is not on storage shared by every rank)."""
    for f in plan.files:
        path = os.path.join(plan.tmp, f.file)
        if not os.path.isfile(path) or os.path.getsize(path) < 8 + f.nbytes:
            raise StorageError("A shard written by another rank is missing or short", where=path,
                               expected=f"a file of at least {8 + f.nbytes} bytes written by rank {f.writer}",
                               got=f"{os.path.getsize(path)} bytes" if os.path.exists(path) else "no such file",
                               fix="save to a directory on storage every rank can see (a shared file system)")


def commit(plan: SavePlan, hook: Callable[[str, str], None]) -> None:
    """Rank 0: make the temporary directory the checkpoint at ``plan.out`` in one step."""
    fsync_dir(plan.tmp)
    parent = os.path.dirname(plan.out)
    if not os.path.lexists(plan.out):
        hook("commit", plan.out)
        os.rename(plan.tmp, plan.out)
        fsync_dir(parent)
        return
    carry_over(plan.out, plan.tmp)
    fsync_dir(plan.tmp)
    hook("commit", plan.out)
    if _exchange(plan.tmp, plan.out):
        fsync_dir(parent)
        hook("exchanged", plan.out)
        discard(plan.tmp, "commit")  # now the previous checkpoint
        return
    os.rename(plan.out, plan.old)
    hook("parked", plan.old)
    os.rename(plan.tmp, plan.out)
    fsync_dir(parent)
    discard(plan.old, "commit")


def carry_over(old_dir: str, new_dir: str) -> None:
    """Hard-link (or copy) into ``new_dir`` what the previous checkpoint holds besides its
    weights (tokenizer files, README, ...), unless the new save wrote a file of that name; as
    transformers' ``save_pretrained`` leaves such files in place."""
    produced = set(os.listdir(new_dir))
    for name in sorted(os.listdir(old_dir)):
        if name in produced or _STALE.fullmatch(name):
            continue
        src, dst = os.path.join(old_dir, name), os.path.join(new_dir, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), a)


def discard(path: str, who: str) -> None:
    """Remove a directory: rename it to a unique name first, then delete that."""
    trash = f"{path}.trash-{who}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def cleanup(plan: SavePlan, who: str) -> None:
    """After a failed save (every surviving rank): remove the temporary directory; if the
    target is missing while a parked previous checkpoint exists, put it back. Never raises."""
    try:
        discard(plan.tmp, who)
        if not os.path.lexists(plan.out) and os.path.isdir(plan.old):
            try:
                os.rename(plan.old, plan.out)
            except OSError:
                pass
        if os.path.lexists(plan.out):
            discard(plan.old, who)
    except OSError:
        pass
