"""Composition blocks (peftkit.compose): each block against a reference computed by hand on a tiny model, merges,
refusals, Fuse training and save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import tiny_bert
from peftkit.compose import Average, BatchSplit, Fuse, Parallel, Split, Stack
from tolerance import assert_near

D_IN, D_H, D_OUT = 6, 8, 5


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(D_IN, D_H)
        self.l2 = nn.Linear(D_H, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _model(*specs: tuple[str, str, dict]) -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    for name, method, fields in specs:
        peftkit.adapt(model, peftkit.config(method, target_modules=["l1", "l2"], **fields), name)
    with torch.no_grad():  # away from the identity init, so every adapter does something
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    return model


LORA = ("lora", {"r": 2, "alpha": 4})
IA3 = ("ia3", {"feedforward_modules": []})
SERIES = ("series_adapter", {"bottleneck_size": 3})


def _x(b: int = 4, t: int = 3) -> torch.Tensor:
    return torch.randn(b, t, D_IN, generator=torch.Generator().manual_seed(2))


# -- hand-computed per-adapter layer outputs --------------------------------------------------------------------
def _apply(layer, name: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Adapter ``name`` applied on output ``h`` of a layer with input ``x`` (its own formula, written out)."""
    a = layer.adapters[name]
    if a.method == "lora":
        fa, fb = a.factors()
        return h + a.s * (x @ fa.T @ fb.T)
    if a.method == "ia3":
        return h * a.ia3_l
    if a.method == "series_adapter":
        return h + a.s * (torch.tanh(h @ a.adapter_down.T) @ a.adapter_up.T)
    raise AssertionError(a.method)


def _ref(model: Tiny, x: torch.Tensor, layer_fn) -> torch.Tensor:
    """The model's forward with each adapted layer computed by ``layer_fn(layer, x, base_out)``."""
    l1, l2 = model.l1, model.l2
    h1 = layer_fn(l1, x, l1.base_layer(x))
    z = torch.tanh(h1)
    return layer_fn(l2, z, l2.base_layer(z))


def _alone(model: Tiny, name: str, x: torch.Tensor) -> torch.Tensor:
    return _ref(model, x, lambda la, xx, h: _apply(la, name, xx, h))


# -- forwards --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first,second", [(SERIES, SERIES), (LORA, IA3), (IA3, SERIES), (LORA, LORA)])
def test_stack_is_b_applied_on_a_output(first, second) -> None:
    model = _model(("a", *first), ("b", *second))
    peftkit.set_active(model, Stack("a", "b"))
    x = _x()
    want = _ref(model, x, lambda la, xx, h: _apply(la, "b", xx, _apply(la, "a", xx, h)))
    assert_near(model(x), want, D_H)
    peftkit.set_active(model, ["a", "b"])  # a plain list keeps its meaning: the deltas add up
    summed = _ref(model, x, lambda la, xx, h: _apply(la, "a", xx, h) + _apply(la, "b", xx, h) - h)
    assert_near(model(x), summed, D_H)
    if first != LORA or second != LORA:  # the two differ where b reads the output
        assert not torch.allclose(model(x), want, atol=1e-4)


def test_stack_refuses_an_adapter_that_reads_the_layer_input_second() -> None:
    model = _model(("lora", *LORA), ("ffn", "ia3", {"feedforward_modules": ["l2"]}))
    peftkit.set_active(model, Stack("ffn", "lora"))  # first: fine (it runs on the host)
    with pytest.raises(peftkit.PeftkitError, match=r"Stack: 'ffn' \(ia3\) cannot be applied on the output of "
                                                   r"'lora' \(lora\).*'l2'"):
        peftkit.set_active(model, Stack("lora", "ffn"))
    assert peftkit.compose.active_composition(model) == Stack("ffn", "lora")  # unchanged


def test_parallel_rows_are_each_adapter_alone_in_one_forward() -> None:
    model = _model(("a", *SERIES), ("b", *LORA))
    x = _x(3)
    calls = []
    h = model.l2.register_forward_hook(lambda *a: calls.append(1))
    with peftkit.compose.active(model, Parallel("a", "b")):
        out = model(x)
    h.remove()
    assert out.shape[0] == 6 and len(calls) == 1
    assert_near(out[:3], _alone(model, "a", x), D_H)
    assert_near(out[3:], _alone(model, "b", x), D_H)
    assert peftkit.compose.active_composition(model) is None and model(x).shape[0] == 3  # hook gone


def test_split_is_each_position_through_its_adapter() -> None:
    model = _model(("a", *SERIES), ("b", *IA3))
    x = _x(2, 5)
    peftkit.set_active(model, Split("a", "b", splits=2))
    out = model(x)
    assert_near(out[:, :2], _alone(model, "a", x)[:, :2], D_H)
    assert_near(out[:, 2:], _alone(model, "b", x)[:, 2:], D_H)


