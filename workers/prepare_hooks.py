"""The model layer's and storage clients' answers to the prepare step
(:class:`weightcast.orchestrator.prepare.ModelHooks`): whether a config needs remote code, a
transformers model's own tp plan, the init seed, ``dtype="auto"``'s fallback, opening an
``s3://`` checkpoint. Used by rank 0 of a load and by ``weightcast plan``. Not collective.
"""
from __future__ import annotations

from typing import Any

from weightcast.orchestrator.cluster import ClusterSpec
from weightcast.orchestrator.request import LoadRequest


class WorkerHooks:
    """:class:`~weightcast.orchestrator.prepare.ModelHooks` backed by transformers, torch and boto3."""

    def needs_remote_code(self, model: Any, config: dict) -> bool:
        from weightcast.workers.hf_model import is_hf_class, needs_remote_code
        return (isinstance(model, str) and model == "auto" or is_hf_class(model)) and needs_remote_code(config)

    def tp_rules(self, request: LoadRequest, src: Any, shapes: dict[str, tuple[int, ...]],
                 cluster: ClusterSpec) -> tuple[dict, int] | None:
        from weightcast.workers.tp_hf import plan_rules
        return plan_rules(request, src, shapes, cluster)

    def init_seed(self) -> int:
        from weightcast.workers.model_load import init_seed
        return init_seed()

    def auto_dtype(self, index: Any) -> str | None:
        from weightcast.workers.model_load import first_float_dtype
        return first_float_dtype(index)

    def model_targets(self, request: LoadRequest, src: Any, names: list[str]) -> dict[str, str]:
        """``{checkpoint key: parameter}`` where transformers' mapping renames the key (for a
        model spread over ranks, so each rank knows which parameters it holds); empty for models
        that are not transformers models."""
        from weightcast.workers.convert import is_transformers_model, map_checkpoint_keys
        from weightcast.workers.materialize import build_skeleton
        if request.model is None:
            return {}
        module = build_skeleton(request.model, src.config, request.trust_remote_code, root=src.root,
                                source=request.source, overrides=getattr(request, "model_kwargs", None) or {})
        if not is_transformers_model(module):
            return {}
        mapped = map_checkpoint_keys(module, names, request.key_mapping)
        return {key: target for key, (target, _) in mapped.items() if target != key}

    def open_object(self, request: LoadRequest) -> tuple[Any, Any]:
        from weightcast.workers.s3 import open_checkpoint
        return open_checkpoint(request.source, request.storage_options, request.timeout)
