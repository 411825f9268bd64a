"""PYRA (and ToMe token merging) inside a pretrained ``transformers`` ViT-family model, with a merge schedule.

:func:`patch_vit` turns every encoder layer of a ViT / DeiT / ViT-MSN / ViT-MAE model (any layer with the ViT layout:
``layernorm_before`` → ``attention`` (``q/k/v/o_proj``) → residual → ``layernorm_after`` → ``mlp`` → residual) into a
ToMe layer, as the official code patches timm's ``Block`` (THU-MIG/PYRA ``model/tome.py``, after Bolya et al.'s ToMe):

    x ← x + Attn(LN₁(x))      proportional attention: log(token size) added to the attention logits
    merge r_l tokens          bipartite soft matching on the mean key over heads (the keys the layer computed,
                              adapter included); size-weighted average with PYRA re-activation
                              (:func:`~peftkit.heads.pyra.merge_wavg`); the class (and DeiT's distillation) token
                              never merges
    x ← x + MLP(LN₂(x))

``r`` is the merge schedule: an int (r tokens in every layer), a list (one per layer, missing ones 0), or ToMe's
``(r, inflection)`` pair (inflection −1: decreasing). The schedule is checked against the model's token count when
patching: a layer asked to merge more than half of its mergeable tokens is a clear error (ToMe silently merges fewer).
PYRA's parameters per layer with r_l > 0 (``layer.pyra``: W_a (r_l×1), W_b (1×d) = 0, LayerNorm(d)) are trainable;
they sit in the model's own state dict. Combine with a PEFT method on the layers' Linear modules (``peftkit.adapt``),
before or after patching. :func:`unpatch_vit` restores the plain layers. Not with gradient checkpointing (a
recomputed layer would read a later layer's token sizes).
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.core.errors import PeftkitError

from .pyra import Matching, PyraReactivation, bipartite_soft_matching, merge_wavg

_PATCHED: dict[type, type] = {}  # layer class -> its ToMe subclass
_ORIGINAL: dict[type, type] = {}  # and back


def parse_schedule(layers: int, r: int | list[int] | tuple[int, float]) -> list[int]:
    """ToMe's ``parse_r``: the number of tokens each of ``layers`` layers merges."""
    if isinstance(r, list):
        if len(r) > layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in r):
            raise PeftkitError(f"a merge schedule is at most {layers} whole numbers >= 0 (one per layer), got {r}")
        return list(r) + [0] * (layers - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        if len(r) != 2 or not -1.0 <= float(r[1]) <= 1.0:
            raise PeftkitError(f"a merge schedule pair is (r, inflection in [-1, 1]), got {r}")
        r, inflect = r
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise PeftkitError(f"tokens merged per layer must be a whole number >= 0, got {r!r}")
    lo = int(r * (1.0 - inflect))
    step = (2 * r - 2 * lo) / max(1, layers - 1)
    return [int(lo + step * i) for i in range(layers)]


def _vit_layers(model: nn.Module) -> list[nn.Module]:
    for mod in model.modules():
        for attr in ("layers", "layer"):
            seq = getattr(mod, attr, None)
            if isinstance(seq, nn.ModuleList) and len(seq) and all(_is_vit_layer(m) for m in seq):
                return list(seq)
    raise PeftkitError(f"{type(model).__name__} has no ViT-layout encoder layers (layernorm_before, attention with "
                       "q/k/v/o_proj, layernorm_after, mlp); patch_vit supports the ViT family of transformers")


def _is_vit_layer(m: nn.Module) -> bool:
    att = getattr(m, "attention", None)
    return all(hasattr(m, a) for a in ("layernorm_before", "layernorm_after", "mlp", "dropout")) and all(
        hasattr(att, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "num_attention_heads"))


def _protected(model: nn.Module) -> int:
    """Tokens that never merge: the class token, and DeiT's distillation token."""
    emb = next((m for m in model.modules() if hasattr(m, "cls_token")), None)
    if emb is None:
        raise PeftkitError(f"{type(model).__name__}: ToMe merging needs a class token (embeddings.cls_token)")
    return 2 if getattr(emb, "distillation_token", None) is not None else 1


def _tokens(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    image, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and patch > 0:
        return (image // patch) ** 2
    return None


class ToMeViTLayer(nn.Module):
    """Mixin put in front of a ViT layer's class by :func:`patch_vit` (its forward replaces the layer's)."""

    _tome_r: int
    _tome_info: dict

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:
        info = self._tome_info
        if attention_mask is not None:
            raise PeftkitError("ToMe merging changes the number of tokens: it cannot run with an attention mask")
        b, n, _ = hidden_states.shape
        size = info.get("size")
        if self._tome_first or size is None or size.shape[:2] != (b, n):
            size = torch.ones(b, n, 1, device=hidden_states.device, dtype=hidden_states.dtype)
        keys: list[torch.Tensor] = []
        hook = self.attention.k_proj.register_forward_hook(lambda mod, inp, out: keys.append(out))
        try:  # proportional attention: log(size) on the logits, as an additive mask over the keys
            bias = size.log().to(hidden_states.dtype)[:, None, None, :, 0] if info["prop_attn"] else None
            h, _ = self.attention(self.layernorm_before(hidden_states), bias, **kwargs)
        finally:
            hook.remove()
        x = self.dropout(h) + hidden_states
        r = self._tome_r
        if r > 0:
            protected = info["protected"]
            if r > (n - protected) // 2:
                raise PeftkitError(f"ToMe layer {self._tome_index}: merging {r} tokens needs at least "
                                   f"{2 * r + protected} tokens, {n} arrive; lower the merge schedule")
            metric = keys[-1].view(b, n, self.attention.num_attention_heads, -1).mean(2)
            match = bipartite_soft_matching(metric, r, class_token=True, distill_token=protected == 2)
            x, size = merge_wavg(match, x, size, self.pyra if isinstance(self.pyra, PyraReactivation) else None)
        info["size"] = size
        return self.dropout(self.mlp(self.layernorm_after(x))) + x


def patch_vit(model: nn.Module, r: int | list[int] | tuple[int, float], *, pyra: bool = True,
              prop_attn: bool = True) -> list[int]:
    """Patch ``model``'s ViT layers in place for ToMe merging with ``r`` (schedule, see the module docstring) and, with
    ``pyra``, PYRA re-activation. Returns the schedule. Checked first (nothing changes on error): the model has ViT
    layers and a class token, is not patched yet, and no layer merges more than half of its mergeable tokens."""
    layers = _vit_layers(model)
    if any(isinstance(m, ToMeViTLayer) for m in layers):
        raise PeftkitError("the model is already patched for ToMe merging; unpatch_vit first")
    schedule = parse_schedule(len(layers), r)
    protected = _protected(model)
    n = _tokens(model)
    if n is not None:
        n += protected
        for i, ri in enumerate(schedule):
            if ri > (n - protected) // 2:
                raise PeftkitError(f"merge schedule {schedule}: layer {i} would merge {ri} tokens but only {n} reach "
                                   f"it ({n - protected} mergeable, at most {(n - protected) // 2} can merge); lower "
                                   "the schedule")
            n -= ri
    info: dict = {"prop_attn": prop_attn, "protected": protected, "size": None}
    for i, (layer, ri) in enumerate(zip(layers, schedule)):
        cls = type(layer)
        if cls not in _PATCHED:
            _PATCHED[cls] = type(f"ToMe{cls.__name__}", (ToMeViTLayer, cls), {})
            _ORIGINAL[_PATCHED[cls]] = cls
        layer.__class__ = _PATCHED[cls]
        layer._tome_r, layer._tome_info, layer._tome_index, layer._tome_first = ri, info, i, i == 0
        hidden = layer.layernorm_before.normalized_shape[0]
        w = layer.layernorm_before.weight
        layer.pyra = PyraReactivation(hidden, ri).to(w.device, w.dtype) if pyra and ri > 0 else None
    return schedule


def unpatch_vit(model: nn.Module) -> None:
    """Undo :func:`patch_vit`: the plain layers again (their PYRA parameters are removed)."""
    for layer in _vit_layers(model):
        if isinstance(layer, ToMeViTLayer):
            del layer.pyra
            for a in ("_tome_r", "_tome_info", "_tome_index", "_tome_first"):
                delattr(layer, a)
            layer.__class__ = _ORIGINAL[type(layer)]


__all__ = ["Matching", "ToMeViTLayer", "parse_schedule", "patch_vit", "unpatch_vit"]