def test_batch_split_equals_mixed_batch() -> None:
    model = _model(("a", *LORA), ("b", *SERIES))
    x = _x(5)
    peftkit.set_active(model, BatchSplit("a", "b", batch_sizes=[2, 3]))
    out = model(x)
    peftkit.set_active(model, ["a"])
    with peftkit.mixed_batch(model, ["a", "a", "b", "b", "b"]):
        want = model(x)
    assert_near(out, want, D_H)
    assert_near(out[2:], _alone(model, "b", x)[2:], D_H)
    peftkit.set_active(model, BatchSplit("a", "b", batch_sizes=[2, 2]))
    with pytest.raises(peftkit.PeftkitError, match="batch_sizes"):
        model(x)


def test_average_is_the_weighted_mean_of_the_outputs() -> None:
    model = _model(("a", *SERIES), ("b", *IA3), ("c", *LORA))
    x = _x()
    peftkit.set_active(model, Average("a", "b", "c", weights=[1.0, 2.0, 1.0]))
    want = _ref(model, x, lambda la, xx, h: 0.25 * _apply(la, "a", xx, h) + 0.5 * _apply(la, "b", xx, h)
                + 0.25 * _apply(la, "c", xx, h))
    assert_near(model(x), want, D_H)


def test_nested_stack_of_average() -> None:
    model = _model(("a", *LORA), ("b", *LORA), ("c", *IA3))
    x = _x()
    peftkit.set_active(model, Stack(Average("a", "b"), "c"))
    want = _ref(model, x, lambda la, xx, h: _apply(la, "c", xx, 0.5 * _apply(la, "a", xx, h)
                                                    + 0.5 * _apply(la, "b", xx, h)))
    assert_near(model(x), want, D_H)


# -- Fuse -----------------------------------------------------------------------------------------------------
def test_fuse_with_one_hot_attention_equals_that_adapter() -> None:
    model = _model(("a", *SERIES), ("b", *LORA))
    x = _x()
    fuse = Fuse("a", "b", name="f")
    peftkit.set_active(model, fuse)
    with torch.no_grad():  # key = 0 with bias: every query·key is constant; the value is the identity
        for layer in (model.l1, model.l2):
            f = layer.fusions["f"]
            f.key.weight.zero_()
            f.query.weight.zero_()
            f.query.bias.fill_(1.0)
            f.key.bias.fill_(0.0)
    # equal scores: the mean of the two adapters' deltas
    want = _ref(model, x, lambda la, xx, h: 0.5 * _apply(la, "a", xx, h) + 0.5 * _apply(la, "b", xx, h))
    assert_near(model(x), want, D_H)
    # K = I, q = 1e4·1: score_i = 1e4·Σ d_i, a one-hot softmax picking, per position, the adapter with the larger
    # Σ d_i — the output there equals that adapter's alone
    with torch.no_grad():
        for layer in (model.l1, model.l2):
            f = layer.fusions["f"]
            f.query.bias.fill_(1e4)
            f.key.weight.copy_(torch.eye(f.key.weight.shape[0]))
    out = model(x)

    def pick(la, xx, h):
        da = _apply(la, "a", xx, h) - h
        db = _apply(la, "b", xx, h) - h
        take_a = (da.sum(-1) > db.sum(-1)).unsqueeze(-1)
        return h + torch.where(take_a, da, db)

    assert_near(out, _ref(model, x, pick), D_H)


def test_fuse_trains_only_the_fusion_and_saves_loads(tmp_path) -> None:
    model = _model(("a", *SERIES), ("b", *LORA))
    peftkit.set_active(model, Fuse("a", "b", name="f"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusions.f." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert peftkit.compose.fusion_regularization(model).item() == 0.0  # V starts at the identity
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = _x()
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert peftkit.compose.fusion_regularization(model, "f").item() > 0  # V left the identity
    out = model(x)
    for n in ("a", "b"):
        peftkit.save(model, tmp_path / n, n)
    peftkit.save(model, tmp_path / "f", "f")
    fresh = _model()
    for n in ("a", "b"):
        peftkit.load(fresh, tmp_path / n, n)
    assert peftkit.load(fresh, tmp_path / "f") == "f"
    peftkit.set_active(fresh, Fuse("a", "b", name="f"))
    assert torch.equal(fresh(x), out)
    with pytest.raises(peftkit.PeftkitError, match="already loaded"):
        peftkit.load(fresh, tmp_path / "f")
    bare = _model(("a", *SERIES))
    with pytest.raises(peftkit.PeftkitError, match=r"\['b'\].*load them first"):
        peftkit.load(bare, tmp_path / "f")


# -- merging ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [Stack("a", "b"), Average("a", "b", weights=[0.3, 0.7]),
                                   Stack(Average("a", "b"), "c")])
