"""CREMA: per-modality LoRA on one shared frozen Q-Former-like backbone + self-gated fusion."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import PeftkitError
from peftkit.heads.crema import Crema, EspressoFusion
from tolerance import assert_near

D, DF, NQ, DOUT = 16, 12, 4, 10


class TinyQFormer(nn.Module):
    """Queries self-attend (q, k, v, o), cross-attend to the modality features, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.cross_q, self.cross_k, self.cross_v = nn.Linear(D, D), nn.Linear(DF, D), nn.Linear(DF, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, queries: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.q(queries) @ self.k(queries).transpose(1, 2) / D**0.5, -1)
        h = queries + self.o(a @ self.v(queries))
        c = torch.softmax(self.cross_q(h) @ self.cross_k(feats).transpose(1, 2) / D**0.5, -1)
        h = h + c @ self.cross_v(feats)
        return h + self.mlp(h)


def _crema(**kw) -> tuple[Crema, TinyQFormer]:
    torch.manual_seed(0)
    base = TinyQFormer().eval()
    ref = copy.deepcopy(base)
    proj0 = nn.Linear(D, DOUT)
    c = Crema(base, ["rgb", "depth", "audio"], d_model=D, n_query=NQ, d_out=DOUT, target_modules=["q", "v"], r=4,
              dropout=0.0, query_init=torch.randn(NQ, D), proj_init=proj0, **kw)
    return c, ref


def _inputs(b: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(b, n, DF, generator=g) for m, n in (("rgb", 7), ("depth", 5), ("audio", 3))}



def test_zero_b_reproduces_frozen_backbone() -> None:
    c, ref = _crema()
    x = _inputs()
    for m, f in x.items():
        q = c.queries[m].unsqueeze(0).expand(3, -1, -1)
        assert_near(c.modality_tokens(m, f), c.proj[m](ref(q, f)), 32, layers=3)


def test_switching_modality_changes_only_its_lora() -> None:
    c, ref = _crema()
    x = _inputs()
    before = {m: c.modality_tokens(m, f) for m, f in x.items()}
    b_params = [n for n, p in c.backbone.named_parameters() if ".depth." in n and p.requires_grad]
    assert b_params, "depth LoRA parameters exist and train"
    with torch.no_grad():
        for n, p in c.backbone.named_parameters():
            if ".depth." in n:
                p.normal_()
    after = {m: c.modality_tokens(m, f) for m, f in x.items()}
    assert torch.equal(after["rgb"], before["rgb"]) and torch.equal(after["audio"], before["audio"])
    assert not torch.allclose(after["depth"], before["depth"])
    # routed call == the backbone with only the depth adapter active
    solo = copy.deepcopy(c.backbone)
    peftkit.set_active(solo, "depth")
    q = c.queries["depth"].unsqueeze(0).expand(3, -1, -1)
    assert_near(after["depth"], c.proj["depth"](solo(q, x["depth"])), 32, layers=3)


def test_fusion_shape_and_missing_modalities() -> None:
    c, _ = _crema()
    x = _inputs()
    out = c(x)
    rgb = c.modality_tokens("rgb", x["rgb"])
    assert out.shape == rgb.shape == (3, NQ, DOUT)
    # drop depth: its block of the concatenation is zero
    z = c.fusion.proj(torch.cat([torch.zeros_like(rgb), c.modality_tokens("audio", x["audio"])], -1))
    assert_near(c({"rgb": x["rgb"], "audio": x["audio"]}), rgb + torch.sigmoid(z) * z, 32, layers=3)
    assert torch.equal(c({"rgb": x["rgb"]}), rgb)  # no secondary: the primary tokens unchanged
    assert c({"depth": x["depth"]}).shape == rgb.shape  # the primary itself may be missing


def test_trainable_parameters_and_gradients() -> None:
    c, ref = _crema()
    trainable = {n for n, p in c.named_parameters() if p.requires_grad}
    base_names = {f"backbone.{n}" for n, _ in ref.named_parameters()}
    assert not any(n.endswith(("base_layer.weight", "base_layer.bias")) for n in trainable)
    assert not (trainable & base_names)
    lora = [n for n in trainable if n.startswith("backbone.")]
    per_layer = 4 * (D + D)  # r·(d_in + d_out) on q and v
    assert sum(dict(c.named_parameters())[n].numel() for n in lora) == 3 * 2 * per_layer
    with torch.no_grad():  # B ≠ 0 so that every LoRA factor gets a gradient
        for p in c.backbone.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    c(_inputs()).pow(2).sum().backward()
    for n, p in c.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, n


def test_skip_bypasses_lora() -> None:
    c, ref = _crema(skip=["audio"])
    with torch.no_grad():
        for p in c.backbone.parameters():
            if p.requires_grad:
                p.normal_()
    f = _inputs()["audio"]
    q = c.queries["audio"].unsqueeze(0).expand(3, -1, -1)
    assert_near(c.modality_tokens("audio", f), c.proj["audio"](ref(q, f)), 32, layers=3)


def test_bad_input() -> None:
    c, _ = _crema()
    with pytest.raises(PeftkitError, match="video"):
        c({"video": torch.randn(1, 2, DF)})
    with pytest.raises(PeftkitError, match="already has adapter"):
        Crema(c.backbone, ["rgb"], d_model=D, n_query=NQ, d_out=DOUT, target_modules=["q"])
    base = TinyQFormer()
    with pytest.raises(PeftkitError):
        Crema(base, ["rgb"], d_model=D, n_query=NQ, d_out=DOUT, target_modules=["nope"])
    assert peftkit.adapter_names(base) == []
    with pytest.raises(PeftkitError, match="unknown"):
        EspressoFusion(DOUT, ["a"])(torch.zeros(1, 2, DOUT), {"b": torch.zeros(1, 2, DOUT)})
