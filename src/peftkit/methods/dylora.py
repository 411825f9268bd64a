"""DyLoRA — Valipour et al., EACL 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation" (arXiv 2210.07558; official code github.com/huawei-noah/Efficient-NLP ``DyLoRA``).

    forward:  y = base(x) + (α/b)·dropout(x)·A[:b]ᵀ·B[:, :b]ᵀ  at the active rank b ∈ {1..r}  (rsLoRA: α/√b)
    init:     A ~ kaiming_uniform(a=√5), B = 0  ⇒  ΔW = 0 for every b
    merge:    W ← W0 + (α/b)·B[:, :b]·A[:b]  for the current b

Trainable: A ∈ R^{r×d_in}, B ∈ R^{d_out×r} — r·(d_in + d_out) per layer, shared by the whole nested family of ranks.
Training: :class:`DyLoRASampler` (attached by the trainer) samples one b ~ Uniform{1..r} for all layers before every
optimiser step; ``mode="frozen"`` (the official training callback) detaches A[:b−1] and B[:, :b−1] so that only row
b−1 of A and column b−1 of B learn at that step, ``"full"`` trains all of A[:b], B[:, :b]. The default ``"auto"``
picks from the run's budget (the trainer tells the sampler the run's length): frozen mode updates row b only when b
is drawn, about steps/r times, and the paper trains for ~30 epochs (GLUE: roughly 300–400+ updates per rank); in a
short run it leaves every rank under-trained (issue 21, default task, 300 steps, r = 8: frozen scores 0.729 at rank
8 and 0.633 at rank 2 against LoRA's 0.812 / 0.823; full scores 0.812 / 0.796). So ``auto`` is frozen when the run
gives every rank at least ``FROZEN_UPDATES_PER_RANK`` = 250 expected updates (steps ≥ 250·r), else full — also when
the run's length is unknown. At evaluation any b works
(search-free): ``set_rank(model, b)``; the default is ``eval_rank`` or r (which makes the layer exactly LoRA, α/r).
Resolved: the frozen-mode detach applies only while the adapter is in training mode (an eval-mode backward reaches
all of A[:b], B[:, :b]); the active b is a plain attribute, not saved — a loaded adapter starts at ``eval_rank`` or r;
a merge remembers its b so that unmerge subtracts the same ΔW, and ``set_rank`` refuses to change a merged adapter.
With per-module ``overrides`` of r the sampler draws b from 1..max r and gives each layer min(b, its r).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import (
    LowRankConfig,
    fused_lowrank_forward,
    init_down_,
    lowrank_delta,
    lowrank_scaling,
    new_factors,
)
from peftkit.core.model import adapted_layers, adapter_names, get_config
from peftkit.core.model import set_rank as core_set_rank
from peftkit.core.procedure import Procedure
from peftkit.core.registry import HOST_KINDS, QUANTIZED_HOSTS, register

FROZEN_UPDATES_PER_RANK = 250  # "auto": frozen mode when the run gives every rank this many expected updates


@dataclass
class DyloraConfig(LowRankConfig):
    """DyLoRA. ``r``: maximum rank; ``mode``: ``"frozen"`` (train only the sampled rank's row/column), ``"full"``,
    or ``"auto"`` (frozen for a run long enough to train every rank that way, else full: module docstring);
    ``eval_rank``: the rank used outside training (default r)."""

    mode: Literal["auto", "frozen", "full"] = "auto"
    eval_rank: int | None = None

    def train_mode(self, run_steps: int | None) -> str:
        """The mode a run of ``run_steps`` optimiser steps trains in (``auto`` resolved)."""
        if self.mode != "auto":
            return self.mode
        return "frozen" if run_steps is not None and run_steps >= FROZEN_UPDATES_PER_RANK * self.r else "full"

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("auto", "frozen", "full"):
            raise PeftkitError(f"DyloraConfig.mode must be auto, frozen or full, got {self.mode!r}")
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
            raise PeftkitError(f"DyloraConfig.eval_rank must be in 1..r = 1..{self.r}, got {self.eval_rank}")


def _layers(model: nn.Module, names: set[str] | None = None) -> Iterator[tuple[str, str, Any, Dylora]]:
    """(module path, adapter name, adapted layer, adapter) of every DyLoRA adapter (named in ``names``)."""
    for path, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if isinstance(a, Dylora) and (names is None or n in names):
                yield path, n, layer, a


def _set_ranks(found: list[tuple[str, str, Any, Dylora]], ranks: list[int]) -> None:
    """Check every (layer, rank) first, then set them all (an error changes nothing)."""
    for (path, n, layer, a), b in zip(found, ranks):
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= a.r:
            raise PeftkitError(f"DyLoRA adapter {n!r} on {path!r}: rank must be an integer in 1..{a.r}, got {b!r}")
        if n in layer.merged and b != a.rank:
            raise PeftkitError(f"DyLoRA adapter {n!r} is merged into {path!r}; unmerge before changing its rank")
    for (_, _, _, a), b in zip(found, ranks):
        a.rank = b


def set_rank(model: nn.Module, b: int, name: str | None = None) -> None:
    """Use rank ``b`` (1..r) in every DyLoRA adapter of ``model`` (or only in the adapter ``name``); the same as
    :func:`peftkit.set_rank`."""
    core_set_rank(model, b, name)


class DyLoRASampler(Procedure):
    """Before every optimiser step: b ~ Uniform{1..r} (one b for all layers, from its own seeded generator) set on
    every DyLoRA layer; after training: back to ``eval_rank`` or r. ``config`` (as the trainer passes it) limits it
    to the adapters built from that config; without it every DyLoRA adapter of the model takes part."""

    def __init__(self, model: nn.Module | None = None, config: AdapterConfig | None = None, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.step = 0  # samples drawn so far
        self.rank: int | None = None  # the last sampled b

    def _found(self, model: nn.Module) -> list[tuple[str, str, Any, Dylora]]:
        names = None
        if self.config is not None:
            names = {n for n in adapter_names(model) if get_config(model, n) is self.config}
            names = names or {n for n in adapter_names(model) if get_config(model, n) == self.config}
        found = list(_layers(model, names))
        if not found:
            which = " built from this config" if self.config is not None else ""
            raise PeftkitError(f"DyLoRASampler: the model has no DyLoRA adapter{which}")
        return found

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        for *_, a in self._found(model):  # "auto": frozen or full from the run's length
            a.train_mode = a.config.train_mode(self.run_steps)

    def on_step_start(self, model: nn.Module, step: int) -> None:
        found = self._found(model)
        r_max = max(a.r for *_, a in found)
        b = int(torch.randint(1, r_max + 1, (1,), generator=self.generator))
        _set_ranks(found, [min(b, a.r) for *_, a in found])
        self.rank = b
        self.step += 1

    def on_train_end(self, model: nn.Module) -> None:
        found = self._found(model)
        _set_ranks(found, [a.config.eval_rank or a.r for *_, a in found])

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "rank": self.rank, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.step, self.rank = state["seed"], state["step"], state["rank"]
        self.generator.set_state(state["generator"])


@register(
    "dylora",
    config=DyloraConfig,
    family="procedure",
    paper="Valipour et al., EACL 2023, DyLoRA: Dynamic Search-Free Low-Rank Adaptation (arXiv 2210.07558)",
    description="LoRA trained for every rank b ≤ r at once (b sampled per step, scale α/b); any b at inference; "
                "mode auto: full in short runs, the official frozen mode from 250·r steps",
    params="r·(d_in + d_out)",
    hosts=HOST_KINDS + QUANTIZED_HOSTS,
    procedure=DyLoRASampler,
)
class Dylora(Adapter):
    def __init__(self, host: Host, config: DyloraConfig) -> None:
        super().__init__(host, config)
        self.r = config.r
        self.rank = config.eval_rank or config.r  # the active b
        self.train_mode = config.train_mode(None)  # the sampler resolves "auto" from the run's length
        self.lora_A, self.lora_B = new_factors(host, config.r)
        init_down_(self.lora_A, "kaiming", config.r)
        self.dropout = make_dropout(config.dropout)
        self._merged_rank: int | None = None

    def scaling(self, b: int | None = None) -> float:
        return lowrank_scaling(self.config.alpha, self.rank if b is None else b, self.config.rslora)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:b], B[:, :b]); in frozen mode while training, all but row / column b−1 detached."""
        b = self.rank
        a, bb = self.lora_A[:b], self.lora_B[:, :b]
        if self.train_mode == "frozen" and self.training and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1:]])
            bb = torch.cat([bb[:, : b - 1].detach(), bb[:, b - 1:]], dim=1)
        return a, bb

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return lowrank_delta(self.host, self.dropout(x), a, b, self.scaling())

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.config.dropout > 0 and self.training:
            return None
        a, b = self.factors()
        return fused_lowrank_forward(self.host, x, a, b, self.scaling())

    def delta_weight(self, b: int | None = None) -> torch.Tensor:
        b = self.rank if b is None else b
        return self.scaling(b) * (self.lora_B[:, :b] @ self.lora_A[:b])

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._merged_rank = self.rank
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.rank if self._merged_rank is None else self._merged_rank
        self._merged_rank = None
        return weight - self.delta_weight(b).to(weight.dtype), bias

    def rank_range(self) -> tuple[int, int]:
        return 1, self.r

    def set_rank(self, b: int) -> None:
        self.rank = b

    @classmethod
    def expected_params(cls, host: Host, config: DyloraConfig) -> int:
        return config.r * (host.d_in + host.d_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, rank={self.rank}, mode={self.train_mode}"
