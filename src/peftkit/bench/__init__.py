"""The method-comparison harness behind ``peftkit bench`` and ``benchmarks/methods_table.py``.

:mod:`.options` holds the per-method settings (data, one place), :mod:`.runner` runs each method's ``peftkit
train`` (and the fixed-batch timing pass, :mod:`.timing`) in a fresh process, :mod:`.report` writes the JSON, the
Markdown table and the PNG plot (:mod:`.chart`), :mod:`.command` is the ``bench`` subcommand.
"""

from .options import OPTIONS, QUICK_METHODS, QUICK_SETTINGS
from .report import plot, table
from .runner import BenchSettings, resolve_methods, run_bench, supports

__all__ = ["OPTIONS", "QUICK_METHODS", "QUICK_SETTINGS", "BenchSettings", "plot", "resolve_methods", "run_bench",
           "supports", "table"]
