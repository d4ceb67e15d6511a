"""``tp`` device maps: tensor parallelism inside a node, replicas across nodes.

Called by :func:`weightcast.orchestrator.device_map.build_device_map` on the coordinator or in the CLI.

A tp plan maps name patterns to styles, as transformers' ``base_model_tp_plan`` does
(``"layers.*.self_attn.q_proj": "colwise"``). A pattern matches a tensor when it matches its
module name or its full name, either whole or after any leading ``prefix.`` (fnmatch; a pattern
starting with ``re:`` is a regular expression). The first matching pattern wins; tensors no
pattern matches are replicated. Styles describe a Linear weight laid out ``[out, in]``:

- ``colwise``: weights and biases split along dim 0 (``Shard(0)``);
- ``rowwise``: weights (2-d and more) split along dim 1 (``Shard(1)``), 1-d biases replicated;
- ``replicate``: every rank gets the whole tensor.

transformers' other style names are accepted where they mean the same slicing
(``colwise_rep``, ``colwise_gather_output``, ``local_colwise`` -> colwise; ``rowwise_rep``,
``local_rowwise`` -> rowwise; ``embedding_rowwise`` (vocab split) -> colwise; ``gather``,
``local``, ``sequence_parallel``, ``isolated`` -> replicate). Packed layouts are refused.

Ranks of a node form ``tp_size`` consecutive local ranks per group (default: the ranks per node);
every group is a replica, and ``Shard.groups`` lists them all. Uneven splits follow
``torch.chunk`` (:func:`weightcast.orchestrator.device_map.shard_bounds`); a split that leaves some rank an
empty slice, or attention heads that ``tp_size`` does not divide, is a :class:`DeviceMapError`.
"""
from __future__ import annotations

import fnmatch
import math
import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from weightcast.orchestrator.device_map_types import (ClusterDeviceMap, Placement, Replicate, Shard,
                                     check_shardable)
from weightcast.orchestrator.errors import DeviceMapError

if TYPE_CHECKING:
    from weightcast.orchestrator.checkpoint import CheckpointIndex
    from weightcast.orchestrator.cluster import ClusterSpec

LLAMA_TP_PLAN: tuple[tuple[str, str], ...] = (
    ("embed_tokens", "colwise"),  # split by vocabulary (dim 0)
    ("layers.*.self_attn.q_proj", "colwise"),
    ("layers.*.self_attn.k_proj", "colwise"),
    ("layers.*.self_attn.v_proj", "colwise"),
    ("layers.*.self_attn.o_proj", "rowwise"),
    ("layers.*.mlp.gate_proj", "colwise"),
    ("layers.*.mlp.up_proj", "colwise"),
    ("layers.*.mlp.down_proj", "rowwise"),
    ("layers.*.input_layernorm", "replicate"),
    ("layers.*.post_attention_layernorm", "replicate"),
    ("norm", "replicate"),
    ("lm_head", "colwise"),  # split by vocabulary (dim 0)
)
STYLES = {
    "colwise": "colwise", "colwise_rep": "colwise", "colwise_gather_output": "colwise",
    "local_colwise": "colwise", "embedding_rowwise": "colwise", "vocab": "colwise",
    "rowwise": "rowwise", "rowwise_rep": "rowwise", "local_rowwise": "rowwise",
    "replicate": "replicate", "replicated": "replicate", "gather": "replicate",
    "local": "replicate", "sequence_parallel": "replicate", "isolated": "replicate",
}
# attention projections whose output rows are heads: (module suffix, config key for the heads)
HEAD_CHECKS = (("q_proj", "num_attention_heads"), ("o_proj", "num_attention_heads"),
               ("k_proj", "num_key_value_heads"), ("v_proj", "num_key_value_heads"))


def tp_map(index: "CheckpointIndex", cluster: "ClusterSpec", *, tp_size: int | None,
           tp_plan: Mapping[str, str] | Sequence[tuple[str, str]] | None,
           config: Mapping[str, Any] | None, tied: tuple[tuple[str, ...], ...],
           key_rules: Mapping[str, Any] | None = None) -> ClusterDeviceMap:
    """Placements of a ``tp`` map (see the module docstring). With ``key_rules`` (one
    :class:`weightcast.orchestrator.key_mapping.KeyRule` per checkpoint key, derived from the
    model's own tp / ep plan) the rules place the tensors instead of the name patterns."""
    if key_rules is not None:
        return _rules_map(index, cluster, tp_size, key_rules, tied)
    plan = normalize_plan(tp_plan)
    matchers = [(_compile(p), STYLES[s]) for p, s in plan]
    size = choose_tp_size(cluster, tp_size)
    groups = tp_groups(cluster, size)
    everyone = Replicate(tuple(range(cluster.world_size)))
    shards = {dim: Shard(dim, groups) for dim in (0, 1)}
    placements: dict[str, Placement] = {}
    for name in index.names:
        shape = index.tensor(name).shape
        style = next((s for m, s in matchers if _matches(m, name)), "replicate")
        dim = _dim(style, name, shape)
        if dim is None or size == 1:
            placements[name] = everyone
            continue
        check_shardable(name, shape, dim, size)
        _check_heads(name, size, config)
        placements[name] = shards[dim]
    return ClusterDeviceMap(placements, "tp", tp_plan=plan, devices=cluster.devices, tied=tied)


