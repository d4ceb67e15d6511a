"""The benchmark checkpoint: a Llama-shaped model with random bf16 weights, sharded like
``save_pretrained`` shards it, with a ``config.json`` transformers builds the model from.

``emu-1g`` (the default, ~1 GB in 5 shards: a sweep of 2 and 4 nodes stays within minutes) is
written here with ``safetensors.torch.save_file``; ``tiny`` (~0.3 MB, for the tests) and
``llama-1b`` (~2.5 GB, the Llama-3.2-1B shape) come from :func:`weightcast.orchestrator.synth.write_synthetic`.
Called by the harness and the tests, single process. An existing complete checkpoint is reused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

# hidden 2048, 8 layers, GQA 16/4 heads, MLP 5632, vocab 32000, untied: 0.49 B params, 0.98 GB bf16
SHAPES = {"emu-1g": dict(hidden=2048, layers=8, heads=16, kv_heads=4, intermediate=5632, vocab=32000,
                         tied=False, max_positions=4096, bos=1, eos=2)}
SYNTH = ("tiny", "llama-1b")
MAX_SHARD = 220_000_000
DONE = ".complete"


def make_checkpoint(out_dir: str, like: str = "emu-1g", seed: int = 0) -> str:
    """Write (or reuse) the checkpoint ``like`` at ``out_dir``; -> ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    marker = os.path.join(out_dir, DONE)
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read().strip() == f"{like} {seed}":
                return out_dir
    if os.path.lexists(out_dir):
        shutil.rmtree(out_dir)
    if like in SYNTH:
        from weightcast.orchestrator.synth import write_synthetic
        write_synthetic(out_dir, like=like, random=True, seed=seed, max_shard_size="500MB")
    elif like in SHAPES:
        from weightcast.orchestrator.synth import LlamaShape
        _write_random(out_dir, LlamaShape(**SHAPES[like]), seed)
    else:
        raise ValueError(f"unknown checkpoint {like!r}: one of {sorted(SHAPES) + list(SYNTH)}")
    with open(marker, "w") as f:
        f.write(f"{like} {seed}\n")
    return out_dir


def _write_random(out_dir: str, shape, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from weightcast.orchestrator.synth import llama_config, llama_tensors, split_shards
    shapes = dict(llama_tensors(shape))
    sizes = [(name, _numel(s) * 2) for name, s in shapes.items()]
    shards = split_shards(sizes, MAX_SHARD)
    gen = torch.Generator().manual_seed(seed)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".emu-ckpt-", dir=parent)
    try:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: _random(shapes[n], n, gen) for n in names}
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp, file), 0o644)  # safetensors writes 0600
            weight_map.update({n: file for n in names})
        index = {"metadata": {"total_size": sum(n for _, n in sizes),
                              "total_parameters": sum(n for _, n in sizes) // 2},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
        _write_json(os.path.join(tmp, "config.json"), llama_config(shape, "bfloat16"))
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _random(shape: tuple[int, ...], name: str, gen) -> "torch.Tensor":  # noqa: F821
    import torch
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)


def _write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(path, 0o644)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_bytes(path: str) -> int:
    """Total size of the ``*.safetensors`` files (what a full read costs)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))
