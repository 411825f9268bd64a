"""Prefix tuning — Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL 2021,
arXiv 2101.00190).

    forward:  every attention layer l attends over [K_l; X·W_k] and [V_l; X·W_v]: P learned key and value vectors per
              layer (per key/value head) in front of the real tokens' own; queries come from the real tokens only.
              The pairs live in one table T ∈ R^{P×2·L·d_kv} (d_kv = H_kv·d_h), read as (P, L, 2, H_kv, d_h) and
              injected through the model's key/value cache (see :mod:`peftkit.core.kvprefix`); the attention mask
              gains P visible columns and position ids move by P.
    init:     reparametrised (default, as in the official code): T = MLP(E), E ∈ R^{P×d} ~ N(0, 1) (nn.Embedding),
              MLP = Linear(d, m) → tanh → Linear(m, 2·L·d_kv) with PyTorch's default Linear init, m = 512;
              ``prefix_projection=False``: T ~ N(0, 1) directly.
    merge:    none — the prefix is extra attention context, not a weight change (not mergeable). After training,
              :func:`fold_projection` replaces MLP(E) by the table it computes (the official "keep only the MLP
              output"); the adapter then saves as ``prefix_projection=False`` with P·2·L·d_kv numbers.

Trainable: P·d + (d·m + m) + (m·2·L·d_kv + 2·L·d_kv) with the MLP; P·2·L·d_kv folded or without it.
Defaults: P = 10, m = 512, prefix dropout 0 (the paper's table-to-text setting; lr 5e-5, batch 10, 5 epochs on
GPT-2 medium). Needs a Hugging Face model whose attention takes a key/value cache (decoders like GPT-2 / Llama, and
BERT-style encoders, which read the cache and the longer mask too); encoder-decoder models are not supported (the
paper prefixes both stacks). Reads and writes Hugging Face PEFT ``PREFIX_TUNING`` files: PEFT saves the computed
table, so a file loads as a folded adapter (``prefix_projection=False``), and an adapter with its MLP is written as
its table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from peftkit.core.kvprefix import KVPrefix, KVPrefixConfig, fold_projection, geometry
from peftkit.core.peft_names import FROM_MODEL, alias, inert, names_list, or_default
from peftkit.core.registry import register

__all__ = ["PrefixTuning", "PrefixTuningConfig", "fold_projection"]


@dataclass
class PrefixTuningConfig(KVPrefixConfig):
    """``num_virtual_tokens`` P = 10, ``prefix_projection`` = True (MLP of hidden width ``encoder_hidden_size`` = 512;
    None: the model's hidden size, as in Hugging Face PEFT), ``dropout`` on the prefixes = 0. Accepts Hugging Face
    PEFT ``PrefixTuningConfig``'s field names (PEFT's default is ``prefix_projection=False``)."""

    encoder_hidden_size: int | None = 512

    peft_type = "PREFIX_TUNING"
    peft_names = {
        **FROM_MODEL,
        "num_virtual_tokens": or_default("num_virtual_tokens"),
        "modules_to_save": alias("modules_to_save", names_list),
        "init_weights": inert(None, "PEFT's 'zero' starts the prefixes at zero; peftkit draws them as the paper "
                                    "does (N(0, 1) table or MLP of N(0, 1) embeddings)"),
    }

    def resolve(self, model: Any) -> PrefixTuningConfig:
        """``encoder_hidden_size=None`` made the model's hidden size (idempotent)."""
        if self.encoder_hidden_size is not None:
            return self
        return replace(self, encoder_hidden_size=geometry(model, self.method).hidden)


@register(
    "prefix_tuning",
    config=PrefixTuningConfig,
    family="soft-prompt",
    paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation (arXiv 2101.00190)",
    description="P learned key/value vectors in front of every attention layer's own, reparametrised by an MLP "
                "(foldable into the table after training)",
    params="P·d + (d+1)·m + (m+1)·2·L·d_kv (MLP; m = 512); P·2·L·d_kv folded — for the whole model",
    hosts=(),
    mergeable=False,
    init_is_identity=False,
    model_level=True,
    hf_peft_type="PREFIX_TUNING",
    lr_scale=0.15,  # 2.6M values through the reparametrising MLP; the fresh head needs the task's rate
    head_lr_scale=1.0,
)
class PrefixTuning(KVPrefix):
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> PrefixTuningConfig:
        # Hugging Face PEFT saves the table the MLP computed: it loads as a folded adapter
        return PrefixTuningConfig(num_virtual_tokens=int(hf_config["num_virtual_tokens"]), prefix_projection=False,
                                  encoder_hidden_size=int(hf_config.get("encoder_hidden_size") or 512))
