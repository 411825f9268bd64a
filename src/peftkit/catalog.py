"""The method catalogue: every registered method and head grouped by family (the PEFT survey's taxonomy), as the
``peftkit methods`` table (fits 120 columns), as JSON, as the README's Markdown table, and one method in full
(``peftkit methods NAME``: paper, formula from its module docstring, config fields with defaults and meaning,
hosts, procedure, PEFT type, learning-rate factor)."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from typing import Any

from .core.errors import PeftkitError, did_you_mean
from .core.registry import FAMILIES, MethodInfo, all_methods
from .heads import HeadInfo, all_heads

WIDTH = 120
#: a math line of a method's docstring: indented, a short label, a colon, then the formula ("    forward:  y = ...")
_LABEL = re.compile(r"^(\s{2,})([A-Za-zΔ][\w ^'()-]{0,18}):\s")


def rows() -> list[dict[str, Any]]:
    """One row per method and head, in family order (then by name)."""
    out = [{"name": m.name, "family": m.family, "paper": m.paper, "description": m.description, "params": m.params,
            "mergeable": m.mergeable, "procedure": m.procedure.__name__ if m.procedure else None,
            "lr_scale": m.lr_scale, "head_lr_scale": m.head_lr_scale, "hf_peft_type": m.hf_peft_type,
            "hosts": list(m.hosts), "kind": "method"} for m in all_methods()]
    out += [{"name": h.name, "family": h.family, "paper": h.paper, "description": h.description,
             "params": h.params, "mergeable": False, "procedure": None, "lr_scale": None, "head_lr_scale": None,
             "hf_peft_type": None, "hosts": [], "kind": "head", "entry": h.entry} for h in all_heads()]
    order = list(FAMILIES)
    return sorted(out, key=lambda r: (order.index(r["family"]), r["name"]))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(items: list[dict[str, Any]] | None = None, width: int = WIDTH) -> str:
    """The grouped text table: a family heading, then one line per method (name, mergeable, what it does)."""
    items = rows() if items is None else items
    name_w = max(len(r["name"]) for r in items)
    lines = [f"{'METHOD'.ljust(name_w)}  MERGE  WHAT IT DOES (peftkit methods NAME: formula, fields, paper)"]
    for fam, title in FAMILIES.items():
        mine = [r for r in items if r["family"] == fam]
        if not mine:
            continue
        lines += ["", _clip(title, width)]
        for r in mine:
            merge = "—" if r["kind"] == "head" else ("yes" if r["mergeable"] else "no")
            what = r["description"] + (f" [procedure: {r['procedure']}]" if r["procedure"] else "")
            lines.append(_clip(f"  {r['name'].ljust(name_w)}  {merge.ljust(5)}{what}", width))
    return "\n".join(lines)


def markdown(items: list[dict[str, Any]] | None = None) -> str:
    """The README's method table: one row per method and head, grouped by family."""
    items = rows() if items is None else items
    out = ["| family | method | paper | what it does | trainable params per layer | mergeable |",
           "|---|---|---|---|---|---|"]
    for r in items:
        proc = f" (procedure: `{r['procedure']}`)" if r["procedure"] else ""
        merge = "—" if r["kind"] == "head" else ("yes" if r["mergeable"] else "no")
        out.append(f"| {r['family']} | `{r['name']}` | {r['paper']} | {r['description']}{proc} | {r['params']} | "
                   f"{merge} |")
    return "\n".join(out)


#: AdapterHub's (the ``adapters`` library's) name for each method peftkit shares with it
ADAPTERHUB = {
    "series_adapter": "Bottleneck (Houlsby, Pfeiffer)", "parallel_adapter": "Parallel bottleneck", "lora": "LoRA",
    "ia3": "(IA)³", "prefix_tuning": "Prefix tuning", "prompt_tuning": "Prompt tuning", "vera": "VeRA",
    "loreft": "LoReFT", "noreft": "NoReFT", "direft": "DiReFT",
    "compacter": "Compacter / Compacter++", "unipelt": "UniPELT", "mam": "MAM",
}
#: what the other two libraries have and peftkit does not (yet): name -> (Hugging Face PEFT type, AdapterHub name)
NOT_YET = {
    "HRA": ("HRA", None),
    "C3A": ("C3A", None), "Bone / MiSS": ("MISS", None), "X-LoRA": ("XLORA", None), "Poly": ("POLY", None),
    "CPT": ("CPT", None), "P-tuning (prompt encoder)": ("P_TUNING", None), "SHiRA": ("SHIRA", None),
}


def comparison(items: list[dict[str, Any]] | None = None) -> str:
    """The README's feature table: what peftkit, Hugging Face PEFT and AdapterHub each have, row by row — the peftkit
    and PEFT columns read from the registry (a PEFT type = files read and written in PEFT's format)."""
    items = [r for r in (rows() if items is None else items) if r["kind"] == "method"]
    out = ["| method | family | peftkit | Hugging Face PEFT | AdapterHub |", "|---|---|---|---|---|"]
    for r in items:
        peft = f"yes (`{r['hf_peft_type']}`, files both ways)" if r["hf_peft_type"] else "—"
        out.append(f"| `{r['name']}` | {r['family']} | yes | {peft} | {ADAPTERHUB.get(r['name'], '—')} |")
    for name, (peft, hub) in NOT_YET.items():
        out.append(f"| {name} | — | not yet | {f'yes (`{peft}`)' if peft else '—'} | {hub or '—'} |")
    out.append("| composition blocks (Stack, Parallel, Fuse, Split, BatchSplit, Average) | — | yes | — | yes |")
    out.append("| weight-space merging (cat, SVD, linear, TIES, DARE, magnitude) | — | yes | yes | linear |")
    return "\n".join(out)


