"""Maths that several methods or tasks could use and that is not PEFT-specific (spectral transforms, ...)."""
