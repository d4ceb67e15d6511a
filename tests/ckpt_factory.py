"""Build tiny checkpoints in tmp dirs for the tests (shared by every test module).

- :func:`raw_safetensors` / :func:`write_raw`: a safetensors file from a header dict (or raw header
  bytes) and data bytes, for hand-made and deliberately broken files.
- :func:`sample_tensors`, :func:`write_single`, :func:`write_sharded`: files written by
  ``safetensors.torch.save_file``, sharded like ``save_pretrained`` with an index.
- :func:`save_tiny_llama`, :func:`save_tiny_bert`: real ``transformers`` ``save_pretrained`` output.
- :func:`build_hf_cache`: an HF cache laid out by hand as huggingface_hub writes it
  (``blobs/``, ``refs/main`` without newline, ``snapshots/<commit>/`` relative symlinks), which
  ``snapshot_download(local_files_only=True)`` resolves. Nothing here touches the network.

Other test modules may add helpers at the end of this file; existing ones keep their signatures.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any huggingface_hub import

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DEFAULT_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------- raw files

def raw_safetensors(header: dict | bytes, data: bytes = b"", *, pad: bool = True,
                    length: int | None = None) -> bytes:
    """File bytes: 8-byte LE length + header (+ spaces to a multiple of 8 when ``pad``) + data.

    ``header`` is a dict (dumped compactly, key order kept) or raw bytes; ``length`` overrides
    the declared header length (for broken files).
    """
    body = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    declared = len(body) if length is None else length
    return struct.pack("<Q", declared) + body + data


def write_raw(path: str | os.PathLike, header: dict | bytes, data: bytes = b"", **kw: Any) -> str:
    """Write :func:`raw_safetensors` to ``path`` (mode 0644) and return the path."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(raw_safetensors(header, data, **kw))
    os.chmod(path, 0o644)
    return path


def header_for(tensors: dict[str, tuple[str, list[int], int]],
               metadata: dict[str, str] | None = None) -> tuple[dict, int]:
    """Header dict for ``{name: (dtype, shape, nbytes)}`` laid out contiguously in the given order.

    Returns (header, data length).
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    pos = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    return header, pos


# ---------------------------------------------------------------- safetensors.torch files

def sample_tensors(seed: int = 0) -> dict[str, Any]:
    """A dozen small tensors of mixed dtypes and ranks (including a 0-d and an empty one)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "layers.0.attn.q.weight": torch.randn(8, 8, generator=g),
        "layers.0.attn.k.weight": torch.randn(4, 8, generator=g).to(torch.float16),
        "layers.0.mlp.up.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": torch.ones(8),
        "layers.1.attn.q.weight": torch.randn(8, 8, generator=g).to(torch.float64),
        "layers.1.mlp.up.weight": torch.randint(-100, 100, (12, 8), generator=g, dtype=torch.int8),
        "layers.1.norm.weight": torch.ones(8, dtype=torch.bfloat16),
        "positions": torch.arange(32, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(0, 4),
    }


def write_single(directory: str | os.PathLike, tensors: dict | None = None,
                 name: str = "model.safetensors", metadata: dict[str, str] | None = None) -> str:
    """``save_file`` the tensors to ``directory/name`` (mode 0644); returns the path."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), name)
    save_file(sample_tensors() if tensors is None else tensors, path,
              metadata={"format": "pt"} if metadata is None else metadata)
    os.chmod(path, 0o644)
    return path


def write_index(directory: str | os.PathLike, weight_map: dict[str, str],
                metadata: dict | None = None, name: str = "model.safetensors.index.json") -> str:
    path = os.path.join(os.fspath(directory), name)
    with open(path, "w") as f:
        json.dump({"metadata": metadata or {}, "weight_map": weight_map}, f, indent=2)
    return path


def write_sharded(directory: str | os.PathLike, tensors: dict | None = None, shards: int = 3,
                  *, total_size: bool = True) -> dict[str, str]:
    """Split the tensors (in order) over ``shards`` files ``model-0000i-of-0000N.safetensors``
    plus ``model.safetensors.index.json``; returns the weight map."""
    tensors = sample_tensors() if tensors is None else tensors
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        write_single(directory, part, file)
        weight_map.update({n: file for n in part})
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    write_index(directory, weight_map, {"total_size": nbytes} if total_size else {})
    return weight_map


# ---------------------------------------------------------------- transformers checkpoints

def tiny_llama_config(tied: bool = True) -> Any:
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       max_position_embeddings=128, tie_word_embeddings=tied)


def save_tiny_llama(directory: str | os.PathLike, *, tied: bool = True,
                    max_shard_size: str | int = "100KB", dtype: str = "float32",
                    seed: int = 0) -> Any:
    """``LlamaForCausalLM`` (tiny config) saved with ``save_pretrained``; returns the model."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tied)).to(getattr(torch, dtype))
    model.save_pretrained(os.fspath(directory), max_shard_size=max_shard_size)
    return model


def save_tiny_bert(directory: str | os.PathLike, *, max_shard_size: str | int = "10GB",
                   seed: int = 0) -> Any:
    """``BertModel`` (tiny config) saved with ``save_pretrained``; returns the model."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    model = BertModel(config)
    model.save_pretrained(os.fspath(directory), max_shard_size=max_shard_size)
    return model


# ---------------------------------------------------------------- HF cache by hand

def blob_id(name: str, data: bytes) -> str:
    """sha256 for LFS files (weights), git blob sha1 for small files, as the hub names blobs."""
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def dir_files(directory: str | os.PathLike) -> dict[str, bytes]:
    """Every regular file directly inside ``directory``, name -> bytes (to put in a cache)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def build_hf_cache(cache_dir: str | os.PathLike, repo_id: str, files: dict[str, bytes], *,
                   commit: str = DEFAULT_COMMIT, ref: str | None = "main") -> str:
    """Write ``files`` as a cached snapshot of ``repo_id``; returns the snapshot directory.

    ``cache_dir/models--org--name/{blobs,refs,snapshots}`` as huggingface_hub lays it out.
    ``ref`` (e.g. "main") points at ``commit``; None writes no ref.
    """
    repo_dir = os.path.join(os.fspath(cache_dir), "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    for name, data in files.items():
        bid = blob_id(name, data)
        with open(os.path.join(repo_dir, "blobs", bid), "wb") as f:
            f.write(data)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        depth = name.count("/")
        os.symlink(os.path.join(*([".."] * (2 + depth)), "blobs", bid), link)
    os.makedirs(snapshot, exist_ok=True)
    if ref is not None:
        os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
        with open(os.path.join(repo_dir, "refs", ref), "w") as f:
            f.write(commit)  # no trailing newline: huggingface_hub reads it verbatim
    return snapshot
