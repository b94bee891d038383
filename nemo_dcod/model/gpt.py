"""The NeMo model plug-in: a ``llm.GPTModel`` whose training and validation losses are ours.

NeMo's ``MegatronParallel`` reads the loss from the model's ``training_loss_reduction`` /
``validation_loss_reduction`` properties and the steps from ``config.data_step_fn`` /
``config.forward_step_fn`` (FACTS.md). :class:`DistillGPTModel` overrides the two properties; the
steps come with the config from :func:`~nemo_dcod.model.families.build_gpt_config`. Everything
else (strategy, optimizer, checkpoints, HF import/export) is NeMo's ``GPTModel`` unchanged.

The constructor takes only plain values (a dict for the loss), so the model is recorded in a NeMo 2
checkpoint's context like any NeMo model and rebuilt from it on resume.
"""

from __future__ import annotations

from typing import Any

from nemo.collections import llm

from nemo_dcod.model.reduction import DistillLossReduction, carried_stats

__all__ = ["DistillGPTModel"]


class DistillGPTModel(llm.GPTModel):
    """A NeMo GPT model trained with DisCorD or a baseline on offline teacher signals.

    Args:
        config: a ``GPTConfig`` from :func:`~nemo_dcod.model.families.build_gpt_config`.
        loss: the ``loss`` section of the training config (its name, parameters, chunk_size, validate).
        vocab_size: the tokenizer's real vocabulary size (the output layer may be padded).
        total_steps: the run's optimizer steps (DisCorD's λ schedule).
        stats_key: names the run's carried DisCorD statistics
            (:func:`~nemo_dcod.model.reduction.carried_stats`), shared by the models NeMo makes
            for virtual-pipeline chunks from these same arguments; empty: this model's own.
        optim, tokenizer, model_transform: as for ``llm.GPTModel``.
        context_length: the positions the model was made for (its ``model.init_from`` checkpoint's:
            an import's is the HF ``max_position_embeddings``), which ``config.seq_length`` (the
            training rows) is not; ``export`` writes it back. None: no source model (random init).
    """

    def __init__(
        self,
        config: Any,
        loss: dict[str, Any],
        vocab_size: int,
        total_steps: int,
        stats_key: str = "",
        optim: Any = None,
        tokenizer: Any = None,
        model_transform: Any = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__(config, optim=optim, tokenizer=tokenizer, model_transform=model_transform)
        self._training_loss_reduction: DistillLossReduction | None = None
        self._validation_loss_reduction: DistillLossReduction | None = None
        self.loss_settings = dict(loss)
        self.real_vocab_size = int(vocab_size)
        self.total_steps = int(total_steps)
        self.stats_key = stats_key or f"model-{id(self)}"
        self.context_length = context_length

    def _reduction(self, validation: bool = False) -> DistillLossReduction:
        from nemo_dcod.losses.registry import build_from_section

        loss = build_from_section(self.loss_settings)
        return DistillLossReduction(
            loss,
            vocab_size=self.real_vocab_size,
            step_fn=self._global_step,
            total_steps=self.total_steps,
            chunk_size=self.loss_settings.get("chunk_size"),
            validate=bool(self.loss_settings.get("validate", True)),
            stats=getattr(loss, "stats", "previous_step"),
            # Validation weighs with the statistics training carries; it never updates them.
            carried=carried_stats(self.stats_key),
            update_stats=not validation,
        )

    def _global_step(self) -> int:
        trainer = getattr(self, "_trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    @property
    def training_loss_reduction(self) -> DistillLossReduction:
        """Our loss on the training micro-batches (built once)."""
        if self._training_loss_reduction is None:
            self._training_loss_reduction = self._reduction()
        return self._training_loss_reduction

    @property
    def validation_loss_reduction(self) -> DistillLossReduction:
        """Our loss on the validation micro-batches (built once)."""
        if self._validation_loss_reduction is None:
            self._validation_loss_reduction = self._reduction(validation=True)
        return self._validation_loss_reduction
