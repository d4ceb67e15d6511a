"""Synthetic Llama-shaped checkpoints: real headers, sparse (or random) data.

:func:`write_synthetic` writes what ``LlamaForCausalLM.save_pretrained`` would write for a model
of the chosen shape (``tiny``, ``llama-1b``, ``llama-8b``, ``llama-70b``, ``llama-405b``): shards
``model-0000i-of-0000N.safetensors`` split like huggingface_hub splits state dicts, an index with
``metadata.total_size``, and a ``config.json`` transformers builds the model from. Data regions
are sparse (``ftruncate``: a 405B checkpoint costs a few MB of disk, reads as zeros) unless
``random=True``, which writes seeded random weights (tiny and llama-1b only).

Called by ``weightcast synth``, the demo and the benchmarks; single process, no collectives.
The checkpoint is written into a temporary directory beside ``out_dir`` and renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

from weightcast.orchestrator.checkpoint import CheckpointIndex, load_index
from weightcast.orchestrator.errors import ConfigError
from weightcast.orchestrator.safetensors_dtypes import tensor_nbytes


@dataclass(frozen=True, slots=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int = 131072
    bos: int = 128000
    eos: int = 128001


SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(64, 2, 4, 2, 128, 256, tied=False, max_positions=128, bos=1, eos=2),
    "llama-1b": LlamaShape(2048, 16, 32, 8, 8192, 128256, tied=True),      # Llama-3.2-1B
    "llama-8b": LlamaShape(4096, 32, 32, 8, 14336, 128256, tied=False),    # Llama-3.1-8B
    "llama-70b": LlamaShape(8192, 80, 64, 8, 28672, 128256, tied=False),   # Llama-3.1-70B
    "llama-405b": LlamaShape(16384, 126, 128, 8, 53248, 128256, tied=False),  # Llama-3.1-405B
}
RANDOM_OK = ("tiny", "llama-1b")

# dtype name (torch spelling, plus common aliases) -> safetensors code
DTYPES: dict[str, str] = {
    "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912 (huggingface_hub's convention)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not found or found.group(2) not in _UNITS:
            raise ConfigError("Not a size", expected="an integer or e.g. '5GB', '500MB', '2GiB'",
                              got=repr(size))
        value = int(float(found.group(1)) * _UNITS[found.group(2)])
    if value <= 0:
        raise ConfigError("The shard size must be positive", got=repr(size))
    return value


def llama_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in ``LlamaForCausalLM.state_dict()`` order (tied lm_head left out)."""
    h, kv = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
                (p + "mlp.up_proj.weight", (shape.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, shape.intermediate)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not shape.tied:
        out.append(("lm_head.weight", (shape.vocab, h)))
    return out


def split_shards(sizes: list[tuple[str, int]], max_shard: int) -> list[list[str]]:
    """Greedy split in order, as huggingface_hub's ``split_state_dict_into_shards_factory``:
    a tensor bigger than ``max_shard`` gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > max_shard:
            shards.append([name])
            continue
        if current and current_size + size > max_shard:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def llama_config(shape: LlamaShape, torch_name: str) -> dict:
    """A config.json transformers' ``LlamaConfig`` reads (4.x via rope_theta, 5.x via rope_parameters)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": shape.hidden // shape.heads,
        "vocab_size": shape.vocab, "max_position_embeddings": shape.max_positions,
        "hidden_act": "silu", "rms_norm_eps": 1e-05, "initializer_range": 0.02,
        "rope_theta": 500000.0, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": shape.tied, "use_cache": True,
        "bos_token_id": shape.bos, "eos_token_id": shape.eos, "dtype": torch_name,
    }


