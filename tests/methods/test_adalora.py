"""AdaLoRA: the forward and ΔW of the SVD form, Hugging Face PEFT's numbers (outputs both ways through files, and its
RankAllocator's budget and masks over a training run), the pruned layers cut to their kept triplets when training
ends, and the orthogonality penalty."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.adalora import AdaLoraAllocator
from tolerance import assert_near

peft = pytest.importorskip("peft")

TARGETS = ["fc1", "fc2", "fc3"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _base() -> _Net:
    torch.manual_seed(0)
    return _Net()


def _peft_cfg(**kw):
    return peft.AdaLoraConfig(target_modules=TARGETS, init_r=6, target_r=3, lora_alpha=4, total_step=30, tinit=4,
                              tfinal=6, deltaT=2, **kw)


def _ours_cfg(**kw):
    return peftkit.config("adalora", target_modules=TARGETS, init_r=6, target_r=3, alpha=4, total_step=30, tinit=4,
                          tfinal=6, deltaT=2, **kw)


def _copy_from_peft(ours: nn.Module, theirs) -> None:
    with torch.no_grad():
        for path, layer in peftkit.adapted_layers(ours):
            a = layer.adapters["default"]
            mod = theirs.base_model.model.get_submodule(path)
            for t in ("lora_A", "lora_B", "lora_E"):
                getattr(a, t).copy_(getattr(mod, t)["default"])


def test_forward_and_delta_weight_follow_the_svd_form() -> None:
    model = _base()
    peftkit.adapt(model, _ours_cfg())
    layer = dict(peftkit.adapted_layers(model))["fc2"]
    a = layer.adapters["default"]
    with torch.no_grad():
        a.lora_E.normal_()
    dw = 4 / (6 + 1e-5) * a.lora_B @ torch.diag(a.lora_E.view(-1)) @ a.lora_A
    assert_near(a.delta_weight(), dw, 6)
    x = torch.randn(3, 24)
    assert_near(layer(x), layer.base_layer(x) + x @ dw.t(), 24)


def test_outputs_match_peft_both_ways(tmp_path) -> None:
    theirs = peft.get_peft_model(_base(), _peft_cfg())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    ours = _base()
    peftkit.load(ours, tmp_path / "peft")
    x = torch.randn(4, 16)
    theirs.eval()
    with torch.no_grad():
        assert_near(ours(x), theirs(x), dtype=torch.float32)
    peftkit.save(ours, tmp_path / "ours", format="hf")
    back = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_near(back(x), ours(x), dtype=torch.float32)
        peftkit.merge(ours)
        assert_near(ours(x), back(x), dtype=torch.float32)


def _train(model, step_hook, params, steps=30, orth=None):
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 16, generator=g) for _ in range(steps)]
    ys = [torch.randint(0, 5, (8,), generator=g) for _ in range(steps)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(xs[step]), ys[step])
        if orth is not None:
            loss = loss + (orth(model) or 0)
        loss.backward()
        opt.step()
        step_hook(step, opt)
        opt.zero_grad()


def test_rank_allocation_matches_peft_over_a_run() -> None:
    theirs = peft.get_peft_model(_base(), _peft_cfg(orth_reg_weight=0.0))
    ours = _base()
    peftkit.adapt(ours, _ours_cfg(orth_reg_weight=0.0))
    _copy_from_peft(ours, theirs)
    _train(theirs, lambda step, opt: theirs.base_model.update_and_allocate(step),
           [p for p in theirs.parameters() if p.requires_grad])
    proc = AdaLoraAllocator(ours, peftkit.get_config(ours, "default"))
    params = [p for p in ours.parameters() if p.requires_grad]
    proc.on_train_start(ours, None)
    _train(ours, lambda step, opt: proc.on_step_end(ours, step, opt), params)
    pattern = theirs.peft_config["default"].rank_pattern
    expected = {k.removesuffix(".default").removesuffix(".lora_E"): v for k, v in pattern.items()}
    assert proc.masks["default"] == expected
    assert sum(sum(m) for m in expected.values()) == 3 * 3  # the target budget: target_r per layer
    for path, layer in peftkit.adapted_layers(ours):
        mod = theirs.base_model.model.get_submodule(path)
        assert_near(layer.adapters["default"].delta_weight(), mod.get_delta_weight("default"), 6,
                    dtype=torch.float32, layers=30)
    # training ends: pruned triplets are cut out, the function is unchanged, the masks are in the config
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = ours(x)
    proc.on_train_end(ours)
    assert peftkit.get_config(ours, "default").rank_pattern == expected
    ranks = {p: layer.adapters["default"].lora_A.shape[0] for p, layer in peftkit.adapted_layers(ours)}
    assert ranks == {p: sum(m) for p, m in expected.items()}
    with torch.no_grad():
        assert_near(ours(x), before, 24, layers=3)


def test_pruned_adapter_saves_and_loads_in_both_formats(tmp_path) -> None:
    ours = _base()
    peftkit.adapt(ours, _ours_cfg())
    proc = AdaLoraAllocator(ours, peftkit.get_config(ours, "default"))
    proc.on_train_start(ours, None)
    _train(ours, lambda step, opt: proc.on_step_end(ours, step, opt),
           [p for p in ours.parameters() if p.requires_grad], orth=lambda m: proc.extra_loss(m, None, None))
    proc.on_train_end(ours)
    x = torch.randn(4, 16)
    ours.eval()
    with torch.no_grad():
        y = ours(x)
    peftkit.save(ours, tmp_path / "native")
    peftkit.save(ours, tmp_path / "hf", format="hf")
    again = _base()
    peftkit.load(again, tmp_path / "native")
    theirs = peft.PeftModel.from_pretrained(_base(), tmp_path / "hf").eval()
    with torch.no_grad():
        assert_near(again(x), y, dtype=torch.float32)
        assert_near(theirs(x), y, dtype=torch.float32)
    ranks = {p: layer.adapters["default"].r for p, layer in peftkit.adapted_layers(again)}
    assert sum(ranks.values()) == 9  # target_r = 3 on each of the three layers, on average


def test_orthogonality_penalty_is_peft_s_term() -> None:
    model = _base()
    peftkit.adapt(model, _ours_cfg(orth_reg_weight=0.3))
    proc = AdaLoraAllocator(model, peftkit.get_config(model, "default"))
    model.train()
    terms = []
    for _, layer in peftkit.adapted_layers(model):
        a = layer.adapters["default"]
        for p in (a.lora_A @ a.lora_A.t(), a.lora_B.t() @ a.lora_B):
            terms.append(torch.linalg.matrix_norm(p - torch.eye(6)))
    assert_near(proc.extra_loss(model, None, None), 0.3 * torch.stack(terms).mean(), 36)


def test_needs_a_run_length_and_a_budgeting_phase() -> None:
    with pytest.raises(peftkit.PeftkitError, match="budgeting phase"):
        peftkit.config("adalora", target_modules=TARGETS, tinit=10, tfinal=10, total_step=20)
    with pytest.raises(peftkit.PeftkitError, match="target_r"):
        peftkit.config("adalora", target_modules=TARGETS, init_r=4, target_r=8)
    model = _base()
    peftkit.adapt(model, peftkit.config("adalora", target_modules=TARGETS, init_r=4, target_r=2))
    with pytest.raises(peftkit.PeftkitError, match="total_step"):
        AdaLoraAllocator(model).on_train_start(model, None)
    AdaLoraAllocator(model, total_steps=50).on_train_start(model, None)
    proc = AdaLoraAllocator(model)
    proc.run_steps = 40  # what peftkit's trainer tells its procedures: the run's length is enough
    proc.on_train_start(model, None)
    assert copy.deepcopy(model) is not None


def test_a_peft_adalora_config_object_converts() -> None:
    # PEFT's AdaLoraConfig inherits every LoraConfig field; at their defaults they are accepted, set they are refused
    cfg = peftkit.from_peft_config(peft.AdaLoraConfig(target_modules=TARGETS, init_r=6, target_r=3, total_step=30))
    assert (cfg.method, cfg.init_r, cfg.target_r, cfg.total_step) == ("adalora", 6, 3, 30)
    with pytest.raises(peftkit.PeftkitError, match="lora_bias"):
        peftkit.from_peft_config(peft.AdaLoraConfig(target_modules=TARGETS, total_step=30, lora_bias=True))
