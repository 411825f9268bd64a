"""A uniform view of the layer an adapter attaches to.

Every host is seen as a map with a 2-D weight ``W ∈ R^{d_out×d_in}`` (d_in flattened over kernel positions for
convolutions; for ``nn.Embedding`` d_in = vocabulary size, d_out = embedding dim, i.e. ``W = weightᵀ``;
for transformers' GPT-2 ``Conv1D`` ``W = weightᵀ``). Methods write their math against this view and call
``project_in`` / ``project_out`` for the activation path, so one method file serves every host type.

A grouped convolution (kind ``"grouped_conv"``, groups G > 1) is seen through its dense equivalent: W is the
block-diagonal (d_out, C_in·k) matrix (d_in counts every input channel), ``project_in`` convolves over all input
channels, a low-rank up-projection on it is grouped too — (d_out, r/G), output channel o reading the r/G rank
channels of its group (:meth:`Host.dense_up`) — and a weight that leaves the blocks cannot be written back
(:meth:`Host.check_writable`: such a merge is refused).

Normalisation layers (kind ``"norm"``: LayerNorm / RMSNorm with a learned scale) are hosts of their own kind: their
"weight" is the scale γ in its native shape (d_in = d_out = γ.numel()) and the bias β is the shift, if any. Only
methods that list ``"norm"`` in their registered hosts adapt them; the matrix helpers below do not apply to them.

Substituted hosts (:data:`SUBSTITUTED_KINDS`) are weights a module reads directly instead of running a layer on them,
so no ``base(x) + delta`` exists: the adapted layer runs the module itself with ``W + ΔW`` in place of ``W``
(:meth:`Host.run`, ``torch.func.functional_call``: gradients reach the update, the stored weight is untouched).
``"mha"``: an ``nn.MultiheadAttention`` (q, k, v of one size); W is its packed input projection stacked over its
output projection, ``[in_proj_weight; out_proj.weight]`` ∈ R^{4E×E}, which its forward reads as parameters.
``"parameter"``: one bare ``nn.Parameter`` of any module (``Host(module, name, param="weight")``). 2-D: W = the
parameter as stored (d_out, d_in = its two dimensions), e.g. a weight a hand-written layer multiplies by itself.
3-D (E, s1, s2), a stack of E experts as Hugging Face PEFT reads it: expert e maps s2 → s1 (or s1 → s2 when the
module says ``is_transposed``), W = the experts' (out, in) matrices stacked, (E·out, in); a low-rank update on it
has one factor pair per expert, stored as PEFT stacks them: A (E·r, in), B (out, E·r) (:meth:`Host.lowrank_weight`).
Neither has an activation path or a bias of its own; only methods that list them in their hosts adapt them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import precision
from .errors import PeftkitError

try:  # transformers' GPT-2 style Conv1D (weight stored as (d_in, d_out))
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover - transformers is a dependency, but the core does not need it
    _HFConv1D = None


QUANTIZED_KINDS = ("bnb_4bit", "bnb_8bit")

#: handlers of frozen quantised layers, registered by the package that knows them (:mod:`peftkit.quant.bnb` registers
#: bitsandbytes' Linear4bit / Linear8bitLt); the core names none. A handler has ``kind(module)`` (one of
#: :data:`QUANTIZED_KINDS` or None), ``dequantize``, ``requantize_``, ``snapshot``, ``restore``,
#: ``keep_training_layout`` and ``to_float_linear``.
_QUANTIZED_HANDLERS: list[Any] = []


def register_quantized(handler: Any) -> None:
    """Let the core treat the layers ``handler.kind`` recognises as quantised hosts."""
    if handler not in _QUANTIZED_HANDLERS:
        _QUANTIZED_HANDLERS.append(handler)


def _quantized(module: nn.Module) -> tuple[str, Any] | None:
    for handler in _QUANTIZED_HANDLERS:
        kind = handler.kind(module)
        if kind is not None:
            return kind, handler
    return None
NORM_KINDS = ("norm",)
CONV_KINDS = ("conv1d", "conv2d", "conv3d", "grouped_conv")
#: hosts whose weight the module reads directly: adapted by running the module with the weight substituted
SUBSTITUTED_KINDS = ("mha", "parameter")
#: the layer types that can host an adapter, in words (for error messages)
HOST_NAMES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "grouped Conv1d/2d/3d", "Embedding", "transformers' Conv1D",
              "bitsandbytes Linear4bit / Linear8bitLt", "nn.MultiheadAttention",
              "a bare 2-D / 3-D nn.Parameter (target_parameters)", "LayerNorm / RMSNorm with a learned scale")


def _is_norm(module: nn.Module) -> bool:
    """torch's LayerNorm / RMSNorm and any class named ``*LayerNorm`` / ``*RMSNorm`` (transformers' LlamaRMSNorm,
    T5LayerNorm, ...) that holds a learned scale ``weight`` (norms without an affine scale are no hosts)."""
    if not isinstance(module, nn.LayerNorm | nn.RMSNorm) and not type(module).__name__.endswith(
            ("LayerNorm", "RMSNorm")):
        return False
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def host_kind(module: nn.Module) -> str | None:
    """The host kind of ``module`` or None if it is not a supported host."""
    q = _quantized(module)  # before Linear: bitsandbytes layers subclass nn.Linear
    if q is not None:
        return q[0]
    if isinstance(module, nn.Linear):
        return "linear"
    if _HFConv1D is not None and isinstance(module, _HFConv1D):
        return "gpt2_conv1d"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups > 1:
        return "grouped_conv"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if _is_norm(module):
        return "norm"
    return None


class Host:
    """Shapes and elementary operations of one host layer (holds no parameters of its own)."""

    def __init__(self, module: nn.Module, name: str = "", param: str | None = None) -> None:
        kind = "parameter" if param is not None else host_kind(module)
        if kind is None:
            raise PeftkitError(
                f"module {name!r} is a {type(module).__name__}; supported host layers are "
                f"{', '.join(HOST_NAMES[:-1])} and {HOST_NAMES[-1]}"
            )
        self.module = module
        self.name = name
        self.kind = kind
        self.param = param
        self.experts, self.transposed = 1, False
        self.groups = module.groups if kind == "grouped_conv" else 1
        self.quantized = kind in QUANTIZED_KINDS
        self.substituted = kind in SUBSTITUTED_KINDS
        self._quant = _quantized(module)[1] if self.quantized else None  # type: ignore[index]
        if kind in SUBSTITUTED_KINDS:
            self._check_substituted()
        w = self.weight
        if self.quantized:
            self.d_out, self.d_in = module.out_features, module.in_features
        elif kind == "mha":
            self.d_in, self.d_out = module.embed_dim, 4 * module.embed_dim
        elif kind == "parameter" and w.dim() == 3:
            self.experts, self.transposed = w.shape[0], bool(getattr(module, "is_transposed", False))
            out, self.d_in = (w.shape[2], w.shape[1]) if self.transposed else (w.shape[1], w.shape[2])
            self.d_out = self.experts * out
        elif kind in ("linear", "parameter"):
            self.d_out, self.d_in = w.shape
        elif kind in ("gpt2_conv1d", "embedding"):
            self.d_in, self.d_out = w.shape
        elif kind == "norm":
            self.d_in = self.d_out = w.numel()
        else:
            self.d_out = w.shape[0]
            self.d_in = w[0].numel() * self.groups
        self.is_conv = kind in CONV_KINDS

    def _check_substituted(self) -> None:
        m, where = self.module, f"module {self.name!r}"
        if self.kind == "mha":
            if not m._qkv_same_embed_dim or not isinstance(m.out_proj, nn.Linear):
                raise PeftkitError(f"{where} is an nn.MultiheadAttention with separate q/k/v projections (kdim / "
                                   "vdim differ from embed_dim); only the packed in_proj_weight can be adapted")
            return
        p = getattr(m, self.param, None) if isinstance(self.param, str) else None
        if not isinstance(p, nn.Parameter):
            raise PeftkitError(f"{where} ({type(m).__name__}) has no parameter {self.param!r}")
        if p.dim() not in (2, 3):
            raise PeftkitError(f"parameter {self.name}.{self.param} has {p.dim()} dimensions {tuple(p.shape)}; "
                               "target_parameters adapts 2-D parameters and 3-D expert stacks only")

    # -- weights --------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The module's weight parameter as stored (packed integer codes for a quantised host; an
        nn.MultiheadAttention's in_proj_weight; a parameter host's parameter)."""
        if self.kind == "mha":
            return self.module.in_proj_weight
        if self.kind == "parameter":
            return getattr(self.module, self.param)  # type: ignore[arg-type]
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.substituted else getattr(self.module, "bias", None)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype an adapter's parameters take on this host: the weight's, or float32 when the stored weight is not
        floating point (packed integer codes of a quantised host)."""
        w = self.weight
        return w.dtype if w.is_floating_point() else torch.float32

    def weight_2d(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The host weight (or ``w`` in the host's native layout) as a (d_out, d_in) view; a quantised host's
        weight is dequantised (a new float32 tensor); a norm's scale γ stays in its native shape."""
        if self.quantized:
            return self._quant.dequantize(self.module) if w is None else w
        if self.kind == "mha" and w is None:
            return torch.cat([self.module.in_proj_weight, self.module.out_proj.weight])
        w = self.weight if w is None else w
        if self.experts > 1:  # (E, out, in) stacked, or (E, in, out) transposed per expert
            return (w.transpose(1, 2) if self.transposed else w).reshape(self.d_out, self.d_in)
        if self.kind in ("gpt2_conv1d", "embedding"):
            return w.t()
        if self.groups > 1:
            return torch.block_diag(*w.reshape(self.groups, self.d_out // self.groups, -1))
        if self.is_conv:
            return w.reshape(self.d_out, self.d_in)
        return w

    @property
    def filter_shape(self) -> tuple[int, ...]:
        """A convolution's dense filter shape (C_in, *kernel): the native shape of one row of the 2-D view."""
        return (self.module.in_channels, *self.module.kernel_size)

    def lowrank_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The (d_out, d_in) matrix B·A of factors as stored: grouped / per-expert where the host has groups or
        experts (expert e: B[:, e::E]·A[e·r:(e+1)·r], PEFT's stacking), else ``b @ a``."""
        if self.experts > 1:
            e = self.experts
            r = a.shape[0] // e
            return torch.einsum("ore,eri->eoi", b.reshape(b.shape[0], r, e), a.reshape(e, r, -1)).reshape(
                self.d_out, self.d_in)
        return self.dense_up(b) @ a

    def dense_up(self, b: torch.Tensor) -> torch.Tensor:
        """A (d_out, r) up-projection matrix from an up-projection as stored: grouped (d_out, r/G) on a grouped
        convolution (block-diagonal: output channel o reads the r/G rank channels of its group), else ``b``."""
        if self.groups == 1:
            return b
        return torch.block_diag(*b.reshape(self.groups, self.d_out // self.groups, -1))

    def check_writable(self, w2d: torch.Tensor) -> None:
        """Raise unless :meth:`write_weight_2d` can hold ``w2d`` exactly (a grouped convolution: only within its
        diagonal blocks)."""
        if self.groups > 1 and not torch.equal(self.weight_2d(self.to_native(w2d, check=False)), w2d):
            raise PeftkitError(
                f"module {self.name!r} is a grouped convolution (groups={self.groups}): the merged update reaches "
                f"across its groups, which its weight cannot hold; keep the adapter unmerged (Hugging Face PEFT "
                f"cannot merge it either)")

    def to_native(self, w2d: torch.Tensor, check: bool = True) -> torch.Tensor:
        """A (d_out, d_in) matrix in the host's native weight layout (a grouped convolution's diagonal blocks:
        ``check`` raises when anything lies outside them)."""
        if self.quantized:
            return w2d
        if self.experts > 1:
            w = w2d.reshape(self.experts, self.d_out // self.experts, self.d_in)
            return w.transpose(1, 2) if self.transposed else w
        if self.kind in ("gpt2_conv1d", "embedding"):
            return w2d.t()
        if self.groups > 1:
            if check:
                self.check_writable(w2d)
            g, o = self.groups, self.d_out // self.groups
            i = torch.arange(g, device=w2d.device)
            return w2d.reshape(g, o, g, -1)[i, :, i].reshape(self.module.weight.shape)
        if self.is_conv:
            return w2d.reshape(self.module.weight.shape)
        return w2d

    @property
    def half(self) -> bool:
        """A bfloat16 / float16 (not quantised) weight: merges compute in float32 and round once, and the weight
        before the first merge is kept for an exact unmerge (:meth:`snapshot`), as for a quantised host."""
        return not self.quantized and self.weight.dtype in precision.HALF

    def write_weight_2d(self, w2d: torch.Tensor) -> float | None:
        """Write a (d_out, d_in) weight into the host. A quantised host quantises it again and returns the largest
        absolute rounding error; a half-precision host rounds it to its dtype (once) and returns the largest
        absolute rounding error too; a float32/64 host copies it (cast to its dtype) and returns None."""
        if self.quantized:
            return self._quant.requantize_(self.module, w2d)
        if self.kind == "mha":
            e, m = self.d_in, self.module
            m.in_proj_weight.data.copy_(w2d[:3 * e].to(m.in_proj_weight.dtype))
            m.out_proj.weight.data.copy_(w2d[3 * e:].to(m.out_proj.weight.dtype))
            return precision.rounding_error(w2d, self.weight.dtype) if self.half else None
        native = self.to_native(w2d)
        self.weight.data.copy_(native.to(self.weight.dtype))
        return precision.rounding_error(native, self.weight.dtype) if self.half else None

    def snapshot(self, force: bool = False) -> tuple[Any, ...] | None:
        """A quantised or half-precision host's exact weight state (for an exact unmerge); None for float32/64
        hosts (their unmerge subtracts) unless ``force``."""
        if not (self.quantized or self.half or force):
            return None
        if self.substituted:
            return self.weight_2d().detach().clone(), None
        bias = self.bias
        state = self._quant.snapshot(self.module) if self.quantized else self.module.weight.detach().clone()
        return state, None if bias is None else bias.detach().clone()

    def restore(self, snap: tuple[Any, ...]) -> None:
        if self.substituted:
            self.write_weight_2d(snap[0])
            return
        self.module.weight.requires_grad_(False)
        if self.quantized:
            self._quant.restore(self.module, snap[0])
        else:
            self.module.weight.data.copy_(snap[0])
        if snap[1] is None:
            self.module.bias = None
        else:
            self.module.bias.data.copy_(snap[1])

    def prepare(self) -> None:
        """Called when a model is adapted, for every quantised layer in it (adapted or not)."""
        if self.quantized:
            self._quant.keep_training_layout(self.module)

    def float_module(self) -> nn.Module:
        """A quantised host as an equivalent float32 ``nn.Linear`` (dequantised weight); other hosts unchanged."""
        return self._quant.to_float_linear(self.module) if self.quantized else self.module

    def out_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast against the host output."""
        if self.is_conv:
            return v.view(-1, *(1,) * (self.module.weight.dim() - 2))
        return v

    def sample_view(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A per-sample, per-output-channel (B, d_out) tensor shaped to broadcast against the host output ``out``
        (channels at dim 1 for convolutions, last otherwise)."""
        mid = (1,) * (out.dim() - 2)
        if self.is_conv:
            return v.view(v.shape[0], v.shape[1], *mid)
        return v.view(v.shape[0], *mid, v.shape[1])

    # -- substituted hosts -----------------------------------------------------------------------------
    def run(self, w2d: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A substituted host's module run on ``args`` / ``kwargs`` with its (d_out, d_in) weight replaced by
        ``w2d`` (differentiable in ``w2d``; the stored weight is not touched)."""
        if self.kind == "mha":
            e = self.d_in
            new = {"in_proj_weight": w2d[:3 * e], "out_proj.weight": w2d[3 * e:]}
        else:
            new = {self.param: self.to_native(w2d)}
        return torch.func.functional_call(self.module, new, args, kwargs)

    # -- activation path -----------------------------------------------------------------------------
    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``x`` through a (k, d_in) matrix as if it were the host weight: h = x·aᵀ (conv / lookup for those hosts)."""
        m = self.module
        if self.kind == "embedding":
            return F.embedding(x, a.t(), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        if self.is_conv:
            return self._conv(x, a.reshape(a.shape[0], *self.filter_shape), None)
        return x.matmul(a.t()) if x.dim() != 2 else torch.mm(x, a.t())

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The host's convolution (stride, padding, dilation) with a dense weight ``w`` (groups = 1)."""
        m = self.module
        if self.groups == 1:
            return m._conv_forward(x, w, bias)
        conv = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            return conv(x, w, bias, m.stride, 0, m.dilation)
        return conv(x, w, bias, m.stride, m.padding, m.dilation)

    def project_out(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A (d_out, k) matrix applied channel-wise to ``h`` from :meth:`project_in` (1×1 conv for conv hosts)."""
        if self.is_conv and b.shape[1] != h.shape[1]:  # a grouped up-projection (d_out, k/G): per group
            g = self.groups
            hg = h.reshape(h.shape[0], g, h.shape[1] // g, *h.shape[2:])
            out = torch.einsum("bgk...,gok->bgo...", hg, b.reshape(g, self.d_out // g, b.shape[1]))
            return out.reshape(h.shape[0], self.d_out, *h.shape[2:])
        if self.is_conv:  # channels at dim 1, any number of spatial dims after them
            return torch.einsum("bk...,ok->bo...", h, b)
        return h.matmul(b.t())

    def apply_weight(self, x: torch.Tensor, w2d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The host's forward with a different (d_out, d_in) weight."""
        m = self.module
        if self.kind == "embedding":
            return F.embedding(x, w2d.t(), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        if self.is_conv:
            return self._conv(x, w2d.reshape(self.d_out, *self.filter_shape), bias)
        return F.linear(x, w2d, bias)

    def without_bias(self, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out`` minus the host bias (x·Wᵀ alone)."""
        b = self.bias
        return base_out if b is None else base_out - self.out_view(b)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.kind}, d_in={self.d_in}, d_out={self.d_out})"
