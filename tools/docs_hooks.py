"""mkdocs hooks (``hooks:`` in mkdocs.yml): the pages generated from the code when the site is built.

- ``reference/cli.md`` and ``reference/options.md``: the Typer app and its option families (:mod:`docs_cli`);
- ``reference/errors.md``: every error line in the source (:mod:`docs_errors`);
- ``benchmarks/index.md`` and one page (+ plot) per ``docs/bench_*.json`` (:mod:`docs_bench`), added to the nav
  section "Benchmarks".

mkdocs imports this file with its folder on ``sys.path``, so the sibling modules are imported here, at load time.
"""

from __future__ import annotations

from pathlib import Path

import docs_bench
import docs_cli
import docs_errors
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
_pages: list = []


def on_config(config, **kwargs):
    """Render the benchmark pages once and list them in the nav under "Benchmarks"."""
    _pages[:] = [docs_bench.render(ROOT, p) for p in docs_bench.bench_files(Path(config["docs_dir"]))]
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and isinstance(entry.get("Benchmarks"), list):
            entry["Benchmarks"] += [{p.title: p.uri} for p in _pages]
    return config


def on_files(files, config, **kwargs):
    generated = {
        "reference/cli.md": docs_cli.cli_page(),
        "reference/options.md": docs_cli.options_page(),
        "reference/errors.md": docs_errors.page(ROOT),
        "benchmarks/index.md": docs_bench.index_page(_pages),
    }
    for page in _pages:
        generated[page.uri] = page.markdown
        for name, data in page.images.items():
            files.append(File.generated(config, f"benchmarks/{name}", content=data))
    for uri, text in generated.items():
        files.append(File.generated(config, uri, content=text))
    return files
