"""MkDocs hook: the method pages come from the registry at build time, so they cannot drift from the code.

``methods/index.md`` is the method table (``peftkit methods --markdown``) and ``methods/<name>.md`` one page per
registered method: its family, paper, formula (the method file's docstring), config fields with defaults,
hosts, procedure and Hugging Face PEFT type. Benchmark plots under ``benchmarks/results`` are published beside
the pages that show them."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))


def _method_page(info) -> str:
    module = sys.modules[info.adapter.__module__]
    doc = inspect.cleandoc(module.__doc__ or "")
    fields = [f for f in dataclasses.fields(info.config) if not f.name.startswith("_")]
    rows = []
    for f in fields:
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        rows.append(f"| `{f.name}` | `{default}` |")
    family = getattr(info, "family", "")
    lines = [
        f"# `{info.name}`", "",
        f"**Paper:** {info.paper}", "",
        f"**What it does:** {info.description}", "",
        *([f"**Family:** {family}", ""] if family else []),
        f"**Trainable parameters per layer:** {info.params}", "",
        f"**Mergeable:** {'yes' if info.mergeable else 'no'} · "
        f"**hosts:** {', '.join(info.hosts) if not info.model_level else 'the whole model (model-level)'} · "
        f"**procedure:** {info.procedure.__name__ if info.procedure else '—'} · "
        f"**Hugging Face PEFT type:** {info.hf_peft_type or '— (peftkit format)'} · "
        f"**default learning-rate factor:** {info.lr_scale:g}", "",
        "## The method (from its file's docstring)", "", "```text", doc, "```", "",
        f"## Configuration: `{info.config.__name__}`", "", "| field | default |", "|---|---|", *rows, "",
    ]
    return "\n".join(lines)


def on_files(files, config):
    from peftkit.core.registry import all_methods

    methods = all_methods()
    rows = ["# Methods", "", "Generated from the registry (`peftkit methods --markdown`); one page per method.", "",
            "| method | paper | what it does | trainable params per layer | mergeable |", "|---|---|---|---|---|"]
    for m in methods:
        rows.append(f"| [`{m.name}`]({m.name}.md) | {m.paper} | {m.description} | {m.params} | "
                    f"{'yes' if m.mergeable else 'no'} |")
    files.append(File.generated(config, "methods/index.md", content="\n".join(rows) + "\n"))
    for m in methods:
        files.append(File.generated(config, f"methods/{m.name}.md", content=_method_page(m)))
    for png in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        rel = png.relative_to(ROOT).as_posix()
        files.append(File.generated(config, rel, abs_src_path=str(png)))
    return files
