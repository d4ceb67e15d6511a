"""Offline repair of a Hugging Face cache, from what :func:`weightcast.orchestrator.cache_doctor.verify_cache` found.

Called through :func:`repair_cache` (``weightcast cache repair``).
Every change keeps the content: a plain copy is hard-linked into ``blobs/`` before a link is
swapped in for it with one atomic rename; refs are rewritten through a temporary file and a rename.
"""
from __future__ import annotations

import filecmp
import fnmatch
import os
import shlex
import shutil

from weightcast.orchestrator.cache_doctor import (
    ABSOLUTE_LINK, CANNOT, COMMIT_RE, DANGLING_LINK, HASH_MISMATCH, LFS_POINTER, PLAIN_COPY,
    REF_NO_SNAPSHOT, REF_NOT_COMMIT, REF_WHITESPACE, TEXT_LINK, UNREADABLE, UNREADABLE_BY_OTHERS,
    CacheReport, FileStatus, ModeCheck, RefStatus, digest, verify_cache, walk_snapshot)

# The LFS patterns of the .gitattributes the Hub writes into every new repo (used when the
# snapshot has none); files over 10 MiB are LFS on the Hub whatever their name.
_DEFAULT_LFS = ("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
                "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
                "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar.*",
                "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
                "*.gguf")
_LFS_MIN_SIZE = 10 * 1024 * 1024


def _say(dry_run: bool, todo: str, done: str) -> str:
    return f"would {todo}" if dry_run else done


