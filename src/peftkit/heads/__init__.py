"""Heads and wrappers over frozen models (not layer methods: nothing here is injected with ``peftkit.adapt``): score
calibration and complex query answering over a frozen link predictor (CQD, CQD^A), a label-description
cross-attention head (CrossTune), multimodal fusion (CREMA) and token-merging re-activation (PYRA). Each is registered
below, family ``head``, so that ``peftkit methods`` lists it (``peftkit methods NAME`` says where to import it from);
the registry does not import the modules."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadInfo:
    """What ``peftkit methods`` shows of a head: ``entry`` is the class or function to use."""

    name: str
    paper: str
    description: str
    params: str
    entry: str
    family: str = "head"


_HEADS: dict[str, HeadInfo] = {}


def register_head(info: HeadInfo) -> HeadInfo:
    if info.name in _HEADS and _HEADS[info.name] != info:
        raise ValueError(f"head {info.name!r} registered twice")
    _HEADS[info.name] = info
    return info


def all_heads() -> list[HeadInfo]:
    return sorted(_HEADS.values(), key=lambda h: h.name)


for _info in (
    HeadInfo("calibration", "Arakelyan et al., NeurIPS 2023, CQD^A (arXiv 2301.12313)",
             "affine calibration φ' = φ·(1 + α) + β of a frozen model's scores, α/β per class, relation, feature, "
             "candidate or score", "2 per class / relation, or 2·(d + 1)",
             "peftkit.heads.calibration.AffineCalibration"),
    HeadInfo("cqd", "Arakelyan et al., ICLR 2021, CQD (arXiv 2011.03459); NeurIPS 2023, CQD^A (arXiv 2301.12313)",
             "complex query answering (9 query types) by t-norm beam search over a frozen ComplEx; CQD^A adds the "
             "affine calibration with α, β from the subject, predicate and object embeddings, trained on 2p queries",
             "CQD 0; CQD^A 2·(4r + 1) + 2·(2r + 1) for ComplEx rank r", "peftkit.heads.cqd.CQD"),
    HeadInfo("crema", "Yu et al., ICLR 2025, CREMA (arXiv 2402.05889)",
             "per-modality LoRA on a shared backbone with own query tokens and projection, fused by a gated linear "
             "layer", "per modality: LoRA + n_q·d + projection; fusion (M−1)·d_out²", "peftkit.heads.crema.Crema"),
    HeadInfo("crosstune", "Lu et al., LREC-COLING 2024, CrossTune (arXiv 2403.12468)",
             "label-description queries cross-attend to a frozen black-box encoder's cached features",
             "one multi-head attention + LayerNorm + score vector", "peftkit.heads.crosstune.CrossAttentionLabelHead"),
    HeadInfo("pyra", "Xiong et al., ECCV 2024, PYRA (arXiv 2403.09192)",
             "ToMe token merging with parallel yielding re-activation of the merged tokens (channel × token weights)",
             "per block: r_l + d", "peftkit.heads.pyra.PyraReactivation"),
):
    register_head(_info)
del _info

__all__ = ["HeadInfo", "all_heads", "register_head"]
