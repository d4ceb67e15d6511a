"""Build Hugging Face caches by hand in tmp dirs, and break them the ways copied caches break.

Layout written (the one huggingface_hub reads offline)::

    <cache_dir>/models--org--name/
        blobs/<sha256 of the content>          LFS files (here: *.safetensors, *.bin)
        blobs/<git blob sha1 of the content>   small files (config.json, ...)
        refs/main                              the 40-hex commit, no trailing newline
        snapshots/<commit>/<path>              relative symlinks to ../../blobs/<id>

Used by tests/test_cache_doctor.py; nothing here touches the network.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the hub, for non-LFS files) gives a file: sha1 of ``blob <len>\\0`` + data."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def blob_id(name: str, data: bytes) -> str:
    return sha256_hex(data) if name.endswith(LFS_SUFFIXES) else git_blob_sha1(data)


@dataclass
class HFCache:
    """A hand-built cached repo: where everything is."""
    cache_dir: str
    repo_id: str
    repo_dir: str
    commit: str
    blobs: dict[str, str] = field(default_factory=dict)  # file name -> blob id

    @property
    def snapshot_dir(self) -> str:
        return os.path.join(self.repo_dir, "snapshots", self.commit)

    def path(self, name: str) -> str:
        return os.path.join(self.snapshot_dir, name)

    def blob_path(self, name: str) -> str:
        return os.path.join(self.repo_dir, "blobs", self.blobs[name])


def tiny_safetensors(seed: int = 0) -> tuple[bytes, dict]:
    """A small safetensors file (bytes) and the tensors it holds."""
    import torch
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "embed.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),
        "layers.0.mlp.weight": torch.randn(8, 8, generator=gen),
        "layers.0.norm.bias": torch.arange(8, dtype=torch.int32),
    }
    return save(tensors), tensors


def default_files(seed: int = 0) -> dict[str, bytes]:
    data, _ = tiny_safetensors(seed)
    config = json.dumps({"model_type": "tiny", "hidden_size": 8}).encode()
    return {"config.json": config, "model.safetensors": data}


def build_hf_cache(cache_dir: str, repo_id: str = "acme/tiny", files: dict[str, bytes] | None = None,
                   *, commit: str | None = None, ref: str = "main") -> HFCache:
    """Write a cached repo as huggingface_hub would after a download (files default: a tiny model)."""
    files = default_files() if files is None else files
    commit = commit or hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    repo_dir = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    cache = HFCache(cache_dir, repo_id, repo_dir, commit)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    os.makedirs(cache.snapshot_dir, exist_ok=True)
    for name, data in files.items():
        cache.blobs[name] = blob_id(name, data)
        blob = cache.blob_path(name)
        with open(blob, "wb") as f:
            f.write(data)
        os.chmod(blob, 0o644)
        link = cache.path(name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if ref:
        write_ref(cache, ref, commit)
    return cache


def write_ref(cache: HFCache, ref: str, content: str) -> str:
    path = os.path.join(cache.repo_dir, "refs", ref)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    return path


# --- the ways a copied cache breaks ---------------------------------------------------------

def make_plain_copy(cache: HFCache, name: str, *, keep_blob: bool = False) -> None:
    """``cp -rL`` / ``rsync -L``: the link becomes a regular copy (the blob kept or not)."""
    link = cache.path(name)
    blob = os.path.realpath(link)
    os.unlink(link)
    shutil.copyfile(blob, link)
    os.chmod(link, 0o644)
    if not keep_blob:
        os.unlink(blob)


def make_dangling(cache: HFCache, name: str) -> None:
    """Blobs not copied: the link stays, its target is gone."""
    os.unlink(cache.blob_path(name))


def make_absolute_link(cache: HFCache, name: str, old_cache_dir: str) -> None:
    """An absolute link into another machine's cache (dangling here; the blob exists locally)."""
    link = cache.path(name)
    os.unlink(link)
    old_repo = os.path.join(old_cache_dir, os.path.basename(cache.repo_dir))
    os.symlink(os.path.join(old_repo, "blobs", cache.blobs[name]), link)


def make_text_link(cache: HFCache, name: str, *, drop_blob: bool = False) -> None:
    """Copied by a tool without symlink support: the link becomes a text file holding its target."""
    link = cache.path(name)
    target = os.readlink(link)
    os.unlink(link)
    with open(link, "w") as f:
        f.write(target)
    if drop_blob:
        os.unlink(cache.blob_path(name))


def corrupt_blob(cache: HFCache, name: str) -> None:
    """Flip one byte of a blob (its name no longer matches its content)."""
    blob = cache.blob_path(name)
    with open(blob, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
