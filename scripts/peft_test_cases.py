"""Run Hugging Face PEFT's own custom-model test cases through peftkit and count what loads and matches.

    python scripts/peft_test_cases.py PATH/TO/peft/tests/test_custom_models.py [--verbose]

Reads the ``TEST_CASES`` list and the tiny model classes of that file (a PEFT checkout's, not copied here), keeps
the cases whose config class peftkit reads (LoRA/DoRA, IA3, LN tuning), and for each: builds the model, applies
the config with PEFT (non-identity init, then seeded noise on every trained tensor), saves it, and checks

  1. PEFT -> peftkit: ``peftkit.load`` into a fresh base gives PEFT's output (fp32, 1e-5 relative);
  2. merged: ``peftkit.merge`` gives the same output — where PEFT merges the case; where PEFT cannot (grouped
     convolutions, ``lora_bias`` on a layer without a bias), ``peftkit.merge`` must refuse too, changing nothing;
  3. peftkit -> PEFT: ``peftkit.save(format="hf")`` loaded by ``PeftModel.from_pretrained`` gives it too.

Each case ends as ``match`` (all three), ``mismatch``, ``refused`` (a PeftkitError: the message is printed), or
``crash`` (any other exception). Prints one line per case with ``--verbose`` and the counts.
"""

from __future__ import annotations

import argparse
import ast
import collections
import copy
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch


def _namespace(source: str) -> tuple[dict[str, Any], list[ast.expr]]:
    """Exec the file's module-level classes (the models) and return its TEST_CASES entries (unevaluated)."""
    import peft
    import torch.nn.functional as F  # noqa: N812
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    ns: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "Conv1D": Conv1D, "copy": copy, "math": math}
    ns.update({k: getattr(peft, k) for k in dir(peft) if not k.startswith("_")})
    tree = ast.parse(source)
    cases: list[ast.expr] = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("Test"):
            try:
                exec(compile(ast.Module([node], []), "<peft tests>", "exec"), ns)
            except Exception:  # a class built on test-only helpers: not a model the cases use
                pass
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TEST_CASES"
                                                  for t in node.targets):
            cases = list(node.value.elts)  # type: ignore[attr-defined]
    return ns, cases


def _non_identity(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    import peft

    kwargs = dict(kwargs)
    if cls is peft.LoraConfig:
        kwargs["init_lora_weights"] = False
    elif cls is peft.IA3Config:
        kwargs["init_ia3_weights"] = False
    return kwargs


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max().clamp_min(1.0))
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0.0, atol=1e-5 * scale))


@torch.no_grad()
def run_case(ns: dict[str, Any], model_id: str, cls: type, kwargs: dict[str, Any]) -> tuple[str, str]:
    import peft

    import peftkit

    factory = ns["MockTransformerWrapper"].from_pretrained
    x = {"X": torch.arange(90).view(9, 10)}
    model = peft.get_peft_model(factory(model_id), cls(**_non_identity(cls, kwargs)))
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    model.eval()
    y = model(**x)
    try:
        copy.deepcopy(model).merge_and_unload()
        peft_merges = True
    except Exception:  # noqa: BLE001 - PEFT refuses to merge this case (NotImplementedError, RuntimeError, ...)
        peft_merges = False
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        try:
            ours = factory(model_id).eval()
            peftkit.load(ours, d)
            if not _close(ours(**x), y):
                return "mismatch", "PEFT -> peftkit"
            if not peft_merges:
                try:
                    peftkit.merge(ours)
                    return "mismatch", "peftkit merges a case PEFT cannot merge"
                except peftkit.PeftkitError:
                    if not _close(ours(**x), y):
                        return "mismatch", "a refused merge changed the outputs"
            elif peftkit.get_method(peftkit.get_config(ours, peftkit.adapter_names(ours)[0]).method).mergeable:
                peftkit.merge(ours)
                if not _close(ours(**x), y):
                    return "mismatch", "merged"
                peftkit.unmerge(ours)
            out = Path(d) / "back"
            peftkit.save(ours, out, format="hf")
            back = peft.PeftModel.from_pretrained(factory(model_id), out).eval()
            if not _close(back(**x), y):
                return "mismatch", "peftkit -> PEFT"
        except peftkit.PeftkitError as e:
            return "refused", str(e).replace(d, "DIR")
        except Exception as e:  # noqa: BLE001 - a crash is what this script counts
            return "crash", f"{type(e).__name__}: {e}"
    return "match", "" if peft_merges else "(PEFT cannot merge it; peftkit refuses too)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="PEFT's tests/test_custom_models.py")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    import peft

    warnings.filterwarnings("ignore")
    ns, nodes = _namespace(args.file.read_text())
    wanted = (peft.LoraConfig, peft.IA3Config, peft.LNTuningConfig)
    counts: collections.Counter[str] = collections.Counter()
    for node in nodes:
        try:
            name, model_id, cls, kwargs = eval(compile(ast.Expression(node), "<case>", "eval"), ns)
        except Exception:  # noqa: BLE001 - a case built from names this PEFT version lacks
            continue
        if cls not in wanted:
            continue
        try:
            result, why = run_case(ns, model_id, cls, kwargs)
        except Exception as e:  # noqa: BLE001 - PEFT itself could not build or save the case
            result, why = "skipped (PEFT)", f"{type(e).__name__}: {e}"
        counts[result] += 1
        if args.verbose or result not in ("match", "skipped (PEFT)"):
            print(f"{result:9} {name} [{model_id}, {cls.__name__}] {why}")
    total = sum(v for k, v in counts.items() if k != "skipped (PEFT)")
    print(f"\n{counts['match']} of {total} cases load and match both ways and merged; "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "match"))


if __name__ == "__main__":
    main()
