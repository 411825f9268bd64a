"""PYRA + ToMe patched into a transformers ViT-family model (issue 21 item 3): the patched model against ToMeBlock
(an independent implementation of the same layer) with the weights copied, the schedule, PYRA's parameters training
with LoRA, DeiT's distillation token, unpatching, and the errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

import peftkit
from peftkit import PeftkitError
from peftkit.heads.pyra import ToMeBlock, bipartite_soft_matching
from peftkit.heads.pyra_vit import parse_schedule, patch_vit, unpatch_vit
from tolerance import assert_near

D, HEADS = 16, 4


def _vit(layers: int = 3, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=D, num_hidden_layers=layers,
                    num_attention_heads=HEADS, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).eval()  # 16 patches + the class token = 17 tokens


def _pixels(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _randomise_pyra(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.vit.layers:
            if layer.pyra is not None:
                layer.pyra.w_b.copy_(torch.randn(layer.pyra.w_b.shape, generator=g) * 0.5)
                layer.pyra.norm.bias.copy_(torch.randn(D, generator=g) * 0.1)


def _reference(model: ViTForImageClassification, pixels: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    """The same network rebuilt from ToMeBlocks (their own attention, matching and merge) with the weights copied."""
    x = model.vit.embeddings(pixels)
    size = None
    for layer, r in zip(model.vit.layers, schedule):
        blk = ToMeBlock(D, HEADS, r, pyra=layer.pyra is not None, mlp_ratio=2.0)
        att = layer.attention
        with torch.no_grad():
            blk.qkv.weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
            blk.qkv.bias.copy_(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
            blk.proj.load_state_dict(att.o_proj.state_dict())
            blk.fc1.load_state_dict(layer.mlp.fc1.state_dict())
            blk.fc2.load_state_dict(layer.mlp.fc2.state_dict())
            blk.norm1.load_state_dict(layer.layernorm_before.state_dict())
            blk.norm2.load_state_dict(layer.layernorm_after.state_dict())
            blk.norm1.eps = blk.norm2.eps = layer.layernorm_before.eps
            if blk.pyra is not None:
                blk.pyra.load_state_dict(layer.pyra.state_dict())
        x, size = blk(x, size)
    return model.classifier(model.vit.layernorm(x)[:, 0])


@pytest.mark.parametrize("pyra", [True, False])
def test_patched_vit_matches_tome_blocks(pyra: bool) -> None:
    model = _vit()
    schedule = patch_vit(model, [4, 3, 2], pyra=pyra)
    assert schedule == [4, 3, 2]
    if pyra:
        _randomise_pyra(model)
    px = _pixels()
    with torch.no_grad():
        out = model(px, output_hidden_states=True)
        ref = _reference(model, px, schedule)
    assert [h.shape[1] for h in out.hidden_states] == [17, 13, 10, 8]  # 17 tokens, then −4, −3, −2
    assert_near(out.logits, ref, 64, layers=8)


def test_zero_wb_is_plain_tome_and_pyra_trains_with_lora() -> None:
    plain, model = _vit(), _vit()
    patch_vit(plain, 3, pyra=False)
    patch_vit(model, 3)
    px = _pixels()
    assert_near(model(px).logits, plain(px).logits, 64, layers=8)  # W_b = 0: w_t = 0, S' = S
    n_pyra = sum(p.numel() for n, p in model.named_parameters() if ".pyra." in n)
    assert n_pyra == 3 * (3 + D + 2 * D)  # per layer r_l + d + LayerNorm(d)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["q_proj", "v_proj"], r=2))
    for n, p in model.named_parameters():
        if ".pyra." in n:
            p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(px).logits, torch.tensor([0, 2]))
    loss.backward()
    # the last layer's merge happens after its attention: the class token, all the head reads, no longer sees it
    assert all(layer.pyra.w_b.grad.abs().sum() > 0 for layer in model.vit.layers[:-1])
    assert model.vit.layers[-1].pyra.w_b.grad.abs().sum() == 0
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # A: 0 behind B = 0
    opt.step()
    assert not torch.allclose(model.eval()(px).logits, plain(px).logits, atol=1e-5)


def test_schedule_forms_and_unpatch() -> None:
    assert parse_schedule(3, 2) == [2, 2, 2]
    assert parse_schedule(3, [2]) == [2, 0, 0]
    assert parse_schedule(3, (4, -1.0)) == [8, 4, 0]  # ToMe's decreasing schedule
    model = _vit()
    px = _pixels()
    before = model(px).logits
    keys = set(model.state_dict())
    patch_vit(model, 2)
    assert set(model.state_dict()) > keys
    unpatch_vit(model)
    assert set(model.state_dict()) == keys and type(model.vit.layers[0]).__name__ == "ViTLayer"
    assert torch.equal(model(px).logits, before)


def test_deit_keeps_its_distillation_token() -> None:
    torch.manual_seed(0)
    cfg = DeiTConfig(image_size=16, patch_size=4, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                     intermediate_size=32, num_labels=3)
    model = DeiTForImageClassification(cfg).eval()  # 16 patches + class + distillation tokens
    patch_vit(model, [5, 4])
    out = model(_pixels(), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [18, 13, 9] and out.logits.shape == (2, 3)
    m = bipartite_soft_matching(torch.randn(2, 18, 8), 8, class_token=True, distill_token=True)
    assert not (m.dst_idx == 0).any() and not (m.src_idx == 0).any() and m.r == 8


def test_bad_input() -> None:
    model = _vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftkitError, match="layer 0 would merge 9 tokens but only 17 reach it"):
        patch_vit(model, 9)
    with pytest.raises(PeftkitError, match="layer 2 would merge"):
        patch_vit(model, [8, 4, 3])  # 17 → 9 → 5: two can merge in layer 2
    with pytest.raises(PeftkitError, match="one per layer"):
        patch_vit(model, [1, 1, 1, 1])
    with pytest.raises(PeftkitError, match="whole number"):
        patch_vit(model, -1)
    assert type(model.vit.layers[0]).__name__ == "ViTLayer" and set(model.state_dict()) == set(state)
    patch_vit(model, 2)
    with pytest.raises(PeftkitError, match="already patched"):
        patch_vit(model, 2)
    with pytest.raises(PeftkitError, match="ViT-layout"):
        patch_vit(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1)
    big = torch.randn(1, 3, 32, 32)  # a larger image (interpolated positions) still merges; a mask cannot
    with pytest.raises(PeftkitError, match="attention mask"):
        model.vit.layers[0](torch.randn(1, 17, D), torch.zeros(1, 1, 1, 17))
    assert model(big, interpolate_pos_encoding=True).logits.shape == (1, 3)