def _lfs_patterns(snap: str) -> tuple[str, ...]:
    """The LFS patterns of the snapshot's .gitattributes (the Hub's defaults when it has none)."""
    try:
        with open(os.path.join(snap, ".gitattributes"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return _DEFAULT_LFS
    pats = tuple(ln.split()[0] for ln in lines if "filter=lfs" in ln and not ln.lstrip().startswith("#"))
    return pats or _DEFAULT_LFS


def _blob_id_for(path: str, name: str, snap: str, blobs: str) -> str:
    """The id the Hub gives this content (sha256 for LFS files, git sha1 otherwise); an existing blob wins."""
    lfs = os.path.getsize(path) >= _LFS_MIN_SIZE or any(
        fnmatch.fnmatch(name, p) or fnmatch.fnmatch(os.path.basename(name), p) for p in _lfs_patterns(snap))
    ids = [digest(path, kind) for kind in (("sha256",) if lfs else ("git", "sha256"))]
    return next((i for i in ids if os.path.exists(os.path.join(blobs, i))), ids[0])


def _replace_with_link(path: str, blob_path: str) -> None:
    """Replace ``path`` by a relative link to ``blob_path`` atomically: ``path`` never goes missing."""
    tmp = path + ".weightcast-link.tmp"
    if os.path.islink(tmp):
        os.unlink(tmp)
    os.symlink(os.path.relpath(blob_path, os.path.dirname(path)), tmp)
    os.replace(tmp, path)


def _store_blob(path: str, blob_path: str) -> None:
    """Make ``blob_path`` hold ``path``'s content: a hard link (no copy), else a synced copy + rename."""
    try:
        os.link(path, blob_path)
    except OSError:
        tmp = blob_path + ".weightcast.tmp"
        shutil.copy2(path, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, blob_path)


def _repair_copy(report: CacheReport, name: str, dry_run: bool) -> list[str]:
    path, blobs = os.path.join(report.snapshot_dir, name), os.path.join(report.repo_dir, "blobs")
    if not os.access(path, os.R_OK):
        return [f"not changed: {name}: this user cannot read it (rerun with --chmod)"]
    blob = _blob_id_for(path, name, report.snapshot_dir, blobs)
    blob_path = os.path.join(blobs, blob)
    exists = os.path.exists(blob_path)
    if exists and not filecmp.cmp(path, blob_path, shallow=False):
        return [f"not changed: {name}: blobs/{blob} exists with other content (see `verify --hash`)"]
    if not dry_run:
        os.makedirs(blobs, exist_ok=True)
        if not exists:
            _store_blob(path, blob_path)
        _replace_with_link(path, blob_path)
    if exists:
        return [_say(dry_run, f"link {name} to the identical blobs/{blob}", f"linked {name} to the "
                     f"identical blobs/{blob}") + " (it was a plain copy)"]
    return [_say(dry_run, f"move {name} into blobs/{blob} and link it",
                 f"moved {name} into blobs/{blob} and linked it") + " (it was a plain copy)"]


def _repair_file(report: CacheReport, f: FileStatus, dry_run: bool) -> tuple[list[str], bool]:
    """-> (actions, whether the file must be fetched again)."""
    if PLAIN_COPY in f.problems:
        return _repair_copy(report, f.name, dry_run), False
    if HASH_MISMATCH in f.problems or LFS_POINTER in f.problems:
        return [], True
    if not {DANGLING_LINK, TEXT_LINK, ABSOLUTE_LINK} & set(f.problems):
        return [], False
    local = os.path.join(report.repo_dir, "blobs", f.blob or "-")
    if f.blob and os.path.isfile(local):
        if not dry_run:
            _replace_with_link(os.path.join(report.snapshot_dir, f.name), local)
        return [_say(dry_run, "relink", "relinked") + f" {f.name} -> blobs/{f.blob} (it was {f.status})"], False
    if f.status == ABSOLUTE_LINK:
        return [f"not changed: {f.name}: absolute link outside this repo's blobs/"], False
    return [], True


def _repair_ref(report: CacheReport, ref: RefStatus, dry_run: bool) -> list[str]:
    if REF_WHITESPACE not in ref.problems or not COMMIT_RE.fullmatch(ref.commit):
        return []
    if not dry_run:
        path = os.path.join(report.repo_dir, "refs", ref.name)
        tmp = path + ".weightcast.tmp"
        with open(tmp, "w") as fh:
            fh.write(ref.commit)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    return [_say(dry_run, "strip", "stripped") + f" the whitespace from refs/{ref.name} ({ref.commit})"]


def _repair_modes(report: CacheReport, dry_run: bool) -> list[str]:
    """Give others read on every file the snapshot and refs use, and r-x on the directories above."""
    modes, snap = ModeCheck(os.path.dirname(report.repo_dir)), report.snapshot_dir
    paths = [os.path.join(snap, n) for n in walk_snapshot(snap)] if snap and os.path.isdir(snap) else []
    paths += [os.path.join(report.repo_dir, "refs", r.name) for r in report.refs]
    todo = dict.fromkeys(c for p in paths if os.path.exists(p) for c in modes.closed(p))
    actions = []
    for path in todo:
        mode = os.stat(path).st_mode & 0o7777
        new = mode | (0o555 if os.path.isdir(path) else 0o444)
        try:
            if not dry_run:
                os.chmod(path, new)
        except OSError as exc:
            actions.append(f"not changed: chmod {path}: {exc.strerror}")
            continue
        actions.append(_say(dry_run, "chmod", "chmod") + f" {mode:o} -> {new:o} {path}")
    return actions


def fetch_command(repo_id: str, names: list[str], commit: str, cache_dir: str) -> str:
    """The `hf download` command that fetches ``names`` of ``commit`` again into ``cache_dir``."""
    files = "".join(f" {shlex.quote(n)}" for n in names)
    return (f"hf download {repo_id}{files} --revision {commit} --cache-dir {shlex.quote(cache_dir)}"
            + (" --force-download" if names else ""))


def _advice(report: CacheReport, refetch: list[str], chmod: bool) -> list[str]:
    cache = os.path.dirname(report.repo_dir)
    later = ("(on a machine with network access; older huggingface_hub: `huggingface-cli download` with "
             "the same arguments), then copy the repo folder here with its links (`rsync -a`)")
    lines = []
    if refetch:
        lines.append(f"{CANNOT}: {', '.join(refetch)}: the content is not in this cache; fetch again with "
                     f"`{fetch_command(report.repo_id, refetch, report.commit, cache)}` {later}")
    missing = {r.commit for r in report.refs if REF_NO_SNAPSHOT in r.problems}
    if report.commit and report.snapshot_dir and not os.path.isdir(report.snapshot_dir):
        missing.add(report.commit)
    lines += [f"{CANNOT}: snapshot {c} is not in this cache; fetch it with "
              f"`{fetch_command(report.repo_id, [], c, cache)}` {later}" for c in sorted(missing)]
    lines += [f"{CANNOT}: {i}" for i in report.issues if "missing: no such ref" in i]
    lines += [f"{CANNOT}: refs/{r.name}: {r.detail}" for r in report.refs if REF_NOT_COMMIT in r.problems]
    closed = [x.name for x in (*report.refs, *report.files)
              if {UNREADABLE, UNREADABLE_BY_OTHERS} & set(x.problems)]
    if closed and not chmod:
        lines.append(f"not changed: modes of {', '.join(closed)} (rerun with --chmod)")
    return lines


def repair(report: CacheReport, *, chmod: bool = False, dry_run: bool = False) -> list[str]:
    """Repair what ``report`` found (see :func:`repair_cache`)."""
    actions = [a for r in report.refs for a in _repair_ref(report, r, dry_run)]
    if chmod:
        actions += _repair_modes(report, dry_run)
    refetch: list[str] = []
    for f in report.files:
        done, lost = _repair_file(report, f, dry_run)
        actions += done
        refetch += [f.name] if lost else []
    if chmod:
        actions += [a for a in _repair_modes(report, dry_run) if a not in actions]
    return actions + _advice(report, refetch, chmod)


def repair_cache(source: str, *, cache_dir: str | None = None, revision: str | None = None,
                 chmod: bool = False, dry_run: bool = False) -> list[str]:
    """Undo what offline repair can undo; return one line per action done (or, dry run, to do).

    Plain copies become blobs + relative links (a hard link into blobs/, then an atomic swap of
    the link in place of the copy; a copy identical byte for byte to an existing blob is swapped
    for a link to it), links and text files whose blob is present are relinked, whitespace is
    stripped from refs, modes opened with ``chmod``. Never loses content; idempotent. Lines
    starting with ``cannot repair offline`` name what must be fetched again, with the command.
    Any single process; no network.
    """
    return repair(verify_cache(source, cache_dir=cache_dir, revision=revision), chmod=chmod, dry_run=dry_run)
