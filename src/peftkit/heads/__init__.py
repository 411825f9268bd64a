"""Heads and wrappers over frozen models (not registered layer methods): score calibration (CQD^A), a
label-description cross-attention head (CrossTune), multimodal fusion (CREMA) and token-merging re-activation
(PYRA)."""
