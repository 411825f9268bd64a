"""PYRA — Xiong et al. 2024, "PYRA: Parallel Yielding Re-Activation for Training-Inference Efficient Task
Adaptation" (ECCV 2024, arXiv 2403.09192; official code THU-MIG/PYRA, ``model/adaptive_merge.py``), on ToMe token
merging (Bolya et al. 2023, "Token Merging: Your ViT But Faster", arXiv 2210.09461).

    block:    x ← x + Attn(LN₁(x)) (proportional attention: logits + log size);  merge r_l tokens;  x ← x + MLP(LN₂(x))
    match:    ToMe bipartite soft matching on the mean key over heads: tokens alternate into sets A / B, each A token
              links to its most cosine-similar B token, the r_l best links merge (the class token never does)
    PYRA:     S = the r_l source tokens, D_m their matched destinations, X̂ = LN(S + D_m);
              w_c = 2σ(W_aᵀ X̂) ∈ (0, 2)^{1×d} (channel weights, yielded across tokens),
              w_t = 2σ(X̂ W_bᵀ) − 1 ∈ (−1, 1)^{r_l×1} (token weights);  S' = S + (S ⊙ w_c) ⊙ w_t;
              all on the size-weighted tokens (official ``merge_wavg``: ``merge(x * size)``): S = x_S·size_S,
              D_m = x_D·size_D, then D ← (x_D·size_D + Σ S') / (size_D + Σ size_S)
    init:     W_a ∈ R^{r_l×1} kaiming_uniform(a=√5), W_b ∈ R^{1×d} = 0 (⇒ w_t = 0, S' = S: plain ToMe), LN(d) default
    merge:    none — the re-activation acts on tokens during merging; it is combined with a PEFT method on the
              block's Linear layers (e.g. ``peftkit.adapt(block, lora)``), and r_l = 0 means no PYRA parameters.

Parameters per layer: r_l + d (W_a, W_b) + 2d (LayerNorm). The functions work on any ViT block that exposes its
keys; :class:`ToMeBlock` is a complete pre-norm ViT block using them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.errors import PeftkitError


@dataclass
class Matching:
    """A bipartite matching of N tokens: source (A) tokens ``src_idx`` [B, r] merge into B-set tokens ``dst_idx``
    [B, r]; ``unm_idx`` [B, |A| − r] are the A tokens kept (in their original order). ``distill``: the second token
    (B index 0, DeiT's distillation token) never receives a merge and stays second after merging."""

    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    unm_idx: torch.Tensor
    distill: bool = False

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True,
                            distill_token: bool = False) -> Matching:
    """ToMe's matching on ``metric`` [B, N, c] (A = even positions, B = odd); at most half of the mergeable
    tokens merge. With ``class_token`` the first token is never a source; with ``distill_token`` the second token is
    never a destination."""
    if metric.dim() != 3:
        raise PeftkitError(f"bipartite_soft_matching: metric must be [B, N, c], got {tuple(metric.shape)}")
    n_a = (metric.shape[1] + 1) // 2
    r = max(0, min(r, (metric.shape[1] - int(class_token) - int(distill_token)) // 2))
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_idx = edge_idx[:, :r]
    unm_idx = edge_idx[:, r:].sort(dim=-1).values
    assert unm_idx.shape[1] == n_a - r
    return Matching(src_idx, node_idx.gather(1, src_idx), unm_idx, distill_token)


class PyraReactivation(nn.Module):
    """PYRA's parallel yielding re-activation of the ``r`` source tokens of one layer (see the module docstring)."""

    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        if d < 1 or r < 1:
            raise PeftkitError(f"PyraReactivation: d and r must be positive, got d={d}, r={r}")
        self.r = r
        self.w_a = nn.Parameter(torch.empty(r, 1))
        nn.init.kaiming_uniform_(self.w_a, a=math.sqrt(5))
        self.w_b = nn.Parameter(torch.zeros(1, d))
        self.norm = nn.LayerNorm(d)

    def weights(self, src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_c [B, 1, d] ∈ (0, 2), w_t [B, r, 1] ∈ (−1, 1)) for sources ``src`` and matched destinations ``dst``."""
        k = src.shape[1]
        if k > self.r:
            raise PeftkitError(f"PyraReactivation: {k} merged tokens but the layer was built for r={self.r}")
        x = self.norm(src + dst)
        w_c = 2 * torch.sigmoid(torch.einsum("bkd,k->bd", x, self.w_a[:k, 0])).unsqueeze(1)
        w_t = 2 * torch.sigmoid(x @ self.w_b.T) - 1
        return w_c, w_t

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        w_c, w_t = self.weights(src, dst)
        return src + src * w_c * w_t


def merge_wavg(
    match: Matching, x: torch.Tensor, size: torch.Tensor, pyra: PyraReactivation | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` [B, N, d] (token sizes ``size`` [B, N, 1]) by ``match``, as the official
    ``merge_wavg``: the merge runs on the size-weighted tokens x·size — PYRA re-activates the weighted sources from
    the weighted sources and destinations, S' = PYRA(S·s_S, D·s_D) — and the sums are divided by the summed sizes.
    Returns (x, size) with N − r tokens: the kept A tokens, then the B tokens."""
    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[:, ::2], t[:, 1::2]

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    sa, sb = split(size)
    wa, wb = split(x * size)
    src = take(wa, match.src_idx)
    if pyra is not None and match.r:
        src = pyra(src, take(wb, match.dst_idx))
    dst_idx = match.dst_idx.unsqueeze(-1)
    wb = wb.scatter_add(1, dst_idx.expand(-1, -1, x.shape[-1]), src)
    sb = sb.scatter_add(1, dst_idx, take(sa, match.src_idx))
    def join(unm: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if match.distill:  # class token, distillation token, then the rest (official ToMe's order)
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    x_out = join(take(x[:, ::2], match.unm_idx), wb / sb)  # a kept token: (x·s)/s = x
    return x_out, join(take(sa, match.unm_idx), sb)


class ToMeBlock(nn.Module):
    """Pre-norm ViT block with ToMe merging of ``r`` tokens after attention and, with ``pyra=True`` (and r > 0),
    PYRA re-activation. ``forward(x, size=None) -> (x, size)``; the first token is the class token."""

    def __init__(self, d: int, n_heads: int, r: int = 0, *, pyra: bool = True, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if d % n_heads or r < 0:
            raise PeftkitError(f"ToMeBlock: d ({d}) must be a multiple of n_heads ({n_heads}) and r ≥ 0, got r={r}")
        self.n_heads, self.r = n_heads, r
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        h = int(d * mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)
        self.pyra = PyraReactivation(d, r) if pyra and r > 0 else None

    def attention(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output, the mean key over heads [B, N, d/heads] — ToMe's merging metric)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.n_heads) + size.log().transpose(1, 2).unsqueeze(1)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out), k.mean(1)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        size = torch.ones_like(x[..., :1]) if size is None else size
        h, metric = self.attention(self.norm1(x), size)
        x = x + h
        if self.r > 0:
            x, size = merge_wavg(bipartite_soft_matching(metric, self.r), x, size, self.pyra)
        return x + self.fc2(self.act(self.fc1(self.norm2(x)))), size
