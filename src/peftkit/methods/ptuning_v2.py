"""P-tuning v2 — Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks" (ACL 2022, arXiv 2110.07602).

    forward:  deep prompts: every attention layer l attends over [K_l; X·W_k] and [V_l; X·W_v] with P learned key and
              value vectors per layer, injected through the key/value cache exactly as prefix tuning does
              (:mod:`peftkit.core.kvprefix`); dropout (p = 0.1, the official ``hidden_dropout_prob``) on the prefix
              keys and values while training. A task head (e.g. a linear classifier on [CLS]) trains alongside it,
              through ``modules_to_save``, instead of a verbalizer.
    init:     the table T ∈ R^{P×2·L·d_kv} (d_kv = H_kv·d_h) is an nn.Embedding, T ~ N(0, 1) — no reparametrisation
              by default (``prefix_projection=False``, as in the official code); ``prefix_projection=True`` adds
              the MLP Linear(d, m) → tanh → Linear(m, 2·L·d_kv) with m = ``encoder_hidden_size``.
    merge:    none (not mergeable).

Trainable: P·2·L·d_kv (with the MLP: P·d + (d+1)·m + (m+1)·2·L·d_kv). Default P = 20 (the spec: about 20 for simple
classification, 100+ for sequence labelling).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.core.kvprefix import KVPrefix, KVPrefixConfig
from peftkit.core.registry import register


@dataclass
class PTuningV2Config(KVPrefixConfig):
    """``num_virtual_tokens`` P = 20, ``prefix_projection`` = False, ``dropout`` on the prefixes = 0.1."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    dropout: float = 0.1


@register(
    "ptuning_v2",
    config=PTuningV2Config,
    family="soft-prompt",
    paper="Liu et al. 2022, P-Tuning v2 (arXiv 2110.07602)",
    description="deep prompts: a free P×2·L·d_kv key/value table in front of every attention layer, prefix dropout",
    params="P·2·L·d_kv (for the whole model)",
    hosts=(),
    mergeable=False,
    init_is_identity=False,
    model_level=True,
    hf_peft_type="PREFIX_TUNING",
    lr_scale=5.0,
)
class PTuningV2(KVPrefix):
    """Written as Hugging Face PEFT ``PREFIX_TUNING`` (PEFT's P-tuning v2 is prefix tuning without projection); such
    files are read back by ``prefix_tuning`` (the same function; PEFT has no prefix dropout)."""
