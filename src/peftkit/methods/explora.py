"""ExPLoRA — Khanna et al. 2025, "ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers
under Domain Shifts" (ICML 2025; github.com/samar-khanna/ExPLoRA): a few whole blocks U train fully, every other
block gets LoRA, all LayerNorms train; the model continues its self-supervised objective, then LoRA is merged.

    forward:  blocks in U: the block with all of its parameters trainable (a trained copy θ_U);
              other targeted layers: y = x·W0ᵀ + b0 + s·x·Aᵀ·Bᵀ (LoRA, s = α/r);  norms outside U: trained copies
    init:     θ_U = θ_U⁰, norm copies = the base norms, A ~ kaiming_uniform(a=√5), B = 0  ⇒ the base model exactly
    merge:    W ← W0 + s·B·A on the LoRA layers; U and the norms keep their trained copies (merge_and_unload puts the
              copies in place of the originals, giving the new backbone W_S + Δ_T)

Trainable: Σ params(U) + r·(d_in + d_out) per LoRA layer + Σ params(norms outside U). The unfrozen blocks and norms
are ``modules_to_save`` entries (trainable copies, saved with the adapter and restored on load), resolved against
the model by :meth:`ExploraConfig.resolve`: ``unfreeze_layers`` are block indices (negative counts from the end,
per stack of numbered blocks such as ``encoder.layer.N`` / ``model.layers.N`` / ``h.N``; ``layers_pattern`` picks
the stack name), ``unfreeze_modules`` names blocks directly; LoRA goes to the targets that lie outside U. The spec's
defaults are unconfirmed: U = the last block (DINOv2 ViT-L, r = 64), LoRA on the attention Q and V projections
(give them as ``target_modules``, e.g. ``["query", "value"]``), norms unfrozen. The self-supervised loss is the
user's. Written to Hugging Face PEFT as a ``LORA`` adapter with those ``modules_to_save`` (the same function).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peftkit.core.errors import PeftkitError
from peftkit.core.host import NORM_KINDS, host_kind
from peftkit.core.layer import SavedModule
from peftkit.core.registry import HOST_KINDS, QUANTIZED_HOSTS, register
from peftkit.core.targeting import DEFAULT_LAYER_PATTERNS, find_targets, matches
from peftkit.methods.lora import Lora, LoraConfig

_WRAPPER_PARTS = (".original_module", ".copies.", ".base_layer", ".adapters.")


def _user_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) in model order, peftkit wrappers seen as the module they wrap, their insides skipped."""
    out = []
    for n, m in model.named_modules():
        if not n or any(p in n + "." for p in _WRAPPER_PARTS):
            continue
        out.append((n, m.original_module if isinstance(m, SavedModule) else m))
    return out


def _inside(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@dataclass
class ExploraConfig(LoraConfig):
    """ExPLoRA: LoRA (all of :class:`LoraConfig`) outside the unfrozen blocks. ``unfreeze_layers``: block indices
    (default ``[-1]``, the last block); ``unfreeze_modules``: block names (suffixes) to unfreeze as well;
    ``unfreeze_norms``: train every LayerNorm / RMSNorm outside U too."""

    unfreeze_layers: list[int] = field(default_factory=lambda: [-1])
    unfreeze_modules: list[str] | None = None
    unfreeze_norms: bool = True

    def _blocks(self, modules: list[tuple[str, nn.Module]]) -> list[str]:
        """Full names of the blocks in U (model order), from ``unfreeze_layers`` and ``unfreeze_modules``."""
        pats = "|".join(re.escape(p) for p in ((self.layers_pattern,) if self.layers_pattern
                                                else DEFAULT_LAYER_PATTERNS))
        stacks: dict[str, dict[int, str]] = {}
        for n, _ in modules:
            m = re.fullmatch(rf"((?:.*\.)?(?:{pats}))\.(\d+)", n)
            if m:
                stacks.setdefault(m.group(1), {})[int(m.group(2))] = n
        chosen: set[str] = set()
        for i in self.unfreeze_layers:
            hit = [blocks[j] for blocks in stacks.values()
                   if (j := i if i >= 0 else max(blocks) + 1 + i) in blocks]
            if not hit:
                found = ", ".join(f"{s}.0..{max(b)}" for s, b in stacks.items()) or (
                    "(none; name the blocks with unfreeze_modules or set layers_pattern)")
                raise PeftkitError(f"ExploraConfig.unfreeze_layers: no block has index {i}; numbered blocks: {found}")
            chosen.update(hit)
        for entry in self.unfreeze_modules or []:
            hit = [n for n, _ in modules if matches(n, [entry])]
            if not hit:
                raise PeftkitError(f"ExploraConfig.unfreeze_modules entry {entry!r} matched no module")
            chosen.update(hit)
        ordered = [n for n, _ in modules if n in chosen]
        return [n for n in ordered if not _inside(n.rpartition(".")[0], ordered)]  # outermost blocks only

    def resolve(self, model: Any) -> ExploraConfig:
        """Explicit ``target_modules`` (LoRA targets outside U) and ``modules_to_save`` (the user's entries, the
        blocks in U, the norms outside U) for ``model``; resolving the result again gives it back."""
        modules = _user_modules(model)
        blocks = self._blocks(modules)
        lora = [n for n, _ in find_targets(model, self) if not _inside(n, blocks)]
        if not lora:
            raise PeftkitError(f"ExploraConfig.target_modules={self.target_modules!r}: every match lies inside the "
                               f"unfrozen blocks {blocks}; LoRA needs targets outside them")
        saved = list(self.modules_to_save or [])
        saved_paths = [n for n, _ in modules if saved and matches(n, saved)]
        if self.unfreeze_norms:
            norms = [n for n, m in modules if host_kind(m) in NORM_KINDS and not _inside(n, blocks + saved_paths)]
        else:
            norms = []
        keep = list(dict.fromkeys(saved + blocks + norms))
        return dataclasses.replace(self, target_modules=lora, exclude_modules=None, target_types=None,
                                   layers_to_transform=None, modules_to_save=keep or None)


@register(
    "explora",
    config=ExploraConfig,
    family="hybrid",
    paper="Khanna et al. 2025, ExPLoRA (ICML 2025, arXiv 2406.10973)",
    description="extended pre-training: whole chosen blocks unfrozen (default: the last), LoRA on the rest, "
                "all norms unfrozen; blocks and norms saved with the adapter",
    params="r·(d_in + d_out) per LoRA layer + params(unfrozen blocks) + params(norms)",
    hosts=HOST_KINDS + QUANTIZED_HOSTS,
    hf_peft_type="LORA",
)
class Explora(Lora):
    """LoRA on the layers outside U; the unfrozen blocks and norms are the core's saved modules."""

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> None:
        return None  # a Hugging Face LORA file is read as "lora" (modules_to_save included): the same function
