"""``device_map="fsdp"``: FSDP2 models loaded with each rank reading only its dim-0 rows, equal to
the FSDP2 job started with ``set_model_state_dict(broadcast_from_rank0=True)``."""
from __future__ import annotations

import pytest

from tests.ranks import spawn  # forked ranks: see tests/ranks.py

pytestmark = pytest.mark.timeout(300)


def _odd_llama(path, tied: bool) -> str:
    """Vocabulary 255 and MLP width 127: dim 0 splits 128/127 and 64/63 over 2 ranks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    config = LlamaConfig(hidden_size=32, intermediate_size=127, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=255, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="50KB")
    return str(path)


def _check_fsdp(results, shard_size: int) -> None:
    for r in results:
        v = r.value
        assert v["meta"] == []
        for name, lay in v["layout"].items():
            assert lay["dtensor"] and lay["placements"][-1] == "S(0)", (name, lay)
            assert lay["placements"] == lay["ref_placements"], (name, lay)
            assert lay["local_rows"] == lay["chunk_rows"], (name, lay)  # torch.chunk rows, uneven included
            assert lay["ref_local_equal"], name
        assert v["step_equal"] and v["max_diff"] == 0.0, v["max_diff"]
        for ours, ref in v["losses"]:
            assert ours == ref
    v = results[0].value
    assert v["total_read"] == v["checkpoint_bytes"]  # storage read 1.00x
    assert all(r.value["read_bytes"] < v["checkpoint_bytes"] / shard_size * 1.05 for r in results)
    assert results[0].value["layout"]["model.embed_tokens.weight"]["local_rows"] == 128
    assert results[1].value["layout"]["model.embed_tokens.weight"]["local_rows"] == 127


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_layout_and_step_equal_reference(tmp_path, tied: bool) -> None:
    source = _odd_llama(tmp_path / "llama", tied)
    _check_fsdp(spawn(2, "tests.training_jobs:fsdp_start", {"source": source}, timeout=200), 2)


def test_fsdp_collective_transport(tmp_path) -> None:
    source = _odd_llama(tmp_path / "llama", False)
    _check_fsdp(spawn(2, "tests.training_jobs:fsdp_start", {"source": source, "transport": "collective"},
                      timeout=200), 2)


def test_hsdp_shards_inside_nodes_replicates_across(tmp_path) -> None:
    """4 ranks on 2 emulated nodes: a (replicate, shard) mesh, each node's pair splits the rows."""
    source = _odd_llama(tmp_path / "llama", False)
    results = spawn(4, "tests.training_jobs:fsdp_start", {"source": source, "nodes": 2}, timeout=280,
                    nodes=["a", "a", "b", "b"])
    for r in results:
        assert r.value["mesh"] == [[0, 1], [2, 3]]
        lay = r.value["layout"]["model.embed_tokens.weight"]
        assert lay["placements"] == ["R", "S(0)"] and lay["local_rows"] == (128, 127)[r.rank % 2]
        assert r.value["step_equal"], r.rank
    assert results[0].value["total_read"] == results[0].value["checkpoint_bytes"]


def test_fsdp_rank_without_rows(tmp_path) -> None:
    """A 1-row head over 2 ranks: rank 1 holds no row, as fully_shard cuts it."""
    import torch
    from safetensors.torch import save_file
    from tests.training_jobs import TinyRows
    torch.manual_seed(0)
    (tmp_path / "tiny").mkdir()
    save_file(TinyRows().state_dict(), str(tmp_path / "tiny" / "model.safetensors"))
    results = spawn(2, "tests.training_jobs:fsdp_empty_rows", {"source": str(tmp_path / "tiny")}, timeout=200)
    assert results[0].value["shapes"]["head.weight"] == [1, 8]
    assert results[1].value["shapes"]["head.weight"] == [0, 8]
    for r in results:
        assert r.value["equal"] and r.value["losses"][0] == r.value["losses"][1]


def test_fsdp_map_placements() -> None:
    """Pure: fsdp_bounds are torch.chunk's rows (empty past the last chunk); a tensor that would
    leave a rank empty is not shardable (replicated); HSDP groups per node when nodes are equal."""
    from weightcast.orchestrator.cluster import cluster_from_flags
    from weightcast.orchestrator.device_map_fsdp import evenly_shardable, fsdp_bounds, fsdp_groups
    import torch
    for rows in range(0, 12):
        for parts in range(1, 6):
            chunks = torch.chunk(torch.arange(rows), parts) if rows else ()
            for i in range(parts):
                a, b = fsdp_bounds(rows, parts, i)
                want = chunks[i].tolist() if i < len(chunks) else []
                assert list(range(a, b)) == want, (rows, parts, i)
    assert evenly_shardable((5, 3), 2) and not evenly_shardable((1, 3), 2) and not evenly_shardable((), 2)
    assert not evenly_shardable((4,), 3)  # torch.chunk: 2 + 2, the third rank empty
    assert fsdp_groups(cluster_from_flags(2, 2)) == ((0, 1), (2, 3))
    assert fsdp_groups(cluster_from_flags(1, 4)) == ((0, 1, 2, 3),)
