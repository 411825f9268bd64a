"""Comparing a peftkit method with Hugging Face PEFT's implementation of it, through files, both directions.

:func:`check_both_directions` runs, on one base model and input (float32):

* PEFT → files → peftkit: a PEFT adapter with perturbed (non-trivial) tensors is saved by ``save_pretrained`` and
  loaded by :func:`peftkit.load`; the outputs agree, unmerged and merged (peftkit's ``merge`` and PEFT's
  ``merge_and_unload``);
* peftkit → files → PEFT: a peftkit adapter with perturbed tensors is exported with ``format="hf"`` and loaded by
  ``PeftModel.from_pretrained``; the outputs agree, unmerged and merged;
* and both files say the same thing about the adapter: same tensor names and shapes in the two directions.

Agreement is :func:`tolerance.assert_near` (two implementations of one formula) for a 64-term reduction: 7.6e-6 of
the output's size in float32, inside the 1e-5 bar.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from tolerance import assert_near


def randomize(model: nn.Module, seed: int, std: float = 0.2) -> None:
    """Add N(0, std²) to every trainable tensor (so that zero-initialised factors do not hide a wrong formula)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=g) * std)


def peft_model(base: nn.Module, peft_config: Any) -> nn.Module:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft_config)


def load_with_peft(base: nn.Module, d: Path) -> nn.Module:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()


def _near(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within rounding of a 64-term reduction: 8·eps·√64 ≈ 7.6e-6 of max |expected| in float32 (the 1e-5 bar)."""
    assert_near(actual, expected, 64)


def check_both_directions(
    base: nn.Module, x: torch.Tensor, peft_config: Any, method: str, fields: dict[str, Any], tmp_path: Path,
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None, std: float = 0.2,
) -> None:
    run = run or (lambda m, inp: m(inp))

    def out(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return run(m.eval(), x)

    y_base = out(base)

    # PEFT -> files -> peftkit
    pm = peft_model(base, peft_config)
    randomize(pm, seed=1, std=std)
    ref = out(pm)
    assert (ref - y_base).abs().max() > 1e-3 * y_base.abs().max(), "the PEFT adapter does not change the output"
    pm.save_pretrained(str(tmp_path / "from_peft"))
    model = copy.deepcopy(base)
    assert peftkit.load(model, tmp_path / "from_peft") == "default"
    assert peftkit.get_config(model, "default").method == method
    _near(out(model), ref)
    peftkit.merge(model)
    _near(out(model), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = pm.merge_and_unload()
    _near(out(merged_peft), ref)

    # peftkit -> files -> PEFT
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config(method, **fields))
    randomize(model, seed=2, std=std)
    ref = out(model)
    assert (ref - y_base).abs().max() > 1e-3 * y_base.abs().max(), "the peftkit adapter does not change the output"
    peftkit.save(model, tmp_path / "to_peft", format="hf")
    back = load_with_peft(base, tmp_path / "to_peft")
    _near(out(back), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _near(out(back.merge_and_unload()), ref)
    peftkit.merge(model)
    _near(out(model), ref)

    # the two files hold the same tensors (names and shapes)
    a = load_file(str(tmp_path / "from_peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "to_peft" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}


class ConvLinearNet(nn.Module):
    """Conv1d (k = 3), Conv2d (3×3 and 1×1) and Linear hosts of unequal widths: (B, 4, 6) -> (B, 4). Wide enough
    (32 and 64 output channels) that LoKr decomposes its conv factors at r = 2 and 3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(4, 32, 3, padding=1)
        self.c2 = nn.Conv2d(2, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 12, 1)
        self.lin = nn.Linear(12, 20)
        self.out = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))  # (B, 32, 6)
        h = torch.tanh(self.c2(h.view(h.shape[0], 2, 16, 6)))  # (B, 64, 16, 6)
        h = self.c3(h).mean((2, 3))
        return self.out(torch.tanh(self.lin(h)))


CONV_TARGETS = ["c1", "c2", "c3", "lin", "out"]


def conv_input(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 6, generator=torch.Generator().manual_seed(seed))


def same_init(peft_config: Any, method: str, fields: dict[str, Any], params: tuple[str, ...]) -> None:
    """Under one torch seed PEFT and peftkit draw the same initial tensors (same shapes, same order of draws)."""
    base = ConvLinearNet().eval()
    torch.manual_seed(7)
    pm = peft_model(base, peft_config)
    model = copy.deepcopy(base)
    torch.manual_seed(7)
    peftkit.adapt(model, peftkit.config(method, **fields))
    seen = 0
    for path, layer in peftkit.adapted_layers(model):
        hf = pm.base_model.model.get_submodule(path)
        ours = layer.adapters["default"]
        for name in params:
            if "default" in getattr(hf, name):
                assert_near(getattr(ours, name).detach(), getattr(hf, name)["default"].detach(), 1)
                seen += 1
            else:
                assert name not in dict(ours.named_parameters()), (path, name)
    assert seen >= len(CONV_TARGETS) * 2


def same_training_draws(peft_config: Any, method: str, fields: dict[str, Any]) -> None:
    """Training mode, one torch seed per step: PEFT and peftkit (same non-zero tensors) draw the same module-skip and
    row masks in the same order, so their outputs agree; the masks vary between seeds; evaluation has none."""
    base = ConvLinearNet().eval()
    pm = peft_model(base, peft_config)
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config(method, **fields))
    for path, layer in peftkit.adapted_layers(model):
        hf = pm.base_model.model.get_submodule(path)
        with torch.no_grad():
            for name, p in layer.adapters["default"].named_parameters():
                getattr(hf, name)["default"].normal_()
                p.copy_(getattr(hf, name)["default"])
    pm.train()
    model.train()
    x = conv_input(5)
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        ref = pm(x)
        torch.manual_seed(seed)
        y = model(x)
        assert_near(y.detach(), ref.detach(), 64)
        outs.append(y.detach())
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the masks really vary
    model.eval()
    pm.eval()
    with torch.no_grad():
        assert_near(model(x), pm(x), 64)  # no dropout at evaluation
