"""The maths of LoRA's data- and quantisation-aware initialisations (used by :mod:`peftkit.methods.lora`).

LoftQ — Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models" (arXiv 2310.08659):
    Q₀ = NF4(W); for t = 1..T: L_t·R_t = SVD_r(W − Q_{t−1}) (L = U·√S, R = √S·Vᵀ), Q_t = NF4(W − L_t·R_t);
    Hugging Face PEFT's order: the last Q is NF4 of the last residual W − L_{T−1}·R_{T−1} (W itself when T = 1) and
    (L, R) fit W − Q. The base becomes Q (dequantised NF4, bitsandbytes' blocks of 64), A = R/√s, B = L/√s.
EVA — Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation"
    (arXiv 2410.07170): per layer the (centred, as PEFT's incremental PCA) inputs X over the calibration batches,
    Cov = X_cᵀX_c/(n−1) = V·Λ·Vᵀ; explained-variance ratios λᵢ/tr Λ; every layer offers its top round(ρ·r) ratios, the
    Σr largest of all layers win and a layer's rank is the number of its winners (rank 0: the layer loses its
    adapter); A = V_kᵀ (the top right-singular vectors of X_c), B = 0, α ← α·k/r (PEFT's adjust_scaling_factors).
CorDA — Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models" (arXiv
    2406.05223): C = mean over batches of X̂ᵀX̂, X̂ = X/max(X) (PEFT's normalisation), damped C + δ·mean(diag C)·I until
    it inverts well; U·S·Vᵀ = SVD(W·C), V̂ = C⁻¹·V; IPM (instruction-previewed) keeps the r largest, KPM
    (knowledge-preserved) the r smallest components: A = √(S/s)·V̂ᵀ, B = U·√(S/s) and W_res = W − s·B·A.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch

from peftkit.core.calibration import visit_inputs
from peftkit.core.errors import PeftkitError
from peftkit.quant.nf4 import nf4_round_trip

#: the host kinds these inits read a 2-D weight and its inputs from (as Hugging Face PEFT)
INIT_HOSTS = ("linear", "gpt2_conv1d")


def check_host(host: Any, init: str) -> None:
    if host.kind not in INIT_HOSTS or host.quantized:
        kind = f"a layer of kind {host.kind!r} ({type(host.module).__name__})"
        what = "a quantised layer" if host.quantized else kind
        extra = (" — apply init='loftq' to the full-precision model, then quantise its base (the base becomes "
                 "NF4-representable)") if host.quantized and init.startswith("loftq") else ""
        raise PeftkitError(f"module {host.name!r}: LoRA init={init!r} needs a float Linear or GPT-2 Conv1D layer, "
                           f"got {what}{extra}; target other layers or use another init")


def svd_split(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, L)`` with L·R the best rank-``r`` approximation of ``m``: L = U_r·√S_r, R = √S_r·Vᵀ_r."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def loftq(w: torch.Tensor, r: int, iters: int = 1, blocksize: int = 64
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, R, L)`` (float32): LoftQ's NF4 base and low-rank fit with W ≈ Q + L·R after ``iters`` alternations."""
    if iters < 1:
        raise PeftkitError(f"LoRA init loftq: the number of iterations must be >= 1, got {iters}")
    w = w.detach().float()
    res = w
    for i in range(iters):
        q = nf4_round_trip(res, blocksize)
        rr, ll = svd_split(w - q, r)
        if i + 1 < iters:
            res = w - ll @ rr
    return q, rr, ll


# -- calibration inputs ------------------------------------------------------------------------------------------
def token_rows(x: torch.Tensor, batch: Any) -> torch.Tensor:
    """A layer input as (tokens, d_in) float64 rows; padding (``attention_mask == 0`` of a dict batch whose mask has
    the input's leading shape) left out."""
    rows = x.reshape(-1, x.shape[-1]).double()
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(x.shape[:-1]):
        rows = rows[mask.reshape(-1).bool()]
    return rows


def collect(model: Any, adapter_cls: type, batches: Iterable[Any], name: str, kinds: dict[str, str], who: str
            ) -> dict[str, list[Any]]:
    """Per layer of ``kinds``: ``"eva"``: [n, Σx, Σxᵀx]; ``"corda"``: [calls, Σ X̂ᵀX̂] with X̂ = X/max(X) per call."""
    acc: dict[str, list[Any]] = {}

    def visit(path: str, host: Any, x: torch.Tensor, batch: Any) -> None:
        if path not in kinds:
            return
        rows = token_rows(x, batch)
        if not torch.isfinite(rows).all():
            raise PeftkitError(f"{who}: module {path!r} saw a NaN or infinite input in the calibration data")
        a = acc.setdefault(path, [0, 0.0, 0.0])
        if kinds[path] == "corda":
            top = rows.max().abs() if rows.numel() else rows.new_ones(())
            rows = rows / (top if top > 0 else 1.0)
            a[0], a[1] = a[0] + 1, a[1] + rows.t() @ rows
        else:
            a[0], a[1], a[2] = a[0] + rows.shape[0], a[1] + rows.sum(0), a[2] + rows.t() @ rows

    visit_inputs(model, adapter_cls, batches, visit, name, who=who)
    return acc


def data_init(init: str) -> str | None:
    """``"eva"`` / ``"corda"`` for the inits that need calibration data, else None."""
    return next((k for k in ("eva", "corda") if init.startswith(k)), None)


