"""Maths that several methods or tasks use and that is not specific to one PEFT method (DESIGN.md: ops/): spectral
transforms, task-vector merging, ..."""
