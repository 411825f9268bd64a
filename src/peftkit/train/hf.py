"""Training procedures inside Hugging Face ``transformers.Trainer``.

A :class:`ProcedureCallback` maps the Trainer's events onto the procedure protocol:

    on_train_begin → on_train_start(model, optimizer)
    on_step_begin  → on_step_start(model, state.global_step)        (once per optimiser step)
    on_step_end    → on_step_end(model, state.global_step - 1, optimizer)
    on_train_end   → on_train_end(model)

so step numbers match :func:`peftkit.train.trainer.train` (0-based: the Trainer increments ``global_step`` before
``on_step_end``).

A callback cannot change the loss, so a procedure's ``extra_loss`` is NOT applied by the callback alone. For
procedures that add a loss term, mix :class:`ProcedureLossMixin` into the Trainer class; it overrides
``compute_loss`` to add every ``extra_loss`` and registers the callback itself::

    class MyTrainer(ProcedureLossMixin, transformers.Trainer):
        pass

    trainer = MyTrainer(model=model, args=args, train_dataset=ds, procedures=[DensityLoss(...)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..core.procedure import Procedure


def _unwrap(model: Any) -> Any:
    """The user's module under DDP / DataParallel / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class ProcedureCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that drives one or more procedures (every hook except ``extra_loss``)."""

    def __init__(self, procedures: Procedure | Sequence[Procedure]) -> None:
        self.procedures = [procedures] if isinstance(procedures, Procedure) else list(procedures)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        for p in self.procedures:
            if getattr(state, "max_steps", 0) > 0:
                p.run_steps = int(state.max_steps)
            p.on_train_start(_unwrap(model), optimizer)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        for p in self.procedures:
            p.on_step_start(_unwrap(model), state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        for p in self.procedures:
            p.on_step_end(_unwrap(model), state.global_step - 1, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        for p in self.procedures:
            p.on_train_end(_unwrap(model))


class AdapterCheckpointCallback(TrainerCallback):
    """Save the adapter (``peftkit.save``: ``adapter_config.json`` + ``adapter_model.safetensors``, a few MB) into
    every checkpoint folder the Trainer writes, as ``checkpoint-<step>/adapter/`` — loadable with
    ``peftkit.load(base_model, path)`` without the Trainer's full-model files."""

    def __init__(self, subfolder: str = "adapter") -> None:
        self.subfolder = subfolder

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not state.is_world_process_zero:
            return
        from pathlib import Path

        from ..core.model import save

        save(_unwrap(model), Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.subfolder)


def as_trainer_callback(procedures: Procedure | Sequence[Procedure]) -> ProcedureCallback:
    """Wrap procedures for ``Trainer(callbacks=[...])``. Their ``extra_loss`` needs :class:`ProcedureLossMixin`."""
    return ProcedureCallback(procedures)


class ProcedureLossMixin:
    """Mix into a ``transformers.Trainer`` subclass (before ``Trainer``): takes ``procedures=[...]``, registers a
    :class:`ProcedureCallback` for them, and adds each procedure's ``extra_loss`` to the task loss.

    Under gradient accumulation the extra term is divided like the task loss, so it counts once per optimiser
    step (averaged over the micro-batches)."""

    def __init__(self, *args: Any, procedures: Sequence[Procedure] = (), **kwargs: Any) -> None:
        self.procedures = list(procedures)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if self.procedures:
            callbacks.append(ProcedureCallback(self.procedures))
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     **kwargs: Any) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)  # type: ignore[misc]
        if self.procedures and model.training:
            scale = 1.0
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = getattr(self, "model_accepts_loss_kwargs", False) and kwargs.get("num_items_in_batch") \
                    is not None
            if scaled:  # the Trainer will not divide this loss by the accumulation steps: do it for the extra
                scale = 1.0 / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            for p in self.procedures:
                extra = p.extra_loss(_unwrap(model), inputs, outputs)
                if extra is not None:
                    loss = loss + scale * extra
        return (loss, outputs) if return_outputs else loss