def test_merge_is_exact_for_stack_and_average(block) -> None:
    model = _model(("a", *LORA), ("b", *IA3), ("c", *IA3))
    w0 = model.l1.base_layer.weight.detach().clone()
    peftkit.set_active(model, block)
    x = _x()
    want = model(x)
    peftkit.merge(model)
    assert model.l1.merged
    assert_near(model(x), want, D_H, layers=2)
    assert_near(model.l1.base_layer(x), model.l1(x), 1)  # merged: the host alone
    peftkit.unmerge(model)
    assert torch.equal(model.l1.base_layer.weight, w0)
    assert_near(model(x), want, D_H)


@pytest.mark.parametrize("block", [Parallel("a", "b"), Split("a", "b", splits=1),
                                   BatchSplit("a", "b", batch_sizes=[1, 3]), Fuse("a", "b")])
def test_merge_refuses_blocks_that_are_not_one_weight(block) -> None:
    model = _model(("a", *LORA), ("b", *LORA))
    w0 = model.l1.base_layer.weight.detach().clone()
    peftkit.set_active(model, block)
    with pytest.raises(peftkit.PeftkitError, match=rf"merge: the composition block {type(block).__name__}\("):
        peftkit.merge(model)
    assert torch.equal(model.l1.base_layer.weight, w0) and not model.l1.merged


def test_merge_refuses_a_non_mergeable_member() -> None:
    model = _model(("a", *LORA), ("s", *SERIES))
    peftkit.set_active(model, Stack("a", "s"))
    with pytest.raises(peftkit.PeftkitError, match=r"'s' \(series_adapter\) is not mergeable"):
        peftkit.merge(model)
    assert not model.l1.merged


# -- refusals --------------------------------------------------------------------------------------------------
def test_block_arguments_are_checked() -> None:
    with pytest.raises(peftkit.PeftkitError, match="at least two"):
        Stack("a")
    with pytest.raises(peftkit.PeftkitError, match="weights"):
        Average("a", "b", weights=[1.0])
    with pytest.raises(peftkit.PeftkitError, match="splits"):
        Split("a", "b", splits=-1)
    with pytest.raises(peftkit.PeftkitError, match="batch_sizes"):
        BatchSplit("a", "b", batch_sizes=[1])
    model = _model(("a", *LORA))
    with pytest.raises(peftkit.PeftkitError, match="no adapter named 'zz'"):
        peftkit.set_active(model, Stack("a", "zz"))


def test_stack_of_two_model_level_prompts_is_refused_naming_both() -> None:
    model = tiny_bert()
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=2), "p1")
    peftkit.adapt(model, peftkit.config("prefix_tuning", num_virtual_tokens=2), "p2")
    with pytest.raises(peftkit.PeftkitError, match=r"'p1' \(prompt_tuning\) and 'p2' \(prefix_tuning\) are both "
                                                   "model-level"):
        peftkit.set_active(model, Stack("p1", "p2"))
    with pytest.raises(peftkit.PeftkitError, match="model-level"):
        peftkit.set_active(model, Parallel("p1", "p2"))


def test_mixed_batch_under_a_composition_is_refused() -> None:
    model = _model(("a", *LORA), ("b", *LORA))
    peftkit.set_active(model, Stack("a", "b"))
    with peftkit.mixed_batch(model, ["a"] * 4), pytest.raises(peftkit.PeftkitError, match="BatchSplit"):
        model(_x())


def test_parallel_on_a_transformers_model_with_mask_and_labels() -> None:
    model = tiny_bert()
    for n, seed in (("a", 1), ("b", 2)):
        peftkit.adapt(model, peftkit.config("lora", target_modules=["query", "value"], r=2), n)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for k, p in model.named_parameters():
                if f".adapters.{n}." in k:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    alone = {}
    for n in ("a", "b"):
        peftkit.set_active(model, n)
        alone[n] = model(input_ids=ids, attention_mask=mask).logits
    peftkit.set_active(model, Parallel("a", "b"))
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert out.logits.shape[0] == 4 and torch.isfinite(out.loss)
    assert_near(out.logits[:2], alone["a"], 32, layers=4)
    assert_near(out.logits[2:], alone["b"], 32, layers=4)


def test_trainable_state_follows_the_composition_and_delete_drops_fusions() -> None:
    model = _model(("a", *LORA), ("b", *LORA))
    peftkit.set_active(model, Fuse("a", "b", name="f"))
    peftkit.adapt(model, peftkit.config("lora", target_modules=["l1"], r=2), "c", activate=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusions.f." in n for n in trainable)  # adding an adapter kept the fusion's state
    peftkit.set_active(model, Stack("a", "b"))  # no Fuse: the adapters train again, the fusion does not
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.a." in n for n in trainable) and not any(".fusions." in n for n in trainable)
    peftkit.delete(model, "a")
    assert peftkit.compose.fusion_names(model) == [] and "fusions" not in dict(model.l1.named_children()) or \
        len(model.l1.fusions) == 0
    assert peftkit.compose.active_composition(model) is None and peftkit.active_adapters(model) == ["b"]
