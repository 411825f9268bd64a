"""Frozen low-bit base weights and fake quantisation: bitsandbytes NF4/int8 hosts (:mod:`.bnb`), a group-wise
round-to-nearest quantiser (:mod:`.rtn`) and LSQ fake quantisation with a learned step (:mod:`.lsq`)."""

from . import bnb  # noqa: E402,F401 - registers bitsandbytes' layers as quantised host kinds with the core