def _header_bytes(names: list[str], shapes: dict[str, tuple[int, ...]], code: str
                  ) -> tuple[bytes, list[tuple[str, int]]]:
    """Header (padded to 8 bytes) for the tensors of one shard, laid out in name order as
    safetensors does for a single dtype; -> (header bytes, [(name, nbytes)] in data order)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    layout, pos = [], 0
    for name in sorted(names):
        nbytes = tensor_nbytes(code, shapes[name])
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [pos, pos + nbytes]}
        layout.append((name, nbytes))
        pos += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body, layout


def _write_random(f, name: str, shape: tuple[int, ...], torch_name: str, generator) -> None:
    import torch
    dtype = getattr(torch, torch_name)
    if name.endswith("norm.weight"):
        f.write(torch.ones(shape, dtype=dtype).view(torch.uint8).numpy())
        return
    rows_per_block = max(1, (1 << 23) // max(1, shape[-1]))  # ~8M elements at a time
    for start in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - start)
        block = torch.randn((rows, *shape[1:]), generator=generator).mul_(0.02).to(dtype)
        f.write(block.view(torch.uint8).numpy())


def _write_shard(path: str, names: list[str], shapes: dict[str, tuple[int, ...]], code: str,
                 generator) -> int:
    """Write one shard (sparse data unless ``generator``); -> its tensor bytes."""
    head, layout = _header_bytes(names, shapes, code)
    data = sum(n for _, n in layout)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(head)
        if generator is not None:
            for name, _ in layout:
                _write_random(f, name, shapes[name], _TORCH_NAMES[code], generator)
        f.flush()
        os.ftruncate(f.fileno(), len(head) + data)
        os.fsync(f.fileno())
    os.chmod(path, 0o644)
    return data


def _write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def _check_args(out_dir: str, like: str, dtype: str, random: bool) -> tuple[LlamaShape, str]:
    if like not in SHAPES:
        raise ConfigError("Unknown synthetic model shape", expected=f"one of {list(SHAPES)}",
                          got=repr(like))
    code = DTYPES.get(str(dtype).removeprefix("torch.").lower())
    if code is None:
        raise ConfigError("Unsupported dtype for a synthetic checkpoint",
                          expected=f"one of {sorted(set(DTYPES))}", got=repr(dtype))
    if random and like not in RANDOM_OK:
        raise ConfigError(f"random=True would write real data for {like}",
                          expected=f"random only with {' or '.join(RANDOM_OK)}", got=like,
                          fix="drop --random (sparse data costs no disk), or use --like llama-1b")
    if os.path.lexists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise ConfigError("The output directory already exists and is not empty", where=out_dir,
                          fix="remove it or choose another directory")
    return SHAPES[like], code


def write_synthetic(out_dir: str | os.PathLike, like: str = "tiny", dtype: str = "bfloat16",
                    max_shard_size: str | int = "5GB", random: bool = False, seed: int = 0
                    ) -> CheckpointIndex:
    """Write a synthetic Llama-shaped checkpoint to ``out_dir`` and return its validated index."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    shape, code = _check_args(out_dir, like, dtype, random)
    max_shard = parse_size(max_shard_size)
    shapes = dict(llama_tensors(shape))
    generator = None
    if random:
        import torch
        generator = torch.Generator().manual_seed(seed)
    shards = split_shards([(n, tensor_nbytes(code, s)) for n, s in shapes.items()], max_shard)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write_tree(tmp, shards, shapes, code, shape, generator)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)  # replaces an empty out_dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return load_index(out_dir)


def _write_tree(tmp: str, shards: list[list[str]], shapes: dict[str, tuple[int, ...]], code: str,
                shape: LlamaShape, generator) -> None:
    count = len(shards)
    if count == 1:
        _write_shard(os.path.join(tmp, "model.safetensors"), shards[0], shapes, code, generator)
    else:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            total += _write_shard(os.path.join(tmp, file), names, shapes, code, generator)
            weight_map.update({n: file for n in names})
        params = sum(_numel(s) for s in shapes.values())
        _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                    {"metadata": {"total_parameters": params, "total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))})
    _write_json(os.path.join(tmp, "config.json"), llama_config(shape, _TORCH_NAMES[code]))
    _fsync_dir(tmp)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
