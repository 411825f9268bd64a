"""MkDocs hook: the method pages come from the registry at build time, so they cannot drift from the code.

``methods/index.md`` is the grouped method table (``peftkit methods --markdown``) and the comparison with Hugging
Face PEFT and AdapterHub; ``methods/<name>.md`` is one page per registered method and head, the text of
``peftkit methods NAME`` (paper, formula, config fields with defaults and meaning, hosts, procedure, PEFT type,
learning-rate factor). Benchmark plots under ``benchmarks/results`` are published beside the pages that show them."""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))


def on_files(files, config):
    from peftkit import catalog

    items = catalog.rows()
    table = catalog.markdown(items)
    for r in items:  # link every name to its page
        table = table.replace(f"| `{r['name']}` |", f"| [`{r['name']}`]({r['name']}.md) |", 1)
    intro = "Generated from the registry: `peftkit methods --markdown`; `peftkit methods NAME` prints a page below."
    index = ["# Methods", "", intro, "", table, "", "## peftkit, Hugging Face PEFT and AdapterHub", "",
             catalog.comparison(items), ""]
    files.append(File.generated(config, "methods/index.md", content="\n".join(index)))
    for r in items:
        page = f"# `{r['name']}` ({r['family']})\n\n```text\n{catalog.detail(r['name'])}\n```\n"
        files.append(File.generated(config, f"methods/{r['name']}.md", content=page))
    for png in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        rel = png.relative_to(ROOT).as_posix()
        files.append(File.generated(config, rel, abs_src_path=str(png)))
    return files