# -- one method in full ---------------------------------------------------------------------------------------------
def formula(obj: Any) -> list[str]:
    """The math lines of a method's module docstring (``forward:`` / ``init:`` / ``merge:`` … and their
    continuation lines), else its first paragraph."""
    doc = sys.modules[obj.__module__].__doc__ or ""
    lines = doc.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            indent = len(m.group(1))
            out.append(line.strip())
            for cont in lines[i + 1:]:
                if not cont.strip() or len(cont) - len(cont.lstrip()) <= indent or _LABEL.match(cont):
                    break
                out.append("    " + cont.strip())
    if out:
        return out
    first = doc.strip().split("\n\n")[0]
    return [" ".join(first.split())]


#: what the fields every config shares mean, where no docstring says it in a clause of its own
COMMON_FIELDS = {
    "dropout": "dropout on the adapter's input (activation path); 0: none",
    "target_modules": "modules to adapt: names / suffixes, a full-match regex, or all-linear / all-norm",
    "layers_pattern": "the module list (layers, h, blocks, ...) whose index layers_to_transform counts",
    "task_type": "Hugging Face PEFT's task type (SEQ_CLS, CAUSAL_LM, ...); a classification task adds the model's head "
                 "to modules_to_save",
}


def field_meaning(cls: type, name: str) -> str:
    """What the config class docstrings (own, then inherited) say about field ``name``: the clause that follows
    ````name````, up to the end of its sentence or the next ``;``."""
    if name in COMMON_FIELDS:
        return COMMON_FIELDS[name]
    for klass in cls.__mro__:
        doc = " ".join((klass.__dict__.get("__doc__") or "").split())
        m = re.search(rf"``{re.escape(name)}``(.+?)(?:;\s|\.\s+(?=[A-Z`])|\.$|$)", doc)
        if m:
            text = m.group(1).strip().lstrip(":").strip().replace("``", "")
            return text[0].lower() + text[1:] if text[:1].isupper() and not text[1:2].isupper() else text
    return ""


def _fields(cls: type) -> list[tuple[str, str, str]]:
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        out.append((f.name, default, field_meaning(cls, f.name)))
    return out


def detail(name: str, width: int = WIDTH) -> str:
    """``peftkit methods NAME``: one method (or head) in full."""
    methods = {m.name: m for m in all_methods()}
    heads = {h.name: h for h in all_heads()}
    if name not in methods and name not in heads:
        known = [*methods, *heads]
        raise PeftkitError(f"unknown method {name!r}{did_you_mean(name, known)}; 'peftkit methods' lists them")
    if name in heads:
        return _head_detail(heads[name], width)
    m: MethodInfo = methods[name]
    wrap = textwrap.TextWrapper(width=width, initial_indent="", subsequent_indent=" " * 13)
    out = [f"{m.name} — {FAMILIES[m.family]}", ""]

    def item(label: str, text: str) -> None:
        out.extend(wrap.wrap(f"{label + ':':<13}{text}") or [f"{label}:"])

    item("paper", m.paper)
    item("what", m.description)
    out.append("formula:")
    out += [_clip("  " + line, width) for line in formula(m.adapter)]
    item("trainable", m.params + " (per adapted layer)")
    item("hosts", ", ".join(m.hosts) if m.hosts else "— (model-level: adapts the model's inputs)")
    item("mergeable", "yes" if m.mergeable else "no")
    item("procedure", m.procedure.__name__ if m.procedure else "—")
    item("PEFT type", m.hf_peft_type or "— (peftkit format only)")
    lr = f"× {m.lr_scale:g} the task's default learning rate"
    if m.head_lr_scale is not None:
        lr += f"; task head × {m.head_lr_scale:g}"
    item("lr factor", lr)
    out.append(f"config ({m.config.__name__}; set with --opt KEY=VALUE):")
    fields = _fields(m.config)
    key_w = max(len(f"{n} = {d}") for n, d, _ in fields)
    key_w = min(key_w, 40)
    for n, d, meaning in fields:
        key = f"{n} = {d}"
        line = f"  {key.ljust(key_w)}  {meaning}" if len(key) <= key_w else f"  {key}  {meaning}"
        out.append(_clip(line.rstrip(), width))
    return "\n".join(out)


def _head_detail(h: HeadInfo, width: int) -> str:
    out = [f"{h.name} — {FAMILIES[h.family]}", ""]
    wrap = textwrap.TextWrapper(width=width, subsequent_indent=" " * 13)
    for label, text in (("paper", h.paper), ("what", h.description), ("trainable", h.params),
                        ("use", f"from {h.entry} (a module over a frozen model; not adapted with peftkit.adapt)")):
        out.extend(wrap.wrap(f"{label + ':':<13}{text}"))
    return "\n".join(out)
