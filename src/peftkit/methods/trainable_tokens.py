"""Trainable tokens — Hugging Face PEFT's ``TrainableTokensConfig`` / ``trainable_token_indices``: train only chosen
rows of an embedding matrix (e.g. the embeddings of newly added special tokens), not the whole matrix.

    forward:  E'(t) = V[j] if t = idx[j] else E(t)           (idx: the k chosen token ids, V ∈ R^{k×d} trained)
    init:     V = E[idx] (the current rows, so E' = E)  —  init_weights=False: V ~ N(0, 1)
    merge:    E[idx] ← V  (the rows are replaced, not added to);  unmerge: E[idx] ← E0[idx] (kept at init)

Trainable: V — k·d for the whole embedding, where a full fine-tune of the matrix trains vocab·d. The values (not a
difference) are trained and saved, as PEFT does, so resizing the embedding matrix and re-initialising its new rows
does not change what the adapter computes; the file is PEFT's ``TRAINABLE_TOKENS`` format
(``<module>.trainable_tokens_delta``, the k×d values). Alone on a layer the forward selects rows exactly
(``where(chosen, V[slot], E(t))``); mixed with other adapters on the layer it contributes ``V[slot] − E0[idx]``.
Difference from PEFT: on a model whose output layer shares the embedding's weight (tied embeddings), PEFT also
applies the rows to the output layer; here only the targeted embedding changes until the adapter is merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.core.adapter import Adapter
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host
from peftkit.core.peft_names import TARGETING, alias
from peftkit.core.registry import register

_HF_IGNORED = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "target_modules", "init_weights", "token_indices",
})


@dataclass
class TrainableTokensConfig(AdapterConfig):
    """Trainable tokens. ``token_indices``: the token ids whose embedding rows train (distinct, ≥ 0, below the
    vocabulary size); ``init_weights``: start from the current rows (True) or from N(0, 1) draws (False, PEFT's
    option). Accepts Hugging Face PEFT ``TrainableTokensConfig``'s field names."""

    #: the input embeddings of Llama-style, BERT-style, GPT-2 / GPT-NeoX and T5 models
    target_modules: list[str] | str | None = r"(.*\.)?(embed_tokens|word_embeddings|wte|embed_in|shared)"
    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    peft_type = "TRAINABLE_TOKENS"
    peft_names = {**TARGETING, "token_indices": alias("token_indices"), "init_weights": alias("init_weights")}

    def validate(self) -> None:
        super().validate()
        idx = self.token_indices
        if not isinstance(idx, list | tuple) or not idx:
            raise PeftkitError(f"TrainableTokensConfig.token_indices must be a non-empty list of token ids (CLI: "
                               f"--opt token_indices=[5,17]), got {idx!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in idx):
            raise PeftkitError(f"TrainableTokensConfig.token_indices must be token ids (integers >= 0), got {idx!r}")
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if list(idx).count(i) > 1})
            raise PeftkitError(f"TrainableTokensConfig.token_indices lists token ids {dup} more than once")
        if self.dropout != 0.0:
            raise PeftkitError(f"TrainableTokensConfig.dropout must be 0 (the rows are values, not a transform), "
                               f"got {self.dropout}")
        if not isinstance(self.init_weights, bool):
            raise PeftkitError(f"TrainableTokensConfig.init_weights must be True or False, got {self.init_weights!r}")


