"""TIES / DARE / magnitude-pruning merges (``peftkit.combine(how=…)``, :mod:`peftkit.ops.merging`): the maths on
hand-worked examples, and the numbers of Hugging Face PEFT's ``add_weighted_adapter`` for the same adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.ops import merging as M
from tolerance import assert_near

peft = pytest.importorskip("peft")


def test_ties_by_hand() -> None:
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    t2 = torch.tensor([-1.0, -2.0, 0.1, 4.0])
    # density 0.5 keeps 2 of 4: t1 → [3, 0, 0, 2], t2 → [0, -2, 0, 4]; votes (total): [3, -2, 0, 6] → +, -, +, +
    # disjoint mean with weights (1, 0.5): [3, -1, 0, (2 + 2)/2]
    out = M.merge_task_tensors("ties", [t1, t2], torch.tensor([1.0, 0.5]), density=0.5)
    assert out.tolist() == [3.0, -1.0, 0.0, 2.0]
    # "frequency" votes count signs: every entry of (t1, -t1) is a 1-vs-1 split, which goes to +, so each entry
    # keeps its positive member alone
    out = M.merge_task_tensors("ties", [t1, -t1], torch.tensor([1.0, 1.0]), density=1.0, sign_method="frequency")
    assert out.tolist() == [3.0, 1.0, 0.5, 2.0]
    # "total" weighs magnitudes: [3, -1] + [-1, -2] → the second entry's vote is negative
    out = M.merge_task_tensors("ties", [t1, t2], torch.tensor([1.0, 1.0]), density=1.0, sign_method="total")
    assert out.tolist() == pytest.approx([3.0, -1.5, 0.3, 3.0])


def test_dare_keeps_the_expectation_and_magnitude_prune_keeps_the_largest() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200_000, generator=g)
    d = M.random_drop(t, 0.3, torch.Generator().manual_seed(1))
    kept = d != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(d[kept], t[kept] / 0.3)
    p = M.magnitude_mask(t, 0.1)
    assert (p != 0).sum().item() == 20_000
    assert p.abs().max() == t.abs().max() and p[p != 0].abs().min() >= t.abs().kthvalue(180_000).values


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 10), nn.Linear(10, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _pair(rank_b: int = 4):
    """A peft model and a peftkit model holding the same two LoRA adapters ("x" r=4 α=8, "y" r=rank_b α=4)."""
    torch.manual_seed(0)
    base = _Net()
    theirs = peft.get_peft_model(_copy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b"]), "x")
    theirs.add_adapter("y", peft.LoraConfig(r=rank_b, lora_alpha=4, target_modules=["a", "b"]))
    ours = _copy(base)
    peftkit.adapt(ours, peftkit.config("lora", r=4, alpha=8, target_modules=["a", "b"]), "x")
    peftkit.adapt(ours, peftkit.config("lora", r=rank_b, alpha=4, target_modules=["a", "b"]), "y", activate=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, layer in peftkit.adapted_layers(ours):
            for n in ("x", "y"):
                ad = layer.adapters[n]
                ad.lora_A.copy_(torch.randn(ad.lora_A.shape, generator=g))
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g))
                mod = theirs.base_model.model.get_submodule(path)
                mod.lora_A[n].weight.copy_(ad.lora_A)
                mod.lora_B[n].weight.copy_(ad.lora_B)
    return theirs, ours


def _copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def _delta_peft(theirs, path: str, name: str) -> torch.Tensor:
    return theirs.base_model.model.get_submodule(path).get_delta_weight(name)


def _delta_ours(ours, path: str, name: str) -> torch.Tensor:
    ad = dict(peftkit.adapted_layers(ours))[path].adapters[name]
    a, b = ad.factors()
    return float(ad.s) * b @ a


def _dare_reference(theirs, how: str, weights: dict[str, float], density: float, seed: int):
    from peft.utils import merge_utils as PM

    fn = PM.dare_ties if "ties" in how else PM.dare_linear
    torch.manual_seed(seed)
    out = {}
    for path in ("a", "b"):
        mod = theirs.base_model.model.get_submodule(path)
        if how.endswith("_svd"):
            deltas = [mod.get_delta_weight(n) for n in weights]
            dw = fn(deltas, torch.tensor(list(weights.values())), density)
            u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
            out[path] = (u[:, :3] * s[:3] @ vh[:3]).float()
            continue
        ws = [w * mod.scaling[n] for n, w in weights.items()]
        wa = torch.tensor([abs(x) ** 0.5 * (1 if x >= 0 else -1) for x in ws])
        wb = torch.tensor([abs(x) ** 0.5 for x in ws])
        a = fn([mod.lora_A[n].weight.data for n in weights], wa, density)
        b = fn([mod.lora_B[n].weight.data for n in weights], wb, density)
        out[path] = b @ a
    return out


@pytest.mark.parametrize("how", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                                 "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_matches_peft_add_weighted_adapter(how: str) -> None:
    theirs, ours = _pair()
    weights = {"x": 0.7, "y": -0.4}
    extra = {} if how in ("linear", "svd") else {"density": 0.5}
    svd = how.endswith("svd")
    torch.manual_seed(123)
    peftkit.combine(ours, weights, "m", how=how, **({"rank": 3} if svd else {}), **extra)
    if how.startswith("dare"):
        # PEFT draws its new adapter's init from the global generator before merging, so its drops cannot be
        # replayed through add_weighted_adapter: apply PEFT's own merge functions, in combine's order, instead
        expected = _dare_reference(theirs, how, weights, 0.5, seed=123)
    else:
        theirs.add_weighted_adapter(list(weights), list(weights.values()), "m", combination_type=how,
                                    **({"svd_rank": 3} if svd else {}), **extra)
        expected = {p: _delta_peft(theirs, p, "m") for p in ("a", "b")}
    for path in ("a", "b"):
        assert_near(_delta_ours(ours, path, "m"), expected[path], 16, dtype=torch.float32)
    if how in ("ties", "dare_ties"):  # a real difference from plain linear, so the comparison above had teeth
        peftkit.combine(ours, weights, "lin", how="linear")
        assert not torch.allclose(_delta_ours(ours, "a", "lin"), _delta_ours(ours, "a", "m"), atol=1e-3)


def test_bad_merge_options_are_refused_and_change_nothing() -> None:
    _, ours = _pair(rank_b=2)
    before = peftkit.adapter_names(ours)
    for kwargs, msg in [({"how": "ties"}, "density"), ({"how": "ties", "density": 1.5}, "density"),
                        ({"how": "cat", "density": 0.5}, "density= is only used"),
                        ({"how": "ties_svd", "density": 0.5}, "rank="),
                        ({"how": "ties", "density": 0.5, "majority_sign_method": "most"}, "majority_sign_method"),
                        ({"how": "ties", "density": 0.5}, "one rank"), ({"how": "tie"}, "how must be one of")]:
        with pytest.raises(peftkit.PeftkitError, match=msg):
            peftkit.combine(ours, {"x": 1.0, "y": 1.0}, "m", **kwargs)
        assert peftkit.adapter_names(ours) == before
