"""MoE and converted checkpoints: transformers' own key mapping (conversion mapping, renames,
``base_model_prefix``) applied by weightcast gives the model ``from_pretrained`` gives."""
from __future__ import annotations

import pytest

from tests.moe_zoo import ZOO, save_zoo_model
from weightcast.launch.local import spawn

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_zoo_replicate_bit_identical(tmp_path, model_type: str) -> None:
    cls = save_zoo_model(tmp_path, model_type, dtype="bfloat16")
    results = spawn(2, "tests.moe_jobs:replicate_vs_from_pretrained", {"source": str(tmp_path), "cls": cls},
                    timeout=240)
    for r in results:
        v = r.value
        assert v["type"] == cls and v["meta"] == [], v
        assert v["keys_equal"] and v["differ"] == [], v
        assert v["equal"], v
    read = results[0].value["read"]
    assert sum(read) == results[0].value["checkpoint"], read  # every byte read once: 1.00x
