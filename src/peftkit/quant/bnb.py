"""bitsandbytes NF4 / FP4 (``Linear4bit``) and LLM.int8 (``Linear8bitLt``) layers as frozen base weights.

peftkit never re-implements the quantisers: it reads the dequantised weight where a method needs W0, and writes a
merged weight back by quantising it again with bitsandbytes (same quant type and block size), reporting the
rounding error. The quantised layers are what transformers' ``BitsAndBytesConfig`` produces (``from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))``); :func:`quantize_model`
does the same for any ``nn.Module``.

bitsandbytes is an optional extra: ``pip install "peftkit[quant]"`` (or ``pip install bitsandbytes``).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import PeftkitError
from ..core.host import register_quantized

INSTALL_HINT = "quantised base weights need bitsandbytes: pip install 'peftkit[quant]' (or pip install bitsandbytes)"


def require_bnb() -> Any:
    """The ``bitsandbytes`` module, or a :class:`PeftkitError` saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise PeftkitError(INSTALL_HINT) from None
    return bitsandbytes


def kind(module: nn.Module) -> str | None:
    """``"bnb_4bit"`` / ``"bnb_8bit"`` for bitsandbytes linear layers, else None (never imports bitsandbytes: a
    bitsandbytes layer can only exist once the package was imported)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "bnb_4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "bnb_8bit"
    return None


def _int8_codes_scales(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
    if scb is None:
        raise PeftkitError(f"{type(module).__name__} holds no int8 scales; move it to its device first (.to('cpu'))")
    return w.data, scb


def dequantize(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float32 (d_out, d_in) matrix."""
    k = kind(module)
    if k == "bnb_4bit":
        from bitsandbytes.functional import dequantize_4bit

        w = module.weight
        qs = w.quant_state
        if qs is None:
            raise PeftkitError("Linear4bit weight is not quantised yet; move the layer to its device first")
        data = w.data
        if getattr(qs, "packing_format_for_cpu", False):
            # bitsandbytes repacks the codes (and rounds absmax to bf16) for its CPU inference kernel on the first
            # eval forward; undo that on a copy to read the weight the layer now computes with
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, qs = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(qs))
        return dequantize_4bit(data, qs).float()
    if k == "bnb_8bit":
        codes, scales = _int8_codes_scales(module)
        return codes.float() * (scales.float().view(-1, 1) / 127.0)
    raise PeftkitError(f"{type(module).__name__} is not a bitsandbytes quantised linear layer")


def keep_training_layout(module: nn.Module) -> None:
    """Keep a ``Linear4bit`` in bitsandbytes' standard layout: on CPUs with AVX512-BF16 its first eval forward with
    an input that needs no grad repacks the codes (block scales rounded to bf16) for an inference kernel, and a later
    training forward through the repacked weight fails (bitsandbytes 0.50 adds the bias in place to a tensor that
    requires grad). peftkit turns the repacking off on every quantised layer of an adapted model — train and eval
    then compute the same function — and undoes it where it already happened."""
    if kind(module) != "bnb_4bit":
        return
    module.support_avx512bf16_for_cpu = False
    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)


def requantize_(module: nn.Module, w2d: torch.Tensor) -> float:
    """Quantise the float (d_out, d_in) ``w2d`` into ``module`` (same quant type / block size); returns the largest
    absolute rounding error of the new weight."""
    bnb = require_bnb()
    k = kind(module)
    old = module.weight
    device = old.device
    if k == "bnb_4bit":
        new = bnb.nn.Params4bit(w2d.detach().to(torch.float32).contiguous().cpu(), requires_grad=False,
                                quant_type=old.quant_type, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_storage=old.quant_storage)
        module.weight = new.to(device)
        keep_training_layout(module)
    elif k == "bnb_8bit":
        new = bnb.nn.Int8Params(w2d.detach().to(torch.float16 if device.type != "cpu" else torch.float32)
                                .contiguous(), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(device)
        module.state.CB = None
        module.state.SCB = None
    else:
        raise PeftkitError(f"{type(module).__name__} is not a bitsandbytes quantised linear layer")
    return float((dequantize(module) - w2d.float()).abs().max())


def snapshot(module: nn.Module) -> tuple[Any, ...]:
    """What :func:`restore` needs to put the layer's quantised weight back bit for bit."""
    if kind(module) == "bnb_8bit":
        codes, scales = _int8_codes_scales(module)
        return ("bnb_8bit", codes.clone(), scales.clone())
    return ("bnb_4bit", module.weight)  # requantize_ replaces the Params4bit object: the old one stays intact


def restore(module: nn.Module, snap: tuple[Any, ...]) -> None:
    if snap[0] == "bnb_4bit":
        module.weight = snap[1]
        return
    bnb = require_bnb()
    codes, scales = snap[1], snap[2]
    p = bnb.nn.Int8Params(codes.clone(), requires_grad=False, has_fp16_weights=False)
    p.CB, p.SCB = p.data, scales.clone()
    module.weight = p
    module.state.CB = None
    module.state.SCB = None


def to_float_linear(module: nn.Module, weight: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with the dequantised weight (or ``weight``) and the layer's bias, in float32."""
    w = dequantize(module) if weight is None else weight.float()
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if module.bias is not None:
            lin.bias.copy_(module.bias.float())
    lin.requires_grad_(False)
    return lin


def _named_linears(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    out = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and not any(name == s or name.endswith("." + s) or name.split(".")[0] == s
                                             for s in skip):
            out.append((name, m))
    return out


def quantize_model(model: nn.Module, quant: str = "nf4", skip: Sequence[str] = ()) -> int:
    """Replace every ``nn.Linear`` of ``model`` (except the names / suffixes in ``skip``, e.g. the task head) by a
    bitsandbytes layer in place: ``"nf4"`` / ``"fp4"`` (``Linear4bit``, float32 compute) or ``"int8"``
    (``Linear8bitLt``). Returns the number of layers replaced."""
    bnb = require_bnb()
    if quant not in ("nf4", "fp4", "int8"):
        raise PeftkitError(f"unknown quantisation {quant!r}; use nf4, fp4 or int8")
    targets = _named_linears(model, skip)
    for name, lin in targets:
        dev = lin.weight.device
        if quant == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=lin.weight.dtype, compress_statistics=True, quant_type=quant)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type=quant)  # double quantisation (QLoRA), explicit
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(dev)
        keep_training_layout(q)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return len(targets)


def dequantize_model(model: nn.Module) -> int:
    """Replace every bitsandbytes layer of ``model`` by a float32 ``nn.Linear`` in place; returns how many."""
    found = [(n, m) for n, m in model.named_modules() if kind(m) is not None]
    for name, m in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, to_float_linear(m))
    return len(found)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights (and quantisation statistics) of the model's linear layers, quantised or not."""
    total = 0
    for m in model.modules():
        k = kind(m)
        if k == "bnb_4bit":
            w = m.weight
            total += w.data.numel() * w.data.element_size()
            qs = w.quant_state
            total += qs.absmax.numel() * qs.absmax.element_size()
            if getattr(qs, "state2", None) is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.code.numel() * 4
        elif k == "bnb_8bit":
            codes, scales = _int8_codes_scales(m)
            total += codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
        elif type(m) is nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, with bitsandbytes layers counted as codes + scales."""
    quantised = [m for m in model.modules() if kind(m) is not None]
    skip = {id(m.weight) for m in quantised}
    seen: set[int] = set()
    total = linear_weight_bytes(nn.ModuleList(quantised)) if quantised else 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in skip or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


register_quantized(sys.modules[__name__])  # the core treats bitsandbytes layers as quantised hosts
