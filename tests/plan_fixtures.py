"""Hand-built planner inputs: in-memory CheckpointIndex / ClusterSpec / ClusterDeviceMap.

Used by the planner, cost and plan-CLI tests; nothing here touches the disk. ``llama_index``
lays out Llama-style shapes (8B / 70B / 405B) over shard files of about ``shard_bytes`` as a
safetensors writer would, so plans of the big models can be built and timed in memory.
"""
from __future__ import annotations

from weightcast.orchestrator.checkpoint import CheckpointIndex, FileEntry, TensorEntry
from weightcast.orchestrator.cluster import ClusterSpec, RankSpec
from weightcast.orchestrator.device_map import ClusterDeviceMap, Replicate, Shard

LLAMA = {  # hidden, intermediate, layers, kv heads, vocab (head dim 128)
    "llama-tiny": (64, 160, 2, 2, 256),
    "llama-8b": (4096, 14336, 32, 8, 128256),
    "llama-70b": (8192, 28672, 80, 8, 128256),
    "llama-405b": (16384, 53248, 126, 8, 128256),
}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "I64": 8}


def llama_shapes(like: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama-style model in save order."""
    h, inter, layers, kv, vocab = LLAMA[like]
    kvd = kv * (128 if h >= 1024 else 16)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kvd, h)),
                (p + "self_attn.v_proj.weight", (kvd, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def make_index(tensors: list[tuple[str, tuple[int, ...]]], dtype: str = "BF16",
               shard_bytes: int = 5 << 30, header: int = 4096,
               dtypes: dict[str, str] | None = None) -> CheckpointIndex:
    """A CheckpointIndex of ``tensors`` packed in order into files of about ``shard_bytes``."""
    files: list[FileEntry] = []
    entries: list[TensorEntry] = []
    fno, pos, start = 0, 0, 0

    def close() -> None:
        files.append(FileEntry(f"model-{fno:05d}.safetensors", 8 + header + pos - start, 1,
                               8 + header))

    for name, shape in tensors:
        dt = (dtypes or {}).get(name, dtype)
        n = DTYPE_BYTES[dt]
        for d in shape:
            n *= d
        if pos - start and pos - start + n > shard_bytes:
            close()
            fno, start = fno + 1, pos
        entries.append(TensorEntry(name, f"model-{fno:05d}.safetensors", dt, shape,
                                   8 + header + pos - start, n))
        pos += n
    close()
    entries.sort(key=lambda t: (t.file, t.offset))
    return CheckpointIndex("/nonexistent", tuple(files), tuple(entries))


def llama_index(like: str = "llama-8b", shard_bytes: int = 5 << 30) -> CheckpointIndex:
    return make_index(llama_shapes(like), shard_bytes=shard_bytes)


def make_cluster(nodes: int, per_node: int | list[int], storage: str = "shared",
                 device: str = "cuda", **kw: object) -> ClusterSpec:
    """``nodes`` nodes of ``per_node`` ranks (a list gives each node its own count)."""
    counts = per_node if isinstance(per_node, list) else [per_node] * nodes
    ranks = []
    for n, count in enumerate(counts):
        for k in range(count):
            dev = f"cuda:{k}" if device == "cuda" else "cpu"
            ranks.append(RankSpec(len(ranks), k, f"node{n}", dev, 80 << 30, 1 << 40))
    return ClusterSpec(tuple(ranks), storage=storage, **kw)  # type: ignore[arg-type]


def replicate_map(index: CheckpointIndex, cluster: ClusterSpec) -> ClusterDeviceMap:
    everyone = tuple(range(cluster.world_size))
    return ClusterDeviceMap({n: Replicate(everyone) for n in index.names}, strategy="replicate")


COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
ROWWISE = ("o_proj", "down_proj")


def tp_map(index: CheckpointIndex, cluster: ClusterSpec) -> ClusterDeviceMap:
    """TP inside each node (groups = the node's ranks), replicas across nodes."""
    groups = tuple(cluster.ranks_on(n) for n in cluster.nodes)
    everyone = tuple(range(cluster.world_size))
    out = {}
    for name in index.names:
        if any(k in name for k in COLWISE):
            out[name] = Shard(0, groups)
        elif any(k in name for k in ROWWISE):
            out[name] = Shard(1, groups)
        else:
            out[name] = Replicate(everyone)
    return ClusterDeviceMap(out, strategy="tp")
