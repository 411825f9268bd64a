"""CQD^A affine score calibration: identity at init, recalibrates a miscalibrated classifier, only α/β train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import PeftkitError
from peftkit.heads.calibration import (
    AffineCalibration,
    CalibratedModel,
    atom_truth,
    expected_calibration_error,
    fit_calibration,
    t_conorm,
    t_norm,
)

C = 4


class Miscalibrated(nn.Module):
    """A linear classifier whose logits are the true ones scaled ×3 and shifted per class."""

    def __init__(self, w: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(3 * w)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.shift


def _data(n: int, seed: int = 0) -> tuple[Miscalibrated, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, 8, generator=g) * 0.5
    x = torch.randn(n, 8, generator=g)
    y = torch.multinomial(torch.softmax(x @ w.T, -1), 1, generator=g).squeeze(1)  # labels from the true model
    return Miscalibrated(w, torch.tensor([1.5, -1.0, 0.5, -2.0])), x, y


def test_identity_at_init() -> None:
    torch.manual_seed(0)
    s = torch.randn(6, C) * 5
    cal = AffineCalibration(C, num_relations=3)
    assert torch.equal(cal(s, relation=torch.tensor([0, 1, 2, 0, 1, 2])), s)  # tables start at 0: exact identity
    near = AffineCalibration(C, d_features=5, score_only=True)  # CQD^A's Linear sources, scaled by 1e-3
    s1 = torch.randn(6, C)  # unit-scale scores: the change is O(1e-3·|φ|·(1 + |φ| + |e|))
    out = near(s1, features=torch.randn(6, 5))
    assert not torch.equal(out, s1) and (out - s1).abs().max() < 1e-2
    model, x, _ = _data(32)
    wrapped = CalibratedModel(model, AffineCalibration(C))
    assert torch.equal(wrapped(x), model(x))


def test_training_improves_nll_and_ece_on_held_out() -> None:
    model, x, y = _data(4000)
    wrapped = CalibratedModel(model, AffineCalibration(C))
    tr, te = slice(0, 2000), slice(2000, None)
    with torch.no_grad():
        before = wrapped(x[te])
    nll0, ece0 = F.cross_entropy(before, y[te]).item(), expected_calibration_error(before.softmax(-1), y[te])
    fit_calibration(wrapped.calibration, wrapped.scores(x[tr]), y[tr])
    with torch.no_grad():
        after = wrapped(x[te])
    nll1, ece1 = F.cross_entropy(after, y[te]).item(), expected_calibration_error(after.softmax(-1), y[te])
    assert nll1 < nll0 - 0.2 and ece1 < ece0 / 2 and ece1 < 0.05, (nll0, nll1, ece0, ece1)
    # the exact inverse of the miscalibration is α = −2/3, β_c = −shift_c/3 (up to a constant per row)
    alpha, beta = wrapped.calibration.per_class
    assert torch.allclose(alpha, torch.full((C,), -2 / 3), atol=0.1)
    b = beta - beta.mean()
    want = -(model.shift - model.shift.mean()) / 3
    assert torch.allclose(b, want, atol=0.15), (b, want)


def test_only_calibration_parameters_train() -> None:
    model, x, y = _data(64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = CalibratedModel(model, AffineCalibration(C, score_only=True))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable == ["calibration.per_class", "calibration.from_score.weight", "calibration.from_score.bias"]
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == 2 * C + 2 + 2
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped.train()
    F.cross_entropy(wrapped(x), y).backward()
    assert model.lin.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.calibration.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_per_relation_broadcast() -> None:
    """Per-relation α/β apply to the whole row of candidate scores of that sample (CQD^A's [B, 1])."""
    cal = AffineCalibration(num_relations=2)
    with torch.no_grad():
        cal.per_relation.copy_(torch.tensor([[1.0, 0.5], [-0.5, -1.0]]))
    s = torch.randn(3, 7)
    rel = torch.tensor([0, 1, 0])
    want = s * (1 + torch.tensor([[1.0], [-0.5], [1.0]])) + torch.tensor([[0.5], [-1.0], [0.5]])
    assert torch.allclose(cal(s, relation=rel), want)


def test_logic_helpers() -> None:
    s = torch.randn(5, 3)
    assert torch.allclose(atom_truth(s, negated=True), 1 - torch.sigmoid(s))
    a, b = torch.rand(4), torch.rand(4)
    assert torch.allclose(t_norm(a, b), a * b) and torch.allclose(t_conorm(a, b), 1 - (1 - a) * (1 - b))


def test_ece_reference() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.65, 0.35], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    # bins: 0.95 -> (0.9,1] correct; 0.65 -> (0.6,0.7] wrong; 0.7 -> (0.6,0.7] correct; 0.55 -> (0.5,0.6] correct
    want = (abs(1 - 0.95) + 2 * abs(0.5 - 0.675) + abs(1 - 0.55)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(want)


def test_bad_input() -> None:
    with pytest.raises(PeftkitError, match="at least one"):
        AffineCalibration()
    with pytest.raises(PeftkitError, match="num_classes"):
        AffineCalibration(0)
    cal = AffineCalibration(C, num_relations=2)
    with pytest.raises(PeftkitError, match="num_classes=4"):
        cal(torch.randn(2, 3), relation=torch.tensor([0, 1]))
    with pytest.raises(PeftkitError, match="relation"):
        cal(torch.randn(2, C))
    with pytest.raises(PeftkitError, match="relation ids"):
        cal(torch.randn(2, C), relation=torch.tensor([0, 2]))