def calibrate_lora(model: Any, adapter_cls: type, batches: Iterable[Any], name: str | None = None
                   ) -> dict[str, tuple[float, float]]:
    """Initialise the EVA and CorDA layers of LoRA adapter ``name`` (default: the only adapter with such layers) from
    ``batches`` (run through the model, adapters disabled); other inits need no data: ``{}`` and the batches are not
    read. Returns per module (before, after): EVA ‖X_c‖_F and the part of the centred inputs outside the adapter's
    input subspace; CorDA ‖W·X̂‖_F and ‖W_res·X̂‖_F."""
    from peftkit.core.model import adapter_names, remove_from_layer
    from peftkit.core.procedure import find_adapters
    from peftkit.core.state import get_config

    found = find_adapters(model, adapter_cls)
    wanted = [n for n in adapter_names(model) if any(data_init(a.config.init) for _, a in found.get(n, []))]
    if name is None:
        if len(wanted) > 1:
            raise PeftkitError(f"lora.calibrate: adapters {wanted} need calibration data; say which one with name=")
        if not wanted:
            return {}
        name = wanted[0]
    layers = {p: a for p, a in found.get(name, []) if data_init(a.config.init)}
    if not layers:
        return {}
    kinds = {p: data_init(a.config.init) for p, a in layers.items()}
    acc = collect(model, adapter_cls, batches, name, kinds, who=f"lora.calibrate ({name!r})")
    out: dict[str, tuple[float, float]] = {}
    eva = {p: eva_spectrum(*acc[p]) for p in layers if kinds[p] == "eva"}
    if eva:
        init = next(layers[p].config.init for p in eva)
        rho = float(init.rsplit("_", 1)[1]) if "_rho_" in init else 2.0
        ratios = {p: vals / vals.sum().clamp_min(1e-300) for p, (vals, _) in eva.items()}
        ranks = eva_ranks(ratios, {p: layers[p].r for p in eva}, rho,
                          {p: min(layers[p].host.d_in, layers[p].host.d_out) for p in eva})
        config = get_config(model, name)
        for p, (vals, comps) in eva.items():
            k, n = ranks[p], acc[p][0]
            out[p] = (math.sqrt(float(vals.sum()) * (n - 1)), math.sqrt(float(vals[k:].sum()) * (n - 1)))
            if k == 0:
                remove_from_layer(model, p, name)
                ex = config.exclude_modules  # saved and reloaded without it, as PEFT drops the layer
                config.exclude_modules = f"(?:{ex})|{re.escape(p)}" if isinstance(ex, str) else [*(ex or []), p]
            else:
                layers[p].set_eva(comps[:k], config)
    for p, a in layers.items():
        if kinds[p] == "corda":
            w = a.host.weight_2d()
            cov = corda_cov(acc[p])
            fa, fb = corda_factors(w, cov, a.r, corda_mode(a.config.init), a.s)
            a.keep_init(fa, fb)
            out[p] = moments_error([acc[p][0], cov], w, a.s * (fb @ fa))
    return out


# -- EVA -------------------------------------------------------------------------------------------------------
def eva_spectrum(n: int, total: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues, components)`` of the centred input covariance, descending; components as rows."""
    if n < 2:
        raise PeftkitError(f"LoRA init eva: a layer saw {n} calibration token(s); it needs at least 2")
    mean = total / n
    cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
    vals, vecs = torch.linalg.eigh((cov + cov.t()) / 2)
    return vals.flip(0).clamp_min(0), vecs.flip(1).t()


def eva_ranks(ratios: dict[str, torch.Tensor], ranks: dict[str, int], rho: float,
              limits: dict[str, int] | None = None) -> dict[str, int]:
    """EVA's redistribution: each layer offers its top round(ρ·r) explained-variance ratios (at most ``limits``, the
    layer's min(d_in, d_out), which a LoRA rank may not exceed), the Σr largest win."""
    cap = limits or {}
    pool = [(float(v), i, p) for i, p in enumerate(ratios)
            for v in ratios[p][: min(round(ranks[p] * rho), cap.get(p, len(ratios[p])))]]
    pool.sort(key=lambda t: (-t[0], t[1]))
    counts = dict.fromkeys(ratios, 0)
    for _, _, p in pool[: sum(ranks.values())]:
        counts[p] += 1
    return counts


# -- CorDA -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def corda_factors(w: torch.Tensor, cov: torch.Tensor, r: int, mode: str, s: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA's ``(A, B)`` (float64) of ``w`` (d_out, d_in) for the input covariance ``cov`` (d_in, d_in)."""
    w, cov = w.detach().double(), cov.double()
    scale = cov.diagonal().mean()
    if not torch.isfinite(cov).all() or not scale > 0:
        raise PeftkitError("LoRA init corda: the calibration inputs of a layer are all zero or not finite")
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = 0.01
    for _ in range(64):  # PEFT's damping: double until (C + δ·mean(diag C)·I) inverts to within 0.05
        fixed = cov + eye * scale * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye) < 0.05:
            break
        damp *= 2
    u, sv, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).t()
    keep = slice(0, r) if mode == "ipm" else slice(sv.shape[0] - r, None)
    root = (sv[keep] / s).sqrt()
    return v[:, keep].t() * root[:, None], u[:, keep] * root[None, :]


def corda_mode(init: str) -> str:
    return "kpm" if init.endswith("kpm") else "ipm"


def corda_cov(acc: list[Any]) -> torch.Tensor:
    return acc[1] / acc[0]


def moments_error(acc: list[Any], w: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(‖W·X‖_F, ‖(W − approx)·X‖_F) over the calibration inputs from the accumulated Gram."""
    g = acc[2] if len(acc) > 2 else acc[1]
    w, d = w.double(), (w.double() - approx.double())
    return (math.sqrt(max(float((w @ g * w).sum()), 0.0)), math.sqrt(max(float((d @ g * d).sum()), 0.0)))