def _rules_map(index: "CheckpointIndex", cluster: "ClusterSpec", tp_size: int | None,
               key_rules: Mapping[str, Any], tied: tuple[tuple[str, ...], ...]) -> ClusterDeviceMap:
    from weightcast.orchestrator.key_mapping import rule_placements
    groups = tp_groups(cluster, choose_tp_size(cluster, tp_size))
    placements = rule_placements(list(index.names), key_rules, groups, cluster.world_size)
    for name, p in placements.items():
        if isinstance(p, Shard):
            check_shardable(name, index.tensor(name).shape, p.dim, len(groups[0]))
    return ClusterDeviceMap(placements, "tp", tp_plan=(("<model>", "transformers"),),
                            devices=cluster.devices, tied=tied)


def normalize_plan(tp_plan: Mapping[str, str] | Sequence[tuple[str, str]] | None
                   ) -> tuple[tuple[str, str], ...]:
    """The plan as ordered ``(pattern, style)`` pairs (None: :data:`LLAMA_TP_PLAN`); styles are
    checked, invalid regular expressions reported."""
    if tp_plan is None:
        return LLAMA_TP_PLAN
    pairs = list(tp_plan.items()) if isinstance(tp_plan, Mapping) else list(tp_plan)
    out = []
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(x, str) for x in item)):
            raise DeviceMapError("A tp plan maps name patterns to styles", where="tp_plan",
                                 got=repr(item), expected='{"layers.*.q_proj": "colwise", ...}')
        pattern, style = item
        if style not in STYLES:
            hint = " (packed weights are not torch.chunk slices)" if "packed" in style else ""
            raise DeviceMapError(f"Unknown tp style{hint}", where=f"tp_plan[{pattern!r}]",
                                 got=repr(style), expected="colwise, rowwise or replicate")
        _compile(pattern)
        out.append((pattern, style))
    return tuple(out)


def _compile(pattern: str) -> re.Pattern[str]:
    body = pattern[3:] if pattern.startswith("re:") else fnmatch.translate(pattern)[4:-3]
    try:
        return re.compile(r"(?:.*\.)?(?:" + body + r")")
    except re.error as exc:
        raise DeviceMapError("Invalid regular expression in the tp plan",
                             where=f"tp_plan[{pattern!r}]", got=str(exc)) from None


def _matches(matcher: re.Pattern[str], name: str) -> bool:
    return bool(matcher.fullmatch(name) or matcher.fullmatch(name.rpartition(".")[0]))


def _dim(style: str, name: str, shape: Sequence[int]) -> int | None:
    if style == "replicate":
        return None
    if not shape:
        raise DeviceMapError(f"A {style} style cannot split a 0-d tensor",
                             where=f"tensor {name!r}", fix="mark it 'replicate' in the tp plan")
    if style == "colwise":
        return 0
    return 1 if len(shape) >= 2 else None


def choose_tp_size(cluster: "ClusterSpec", tp_size: int | None) -> int:
    """``tp_size`` checked against every node (default: the ranks per node; with nodes of
    different sizes, the largest size dividing them all)."""
    sizes = {n: cluster.local_world_size(n) for n in cluster.nodes}
    if tp_size is None:
        return math.gcd(*sizes.values())
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise DeviceMapError("tp_size must be a positive integer", where="tp_size",
                             got=repr(tp_size))
    bad = {n: s for n, s in sizes.items() if s % tp_size}
    if bad:
        node, count = next(iter(bad.items()))
        raise DeviceMapError(f"tp_size {tp_size} does not divide the ranks of node {node!r}",
                             where=f"cluster {cluster.name!r}", got=f"{count} ranks",
                             expected=f"a tp size dividing {sorted(set(sizes.values()))}",
                             fix="tensor-parallel groups stay inside a node: pick a divisor")
    return tp_size


def tp_groups(cluster: "ClusterSpec", tp_size: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive local ranks of each node, ``tp_size`` at a time, nodes in order."""
    groups = []
    for node in cluster.nodes:
        ranks = cluster.ranks_on(node)
        groups.extend(tuple(ranks[i:i + tp_size]) for i in range(0, len(ranks), tp_size))
    return tuple(groups)


def _check_heads(name: str, tp_size: int, config: Mapping[str, Any] | None) -> None:
    if not config:
        return
    cfg = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    module = name.rpartition(".")[0]
    for suffix, key in HEAD_CHECKS:
        if not module.endswith(suffix):
            continue
        heads = cfg.get(key, cfg.get("num_attention_heads"))
        if isinstance(heads, int) and heads % tp_size:
            raise DeviceMapError(
                f"tp_size {tp_size} does not divide the attention heads ({key} = {heads})",
                where=f"tensor {name!r}", expected=f"a tp size dividing {heads}",
                fix="pick another --tp-size, or replicate these projections in the tp plan")
