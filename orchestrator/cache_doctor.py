"""Hugging Face cache inspection and repair, for caches copied between machines.

A cached repo is ``<cache>/models--org--name/{blobs,refs,snapshots}``: ``refs/<name>`` holds a
40-hex commit (no trailing newline), ``snapshots/<commit>/<path>`` is a relative symlink to
``../../blobs/<id>`` (id: sha256 of an LFS file, git blob sha1 of a small file). Copying a cache
breaks it in known ways; this module names each one per file and undoes what can be undone
offline. Nothing here touches the network; no threads.

Who calls what:
- ``weightcast cache verify`` -> :func:`verify_cache`; ``weightcast cache repair`` ->
  :func:`weightcast.orchestrator.cache_repair.repair_cache`.
- The loader (rank 0, or local rank 0 per node) calls :func:`check_snapshot_files` on the files it is
  about to parse, so a broken cache fails with a :class:`CacheError` naming the file, not a parse error.
- With node-local storage, each node computes :func:`snapshot_facts` and the coordinator calls
  :func:`compare_snapshots` on all of them before planning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass

from weightcast.orchestrator.errors import CacheError, CheckpointNotFoundError

OK = "ok"
DANGLING_LINK = "dangling-link"
TEXT_LINK = "link-turned-into-text"
LFS_POINTER = "lfs-pointer"
HASH_MISMATCH = "hash-mismatch"
UNREADABLE = "unreadable"
UNREADABLE_BY_OTHERS = "unreadable-by-others"
PLAIN_COPY = "plain-copy"
ABSOLUTE_LINK = "absolute-link"
REF_WHITESPACE = "trailing-whitespace"
REF_NOT_COMMIT = "not-a-commit"
REF_NO_SNAPSHOT = "missing-snapshot"
# Most severe first; the first five stop a load, the rest are warnings.
SEVERITY = (DANGLING_LINK, TEXT_LINK, LFS_POINTER, HASH_MISMATCH, UNREADABLE, UNREADABLE_BY_OTHERS, PLAIN_COPY,
            ABSOLUTE_LINK)
BLOCKING = frozenset({DANGLING_LINK, TEXT_LINK, LFS_POINTER, HASH_MISMATCH, UNREADABLE,
                      REF_WHITESPACE, REF_NOT_COMMIT, REF_NO_SNAPSHOT})
CANNOT = "cannot repair offline"

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_LINK_TEXT = re.compile(r"[^\s\x00]*blobs/(?:[0-9a-f]{40}|[0-9a-f]{64})")
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FileStatus:
    """One file of the snapshot: ``problems`` sorted most severe first, empty when ok."""
    name: str  # path relative to the snapshot directory, '/'-separated
    problems: tuple[str, ...] = ()
    detail: str = ""
    blob: str | None = None  # the blob id the snapshot entry points to (None: plain copy)

    @property
    def status(self) -> str:
        return self.problems[0] if self.problems else OK

    @property
    def blocking(self) -> bool:
        return any(p in BLOCKING for p in self.problems)


@dataclass(frozen=True, slots=True)
class RefStatus:
    """One file under ``refs/`` (e.g. ``main``, ``refs/pr/1``); ``commit`` is its stripped content."""
    name: str
    commit: str
    problems: tuple[str, ...] = ()
    detail: str = ""

    @property
    def status(self) -> str:
        return self.problems[0] if self.problems else OK


@dataclass(frozen=True, slots=True)
class CacheReport:
    """What :func:`verify_cache` found. ``issues``: repo-level problems that stop a load."""
    repo_dir: str
    revision: str | None  # the ref asked for ("main" by default); None for a snapshot path
    commit: str | None
    files: tuple[FileStatus, ...]
    refs: tuple[RefStatus, ...]
    issues: tuple[str, ...] = ()

    @property
    def repo_id(self) -> str:
        return os.path.basename(self.repo_dir).split("--", 1)[-1].replace("--", "/")

    @property
    def snapshot_dir(self) -> str | None:
        return None if self.commit is None else os.path.join(self.repo_dir, "snapshots", self.commit)

    def _blocking_refs(self) -> list[RefStatus]:
        return [r for r in self.refs if r.name == self.revision and set(r.problems) & BLOCKING]

    @property
    def loadable(self) -> bool:
        return (self.commit is not None and not self.issues and not self._blocking_refs()
                and not any(f.blocking for f in self.files))

    @property
    def problems(self) -> tuple[str, ...]:
        """One line per problem, ``what: kind: detail``, prefixed ``warning: `` when it does not stop a
        load (repo issues, then refs, then files)."""
        def line(name: str, x: FileStatus | RefStatus, blocks: bool) -> str:
            return f"{'' if blocks else 'warning: '}{name}: {', '.join(x.problems)}: {x.detail}"
        lines = list(self.issues)
        lines += [line(f"refs/{r.name}", r, r in self._blocking_refs()) for r in self.refs if r.problems]
        lines += [line(f.name, f, f.blocking) for f in self.files if f.problems]
        return tuple(lines)

    def to_json(self) -> dict:
        def item(x: FileStatus | RefStatus) -> dict:
            return dict(dataclasses.asdict(x), status=x.status)
        return {"repo_dir": self.repo_dir, "repo_id": self.repo_id, "revision": self.revision,
                "commit": self.commit, "loadable": self.loadable, "issues": list(self.issues),
                "problems": list(self.problems), "files": [item(f) for f in self.files],
                "refs": [item(r) for r in self.refs]}


# --- locating the repo ------------------------------------------------------------------------

def _snapshot_root(path: str) -> tuple[str, str] | None:
    """(repo_dir, commit) when ``path`` is ``.../models--*/snapshots/<commit>`` or inside one."""
    path = os.path.abspath(path)
    while os.path.dirname(path) != path:
        parent = os.path.dirname(path)
        if os.path.basename(parent) == "snapshots" and "--" in os.path.basename(os.path.dirname(parent)):
            return os.path.dirname(parent), os.path.basename(path)
        path = parent
    return None


def _default_cache_dir() -> str:
    from huggingface_hub import constants  # lazy: reads HF_HUB_CACHE / HF_HOME at its import
    return constants.HF_HUB_CACHE


def _locate(source: str, cache_dir: str | None, revision: str | None) -> tuple[str, str | None, str | None]:
    """-> (repo_dir, revision, commit given by a snapshot path)."""
    if os.path.lexists(source):
        snap = _snapshot_root(source)
        if snap:
            return snap[0], None, snap[1]
        if os.path.isdir(os.path.join(source, "snapshots")):
            return os.path.abspath(source), revision or "main", None
        raise CacheError("Not a Hugging Face cache repo or snapshot", where=source,
                         expected="a repo id, <cache>/models--org--name or .../snapshots/<commit>",
                         got="a path outside any cache", fix="pass the repo id with --cache-dir")
    cache_dir = cache_dir or _default_cache_dir()
    repo_dir = os.path.join(os.path.abspath(cache_dir), "models--" + source.replace("/", "--"))
    if not os.path.isdir(repo_dir):
        raise CheckpointNotFoundError(
            f"Repo {source!r} is not in the Hugging Face cache", where=repo_dir,
            fix=f"pass the cache that holds it with --cache-dir, or download it first: "
                f"`hf download {source} --cache-dir {cache_dir}`")
    return repo_dir, revision or "main", None


# --- inspection -------------------------------------------------------------------------------

class ModeCheck:
    """Finds what others cannot read: files without o+r, directories without o+rx (stat cached)."""

    def __init__(self, top: str) -> None:
        self.top = os.path.realpath(top)
        self._seen: dict[str, int] = {}

    def _mode(self, path: str) -> int:
        if path not in self._seen:
            self._seen[path] = os.stat(path).st_mode
        return self._seen[path]

    def _closed_dirs(self, d: str) -> list[str]:
        bad = []
        while (d == self.top or d.startswith(self.top + os.sep)) and d != os.path.dirname(d):
            if self._mode(d) & 0o005 != 0o005:
                bad.append(d)
            d = os.path.dirname(d)
        return bad

    def closed(self, path: str) -> list[str]:
        """What others cannot pass to read ``path``: the file it resolves to, then the directories
        (up to the cache dir) above the entry and above its blob."""
        real = os.path.realpath(path)
        bad = [real] if not self._mode(real) & 0o004 else []
        bad += self._closed_dirs(os.path.realpath(os.path.dirname(os.path.abspath(path))))
        return bad + [d for d in self._closed_dirs(os.path.dirname(real)) if d not in bad]


def _small_text(path: str) -> tuple[str, str] | None:
    """(kind, text) when a file is a symlink turned into text or a Git LFS pointer, else None."""
    try:
        if os.path.getsize(path) > 1024:
            return None
        with open(path, "rb") as f:
            text = f.read().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if _LINK_TEXT.fullmatch(text.replace("\\", "/")):
        return TEXT_LINK, text.replace("\\", "/")
    return (LFS_POINTER, text) if text.startswith("version https://git-lfs") else None


def digest(path: str, kind: str) -> str:
    """sha256 of the content (``kind="sha256"``) or its git blob sha1 (``kind="git"``)."""
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\x00" % os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_problem(content: str, blob: str) -> str | None:
    kind = {64: "sha256", 40: "git"}.get(len(blob)) if re.fullmatch(r"[0-9a-f]+", blob) else None
    if kind is None:
        return None
    actual = digest(content, kind)
    return None if actual == blob else f"content {'sha256' if kind == 'sha256' else 'git sha1'} is {actual}"


def _inspect_link(path: str) -> tuple[list[str], list[str], str | None, bool]:
    """-> (problems, notes, blob id, usable) for the snapshot entry itself."""
    if os.path.islink(path):
        target = os.readlink(path)
        blob = os.path.basename(target.replace("\\", "/"))
        if not os.path.exists(path):
            return [DANGLING_LINK], [f"link to {target}, which does not exist"], blob, False
        if os.path.isabs(target):
            return [ABSOLUTE_LINK], [f"absolute link to {target} (breaks when the cache moves)"], blob, True
        return [], [], blob, True
    small = _small_text(path)
    if small and small[0] == TEXT_LINK:
        return ([TEXT_LINK], [f"a {os.path.getsize(path)}-byte text file holding {small[1]!r} instead of "
                              f"the file (a symlink lost in a copy)"], os.path.basename(small[1]), False)
    if small:
        return [LFS_POINTER], ["a Git LFS pointer file, not the content"], None, False
    return [PLAIN_COPY], ["a regular file, not a link into blobs/: loads, without de-duplication"], None, True


def _inspect_file(snap: str, name: str, modes: ModeCheck, check_hash: bool) -> FileStatus:
    path = os.path.join(snap, name)
    problems, notes, blob, usable = _inspect_link(path)
    if usable:
        if not os.access(path, os.R_OK):
            problems.append(UNREADABLE)
            notes.append("this user cannot read it")
        elif closed := modes.closed(path):
            problems.append(UNREADABLE_BY_OTHERS)
            notes.append(f"other users cannot read {closed[0]} (mode {os.stat(closed[0]).st_mode & 0o777:o})")
        if check_hash and blob and os.path.islink(path) and UNREADABLE not in problems:
            if mismatch := _hash_problem(path, blob):
                problems.append(HASH_MISMATCH)
                notes.append(f"blob {blob} does not match its name: {mismatch}")
    problems.sort(key=SEVERITY.index)
    return FileStatus(name, tuple(problems), "; ".join(notes), blob)


def walk_snapshot(snap: str) -> list[str]:
    """Every file or link under the snapshot, relative, sorted (links to dirs are not followed)."""
    names = []
    for root, dirs, files in os.walk(snap):
        entries = files + [d for d in dirs if os.path.islink(os.path.join(root, d))]
        names += [os.path.relpath(os.path.join(root, f), snap).replace(os.sep, "/") for f in entries]
    return sorted(names)


def _read_refs(repo_dir: str, modes: ModeCheck) -> tuple[RefStatus, ...]:
    refs_dir = os.path.join(repo_dir, "refs")
    out = []
    for name in walk_snapshot(refs_dir) if os.path.isdir(refs_dir) else []:
        path = os.path.join(refs_dir, name)
        try:
            with open(path, "rb") as f:
                raw = f.read().decode("utf-8", "replace")
        except OSError as exc:
            out.append(RefStatus(name, "", (UNREADABLE,), f"cannot be read: {exc.strerror}"))
            continue
        commit, problems, notes = raw.strip(), [], []
        if raw != commit:
            problems.append(REF_WHITESPACE)
            notes.append(f"holds {raw!r}; the hub reads it verbatim and finds no snapshot")
        if not COMMIT_RE.fullmatch(commit):
            problems.append(REF_NOT_COMMIT)
            notes.append(f"{commit[:60]!r} is not a 40-hex commit")
        elif not os.path.isdir(os.path.join(repo_dir, "snapshots", commit)):
            problems.append(REF_NO_SNAPSHOT)
            notes.append(f"points to {commit}, which has no snapshots/{commit} here")
        if closed := modes.closed(path):
            problems.append(UNREADABLE_BY_OTHERS)
            notes.append(f"other users cannot read {closed[0]}")
        out.append(RefStatus(name, commit, tuple(problems), "; ".join(notes)))
    return tuple(out)


def _resolve_commit(repo_dir: str, revision: str | None, refs: tuple[RefStatus, ...]) -> tuple[str | None, list[str]]:
    if revision is not None and COMMIT_RE.fullmatch(revision):
        commit = revision
    else:
        ref = next((r for r in refs if r.name == revision), None)
        if ref is None:
            snaps = sorted(os.listdir(os.path.join(repo_dir, "snapshots"))) if os.path.isdir(
                os.path.join(repo_dir, "snapshots")) else []
            return None, [f"refs/{revision}: missing: no such ref (snapshots here: {', '.join(snaps) or 'none'}); "
                          f"pass --revision <commit>"]
        if not COMMIT_RE.fullmatch(ref.commit):
            return None, []
        commit = ref.commit
    if not os.path.isdir(os.path.join(repo_dir, "snapshots", commit)):
        return commit, [f"snapshots/{commit}: missing: no snapshot of this commit in the cache"]
    return commit, []


def verify_cache(source: str, *, cache_dir: str | None = None, revision: str | None = None,
                 check_hash: bool = False) -> CacheReport:
    """Inspect one cached repo revision (``source``: repo id or snapshot path). Any process; no network.

    ``check_hash`` re-hashes every linked blob (reads all bytes). Raises :class:`CacheError` /
    :class:`CheckpointNotFoundError` only when ``source`` is not a cached repo at all.
    """
    repo_dir, revision, commit = _locate(source, cache_dir, revision)
    modes = ModeCheck(os.path.dirname(repo_dir))
    refs = _read_refs(repo_dir, modes)
    issues: list[str] = []
    if commit is None:
        commit, issues = _resolve_commit(repo_dir, revision, refs)
    snap = os.path.join(repo_dir, "snapshots", commit or "-")
    names = walk_snapshot(snap) if os.path.isdir(snap) else []
    files = tuple(_inspect_file(snap, name, modes, check_hash) for name in names)
    return CacheReport(repo_dir, revision, commit, files, refs, tuple(issues))


# --- checks used by the loader and the coordinator --------------------------------------------

def _next_step(root: str) -> str:
    snap = _snapshot_root(root)
    if snap is None:
        return "copy the checkpoint again, keeping file contents (not links to elsewhere)"
    path = os.path.join(snap[0], "snapshots", snap[1])
    return f"run `weightcast cache verify {path}` to list every broken file, then `weightcast cache repair {path}`"


def _file_problem(path: str, name: str) -> tuple[str, str] | None:
    """(what is wrong, what was found) for a file the loader cannot use, else None."""
    if os.path.islink(path) and not os.path.exists(path):
        return "it is a dangling symlink (its blob was not copied)", f"a link to {os.readlink(path)}"
    if not os.access(path, os.R_OK):
        return "this user cannot read it", f"mode {os.stat(path).st_mode & 0o777:o}, owner uid {os.stat(path).st_uid}"
    size = os.path.getsize(path)
    small = _small_text(path)
    if small and small[0] == TEXT_LINK:
        return "it is a symlink turned into a text file", f"{size} bytes holding {small[1]!r}"
    if small:
        return "it is a Git LFS pointer, not the file (fetched without git-lfs)", f"{size} bytes of text"
    if size < 8 and name.endswith(".safetensors"):
        return "it is too small to be a safetensors file", f"{size} bytes"
    return None


def check_snapshot_files(root: str, names: list[str]) -> None:
    """Raise :class:`CacheError` if one of ``names`` (relative to ``root``) is a broken cache entry.

    Called by whichever process resolves the source (rank 0, or local rank 0 per node) before any
    header or index is parsed. Stats each file and reads at most 1 KiB of the small ones.
    """
    for name in names:
        path = os.path.join(root, name)
        if not os.path.lexists(path):
            raise CheckpointNotFoundError(f"{name} is missing from the checkpoint", where=path,
                                          fix=_next_step(root))
        problem = _file_problem(path, name)
        if problem:
            raise CacheError(f"{name} cannot be loaded: {problem[0]}", where=path, got=problem[1],
                             fix=_next_step(root))


def snapshot_facts(root: str, names: list[str], node: object) -> dict:
    """What a node holds: ``{node, commit, files: {name: size}}`` (commit None outside an HF cache).

    Called on each node (local rank 0) where storage is node-local; rank 0 gathers them for
    :func:`compare_snapshots`.
    """
    snap = _snapshot_root(root)
    return {"node": node, "commit": snap[1] if snap else None,
            "files": {n: os.path.getsize(os.path.join(root, n)) for n in names}}


def _difference(ref: dict, other: dict) -> str:
    if ref.get("commit") != other.get("commit"):
        return f"commit {other.get('commit')} where node {ref['node']} has {ref.get('commit')}"
    a, b = ref["files"], other["files"]
    diffs = [f"{n} missing" for n in sorted(set(a) - set(b))]
    diffs += [f"{n} not on node {ref['node']}" for n in sorted(set(b) - set(a))]
    diffs += [f"{n} is {b[n]} bytes, {a[n]} on node {ref['node']}" for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    return "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")


def compare_snapshots(facts: list[dict]) -> None:
    """Raise :class:`CacheError` naming a node whose snapshot differs from the others'.

    Rank 0 (the coordinator) calls it with one :func:`snapshot_facts` dict per node, before
    planning. The reference is the snapshot most nodes hold (the first node's on a tie).
    """
    keys = [(f.get("commit"), tuple(sorted(f["files"].items()))) for f in facts]
    if len(set(keys)) <= 1:
        return
    best = max(range(len(keys)), key=lambda i: (keys.count(keys[i]), -i))
    ref = facts[best]
    bad = next(f for f, k in zip(facts, keys) if k != keys[best])
    raise CacheError(
        f"Node {bad['node']} holds a different checkpoint snapshot than node {ref['node']}",
        where=f"node {bad['node']}", expected=f"commit {ref.get('commit')} with the same file sizes on every node",
        got=_difference(ref, bad),
        fix=f"make node {bad['node']}'s cache hold the same revision (copy it from node {ref['node']}, "
            f"or pin --revision), then run `weightcast cache verify` on that node")