@register(
    "trainable_tokens",
    config=TrainableTokensConfig,
    family="selective",
    paper="Hugging Face PEFT's trainable tokens (TrainableTokensConfig; trainable_token_indices)",
    description="only the chosen token ids' embedding rows train (e.g. new special tokens); the rows are replaced",
    params="k·d for the k chosen token ids (d = embedding width)",
    hosts=("embedding",),
    hf_peft_type="TRAINABLE_TOKENS",
    lr_scale=1.0,
)
class TrainableTokens(Adapter):
    additive = False  # replaces rows of the host weight (see Adapter.additive)
    def __init__(self, host: Host, config: TrainableTokensConfig) -> None:
        super().__init__(host, config)
        idx = list(config.token_indices)
        vocab = host.d_in
        if max(idx) >= vocab:
            raise PeftkitError(f"trainable_tokens on {host.name!r}: token id {max(idx)} is outside the embedding's "
                               f"vocabulary of {vocab} rows")
        w = host.module.weight
        index = torch.tensor(idx, dtype=torch.long, device=w.device)
        original = w.detach()[index].clone()
        if config.init_weights:
            values = original.clone()
        else:  # drawn on a CPU generator seeded from the ids, so the same config gives the same rows on any device
            g = torch.Generator().manual_seed(sum(idx) * 1_000_003 + len(idx))
            values = torch.randn(original.shape, generator=g).to(device=w.device, dtype=w.dtype)
        self.trainable_tokens_delta = torch.nn.Parameter(values)
        # not saved (rebuilt from the config and the base): the ids, the original rows, and token id → slot + 1
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("original", original, persistent=False)
        slot = torch.zeros(vocab, dtype=torch.long, device=w.device)
        slot[index] = torch.arange(1, len(idx) + 1, device=w.device)
        self.register_buffer("slot", slot, persistent=False)

    def _rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``rows[j]`` where ``x`` is ``idx[j]``, zeros elsewhere (one embedding lookup over k + 1 rows)."""
        return F.embedding(self.slot[x], torch.cat([rows.new_zeros(1, rows.shape[1]), rows]))

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self._rows(x, self.trainable_tokens_delta - self.original.to(self.trainable_tokens_delta)).to(
            base_out.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.host.module(x)
        chosen = (self.slot[x] > 0).unsqueeze(-1)
        return torch.where(chosen, self._rows(x, self.trainable_tokens_delta).to(base.dtype), base)

    # -- merging: the rows are replaced, so merge and unmerge write rows instead of adding ΔW -----------------
    def delta_weight(self) -> torch.Tensor:
        dw = torch.zeros(self.host.d_out, self.host.d_in, dtype=self.trainable_tokens_delta.dtype,
                         device=self.trainable_tokens_delta.device)
        dw[:, self.index] = (self.trainable_tokens_delta - self.original.to(dw.dtype)).detach().t()
        return dw

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = weight.clone()
        w[:, self.index] = self.trainable_tokens_delta.detach().t().to(w.dtype)
        return w, bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = weight.clone()
        w[:, self.index] = self.original.t().to(w.dtype)
        return w, bias

    @classmethod
    def expected_params(cls, host: Host, config: TrainableTokensConfig) -> int:
        return len(config.token_indices) * host.d_out

    # -- Hugging Face PEFT: peft_type TRAINABLE_TOKENS ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> TrainableTokensConfig:
        unknown = sorted(k for k, v in hf_config.items() if k not in _HF_IGNORED and v not in (None, False, [], {}))
        if unknown:
            raise PeftkitError(f"unknown Hugging Face PEFT TRAINABLE_TOKENS option {unknown[0]}="
                               f"{hf_config[unknown[0]]!r}; peftkit cannot tell whether it changes the adapter's "
                               f"outputs, so it refuses to load the adapter")
        return TrainableTokensConfig(target_modules=hf_config.get("target_modules") or "embed_tokens",
                                     token_indices=list(hf_config.get("token_indices") or []),
                                     init_weights=bool(hf_config.get("init_weights", True)))

    @classmethod
    def to_hf_config(cls, config: TrainableTokensConfig, hosts: list[Host]) -> dict[str, Any]:
        if config.modules_to_save or config.bias != "none":
            raise PeftkitError("cannot export to Hugging Face PEFT format: its TRAINABLE_TOKENS adapters hold no "
                               "modules_to_save or biases")
        return {"token_indices": list(config.token_indices), "init_weights": config.init_weights,
                "target_modules": [h.name.rsplit(".", 1)[-1] for h in hosts]}

    @classmethod
    def hf_layout(cls, host: Host, config: TrainableTokensConfig) -> dict[str, HFTensor] | None:
        shape = (len(config.token_indices), host.d_out)
        return {"trainable_tokens_delta": HFTensor("trainable_tokens_delta", shape, shape)}
