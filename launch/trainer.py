"""transformers ``Trainer`` resuming through weightcast (optional: needs ``weightcast[hf]``).

``WeightcastTrainer`` is a drop-in ``Trainer`` whose ``train(resume_from_checkpoint=...)`` reads
the checkpoint with :func:`weightcast.load_training_state`: the weights once per cluster, the
optimizer file once per cluster (Trainer itself reads ``optimizer.pt`` whole on every rank), the
scheduler and each rank's RNG file as Trainer does. The three hooks Trainer calls on every rank
(``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_rng_state``) are each one
collective weightcast call. ``weightcast_rng`` (``"restore"`` by default) is the RNG policy:
``"skip"`` resumes at another world size, keeping the current RNG state.
"""
from __future__ import annotations

from typing import Any

from transformers import Trainer

from weightcast.workers.training_state import load_training_state


class WeightcastTrainer(Trainer):
    """``Trainer`` that resumes checkpoints with weightcast (DDP or single process)."""

    weightcast_rng: str = "restore"
    weightcast_timeout: float = 300.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weightcast_reports: list[dict] = []  # one per resume step: bytes read per rank

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.model if model is None else model
        _, report = load_training_state(resume_from_checkpoint, target, rng="skip", timeout=self.weightcast_timeout,
                                        return_report=True)
        self.weightcast_reports.append(report)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        _, report = load_training_state(checkpoint, optimizer=self.optimizer, scheduler=self.lr_scheduler,
                                        weights=False, rng="skip", timeout=self.weightcast_timeout,
                                        return_report=True)
        self.weightcast_reports.append(report)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        load_training_state(checkpoint, weights=False, rng=self.weightcast_rng, timeout=self.weightcast_timeout)
