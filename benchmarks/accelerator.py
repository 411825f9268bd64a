"""On a CUDA GPU: every registered method's bfloat16 training step, and LoRA vs PEFT on MiniLM and SmolLM2 shapes.

    python benchmarks/accelerator.py [--out benchmarks/results/accelerator] [--methods lora,dora,...]
                                     [--rounds 21] [--only methods|lora_vs_peft]
    python benchmarks/accelerator.py --device cpu --tiny      # a dry run of this script on the CPU (tested)

Part 1, **every method** (or ``--methods``): a randomly initialised BERT sequence classifier with all-MiniLM-L6-v2's
shape (hidden 384, 6 layers, 12 heads; 2 labels), batch 16 × 128 random token ids. Each method is adapted as
``peftkit train`` adapts it (the method's default targets, else all-linear; the classification head trained in full;
the method's options from ``peftkit.bench.options.OPTIONS``; its training procedure attached; data-aware
initialisation skipped, as in the method table's timing pass) on the device, and trained with AdamW in two settings:

* ``autocast``: float32 weights, ``torch.autocast(device, bfloat16)`` around forward and loss;
* ``bf16 weights``: ``model.to(torch.bfloat16)`` before ``adapt`` (the adapter keeps float32 parameters, peftkit's
  default), no autocast.

A setting passes when the loss is finite at every step and every trainable tensor gets a finite gradient; the table
gives pass/fail (with the error's first line), the median time of a step after one warm-up step and, on CUDA, the
step's peak memory (``torch.cuda.max_memory_allocated`` rise). A failure does not stop the others; the exit status
is 1 when any failed.

Part 2, **LoRA vs PEFT** (``lora_vs_peft.py``'s comparison, run here for each of): MiniLM and the SmolLM2-135M-shaped
Llama, fp32 and bf16 autocast — training step time (interleaved rounds, with the no-adapter floor), peak memory of a
step (``torch.cuda.max_memory_allocated``), inference and (SmolLM2) greedy decoding against the base model.

Writes ``OUT/accelerator[-cpu][-tiny].json`` and ``.md`` (``--out``, default ``benchmarks/results/accelerator``) and,
per LoRA-vs-PEFT configuration, ``lora_vs_peft.py``'s own ``<config>.json`` / ``.md`` in the same folder. On the CPU
(``--device cpu``, meant with ``--tiny``) everything runs the same way except peak memory, which is not measured
there (``lora_vs_peft.py`` measures CPU memory in fresh processes). Without CUDA and without ``--device cpu`` it
prints one line and exits with status 2, writing nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lora_vs_peft as lvp  # noqa: E402  (the LoRA-vs-PEFT comparison)

RESULTS = Path(__file__).parent / "results" / "accelerator"
SETTINGS = ("autocast", "bf16 weights")
CLASSIFIER = {"full": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                           vocab_size=30522, batch=16, seq=128),
              # 3 layers: MoS shares its ranks across the layers (r − r_p ≤ (r_e − r_p)·L with its defaults)
              "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                           vocab_size=1000, batch=2, seq=16)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _classifier(tiny: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A seeded BERT sequence classifier of MiniLM's shape (or a tiny one) and a fixed batch, on the CPU."""
    from transformers import BertConfig, BertForSequenceClassification

    shape = dict(CLASSIFIER["tiny" if tiny else "full"])
    b, n = shape.pop("batch"), shape.pop("seq")
    torch.manual_seed(0)
    cfg = BertConfig(**shape, num_labels=2, max_position_embeddings=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    model = BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    vocab = shape["vocab_size"]
    inputs = {"input_ids": torch.randint(min(1000, vocab // 4), vocab, (b, n), generator=g),
              "attention_mask": torch.ones(b, n, dtype=torch.long),
              "labels": torch.randint(0, 2, (b,), generator=g)}
    return model, inputs


def _config(name: str, model: torch.nn.Module, steps: int) -> Any:
    """The method's config as ``peftkit train`` / the method table build it on a classifier."""
    from peftkit.bench.options import config_options
    from peftkit.core.registry import get
    from peftkit.models import classifier_head_names

    def parse(raw: str) -> Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    info = get(name)
    fields: dict[str, Any] = {k: parse(v) for k, v in config_options(name, steps).items()}
    if not info.model_level and "target_modules" not in fields:
        own = next(f.default for f in dataclasses.fields(info.config) if f.name == "target_modules")
        fields["target_modules"] = own if isinstance(own, str) else "all-linear"
    fields.setdefault("modules_to_save", classifier_head_names(model) or None)
    return info.config.from_dict(fields)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]


def method_step(name: str, setting: str, device: str, tiny: bool, steps: int) -> dict[str, Any]:
    """Train ``name`` for 1 + ``steps`` steps in ``setting`` on ``device``; the row of the table."""
    import peftkit
    from peftkit.train.trainer import method_procedures

    row: dict[str, Any] = {"method": name, "setting": setting, "ok": False}
    try:
        model, inputs = _classifier(tiny)
        model.to(device)
        if setting == "bf16 weights":
            model.to(torch.bfloat16)
        cfg = _config(name, model, 1 + steps)
        torch.manual_seed(1)
        peftkit.adapt(model, cfg)
        model.train()
        info = peftkit.get_method(name)
        procs = method_procedures(info, model, cfg)
        params = list(peftkit.trainable_parameters(model))
        row["trainable"] = sum(p.numel() for p in params)
        row["adapter_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        opt = torch.optim.AdamW(params, lr=1e-4)
        for p in procs:
            p.on_train_start(model, opt)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        cast = (torch.autocast(device, dtype=torch.bfloat16) if setting == "autocast"
                else contextlib.nullcontext())
        times, losses, peak = [], [], None
        for i in range(1 + steps):
            if i == 1 and device == "cuda":
                _sync(device)
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for p in procs:
                p.on_step_start(model, i)
            with cast:
                out = model(**inputs)
                loss = out.loss
                for p in procs:
                    extra = p.extra_loss(model, inputs, out)
                    if extra is not None:
                        loss = loss + extra
            loss.backward()
            if i == 0:
                missing = [n for n, p in model.named_parameters() if p.requires_grad
                           and (p.grad is None or not bool(torch.isfinite(p.grad).all()))]
                if missing:
                    raise RuntimeError(f"no finite gradient for {len(missing)} trainable tensors, e.g. {missing[0]}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            for p in procs:
                p.on_step_end(model, i, opt)
            _sync(device)
            if i >= 1:
                times.append(time.perf_counter() - t0)
            if i == 1 and device == "cuda":
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            losses.append(float(loss.detach().float()))
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"loss {losses[-1]} at step {i}")
        row.update(ok=True, step_s=statistics.median(times), loss=losses[-1], step_peak_mib=peak)
    except Exception as e:  # one row per failure; the others run on
        row["error"] = _one_line(e)
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def method_names(spec: str | None) -> list[str]:
    """``--methods``: a comma list of registered methods; None: every registered method."""
    from peftkit.core.registry import all_methods

    registered = [m.name for m in all_methods()]
    names = registered if spec is None else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in registered]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; registered: "
                         f"{', '.join(registered)}")
    return names


def markdown(res: dict[str, Any]) -> str:
    v = res["versions"]
    lines = [f"# peftkit on {v['device']}", ""]
    if res["tiny"]:
        lines += ["**Dry run (--tiny): tiny shapes, one round — a test of the script, not a measurement.**", ""]
    lines += [f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, peftkit {v['peftkit']}; "
              f"device {res['device']}.", ""]
    if res.get("methods"):
        c = res["classifier"]
        lines += [f"## Every method, bfloat16: BERT classifier (hidden {c['hidden_size']}, {c['num_hidden_layers']} "
                  f"layers), batch {c['batch']} × {c['seq']}, median of {res['method_steps']} steps after one warm-up",
                  "", "| method | autocast bf16 | step | peak | bf16 weights | step | peak |",
                  "|---|---|---:|---:|---|---:|---:|"]
        by = {(r["method"], r["setting"]): r for r in res["methods"]}
        for name in dict.fromkeys(r["method"] for r in res["methods"]):
            cells = []
            for s in SETTINGS:
                r = by.get((name, s))
                if r is None:
                    cells += ["", "", ""]
                elif r["ok"]:
                    peak = "" if r.get("step_peak_mib") is None else f"{r['step_peak_mib']:,.0f} MiB"
                    cells += ["pass", f"{r['step_s'] * 1e3:,.1f} ms", peak]
                else:
                    cells += [f"**fail**: {r['error'].replace('|', '/')}", "", ""]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        n_ok = sum(r["ok"] for r in res["methods"])
        lines += ["", f"{n_ok} of {len(res['methods'])} method × setting runs passed.", ""]
    if res.get("lora_vs_peft"):
        lines += ["## LoRA vs PEFT", "",
                  "| model | precision | step, peftkit ÷ PEFT | step, peftkit ÷ no adapter "
                  "| peak memory, peftkit ÷ PEFT | unmerged inference ÷ base (peftkit / PEFT) "
                  "| unmerged decoding ÷ base (peftkit / PEFT) |",
                  "|---|---|---:|---:|---:|---:|---:|"]

        def r3(x: Any) -> str:
            return "" if x is None else f"{x:.3f}"

        for r in res["lora_vs_peft"].values():
            pair = [f"{r3(r.get(f'{k}_ratio_peftkit'))} / {r3(r.get(f'{k}_ratio_peft'))}"
                    if f"{k}_ratio_peftkit" in r else "" for k in ("inference", "decode")]
            lines.append(f"| {r['setup']['model']} | {r['setup']['precision']} | {r3(r['train_ratio'])} | "
                         f"{r3(r['train_ratio_vs_floor'])} | {r3(r.get('step_peak_ratio'))} | {pair[0]} | {pair[1]} |")
        lines += ["", "Each configuration's full table: the `<config>.md` files next to this one.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, one round: a dry run, not a measurement")
    ap.add_argument("--methods", help="comma list of methods for part 1 (default: every registered method)")
    ap.add_argument("--only", choices=("methods", "lora_vs_peft"), help="run one part")
    ap.add_argument("--steps", type=int, help="timed steps per method and setting (default 10; 1 with --tiny)")
    ap.add_argument("--rounds", type=int, help="LoRA vs PEFT interleaved rounds (default 21; 1 with --tiny)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (ignored on CUDA)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("accelerator.py: no CUDA device (torch.cuda.is_available() is False) — run it on a GPU machine, or "
              "`--device cpu --tiny` for a dry run", file=sys.stderr)
        return 2
    import peftkit

    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    try:
        names = method_names(args.methods)
    except ValueError as e:
        ap.error(str(e))
    steps = args.steps or (1 if args.tiny else 10)
    base = lvp.Setup(device=args.device, tiny=args.tiny, threads=args.threads if args.device == "cpu" else None,
                     rounds=args.rounds or (1 if args.tiny else 21), steps=1 if args.tiny else 2)
    res: dict[str, Any] = {"device": args.device, "tiny": args.tiny, "versions": lvp.versions(base),
                           "peftkit": peftkit.__version__}
    out = Path(args.out)
    stem = "accelerator" + ("-cpu" if args.device == "cpu" else "") + ("-tiny" if args.tiny else "")

    if args.only in (None, "methods"):
        c = CLASSIFIER["tiny" if args.tiny else "full"]
        res["classifier"], res["method_steps"], res["methods"] = c, steps, []
        for name in names:
            for setting in SETTINGS:
                row = method_step(name, setting, args.device, args.tiny, steps)
                res["methods"].append(row)
                print(f"{name:16s} {setting:13s} " + (f"pass {row['step_s'] * 1e3:8.1f} ms" if row["ok"]
                                                      else f"FAIL {row['error']}"), flush=True)
    if args.only in (None, "lora_vs_peft"):
        res["lora_vs_peft"] = {}
        for model in ("minilm", "smollm2"):
            for precision in ("fp32", "bf16"):
                setup = dataclasses.replace(base, model=model, precision=precision)
                r = lvp.run(setup, measure_memory=args.device == "cuda")
                lvp.write(r, out)
                res["lora_vs_peft"][setup.name] = r
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    print(f"wrote {out / stem}.json and .md")
    failed = [f"{r['method']} ({r['setting']})" for r in res.get("methods", []) if not r["ok"]]
    if failed:
        print(f"accelerator.py: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
