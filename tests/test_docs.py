"""The documentation site is tested like code.

Always (no docs toolchain needed, a few seconds):

* the API reference has an entry for every public name, and nothing else;
* every public name is used by a code block that the docs build executes;
* the tutorial is the guide's seven ideas, in order, each with a formula, an API link and a
  figure drawn at build time; every page is in the navigation;
* the "coming from neural-tangents" table names only ntkit objects that exist.

On a built site (``NTKIT_DOCS_SITE=site python -m pytest tests/test_docs.py``; ``.ci/run``
builds it with ``mkdocs build --strict`` and runs this): every internal link, anchor and
image of every page resolves, every figure is an embedded image, and no executed block
left an error in a page.
"""

from __future__ import annotations

import html.parser
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import ntkit as nk

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_build"))

from ntkit_docs import api_entries, executed_blocks, executed_names, public_api

TUTORIAL = ["01-parameterization", "02-ntk-limit", "03-fixed-kernel",
            "04-kernel-gradient-descent", "05-bayesian-view", "06-spectrum",
            "07-beyond-infinite-width"]


def test_api_reference_has_an_entry_for_every_public_name():
    public, documented = public_api(), api_entries(DOCS / "reference")
    assert "ntkit.empirical_ntk" in public and "ntkit.predict.ensemble" in public
    assert not public - documented, f"no '::: name' entry in docs/reference/ for " \
                                    f"{sorted(public - documented)}"
    assert not documented - public, f"reference entries for names ntkit does not export: " \
                                    f"{sorted(documented - public)}"


def test_every_public_name_is_used_by_an_executed_example():
    missing = public_api() - executed_names(DOCS)
    assert not missing, f"no executed docs example uses {sorted(missing)}"


def test_executed_names_detects_use_and_absence(tmp_path):
    # the checker itself: a name counts only inside a block the build executes
    (tmp_path / "a.md").write_text(
        '```python exec="on"\nimport ntkit as nk\nnk.empirical_ntk(m, x)\n'
        'from ntkit.spectral import eigen\n```\n\n```python\nnk.train(m, x, y)\n```\n')
    used = executed_names(tmp_path)
    assert {"ntkit.empirical_ntk", "ntkit.spectral.eigen"} <= used
    assert "ntkit.train" not in used


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):]
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, re.MULTILINE)


def test_every_page_is_in_the_navigation_and_every_nav_entry_exists():
    nav = _nav_pages()
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
                   if "_build" not in p.parts)
    assert sorted(nav) == pages


def test_tutorial_is_the_guide_in_order_with_formulas_api_links_and_built_figures():
    nav = [p for p in _nav_pages() if p.startswith("tutorial/") and p != "tutorial/index.md"]
    assert nav == [f"tutorial/{name}.md" for name in TUTORIAL]
    blocks = executed_blocks(DOCS)
    for name in TUTORIAL:
        page = f"tutorial/{name}.md"
        text = (DOCS / page).read_text()
        assert "\\[" in text, f"{page} states no display formula"
        assert "*Guide:" in text, f"{page} does not say which part of the guide it follows"
        assert "../reference/" in text, f"{page} links no API reference"
        assert any("figure_html(" in b for b in blocks[page]), f"{page} draws no figure"
        assert not re.search(r"!\[[^\]]*\]\([^)]*\.(png|svg|jpe?g)\)", text), \
            f"{page} pastes an image instead of drawing it"


def test_neural_tangents_table_names_exist():
    text = (DOCS / "from-neural-tangents.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) >= 15
    for required in ("stax.serial", "kernel_fn", "empirical_ntk_fn",
                     "predict.gradient_descent_mse_ensemble", "nt.batch"):
        assert any(required in row.split("|")[1] for row in rows), required
    for row in rows:
        ours = row.split("|")[2]
        for dotted in re.findall(r"`nk\.([\w.]+)\(", ours):
            obj = nk
            for part in dotted.split("."):
                obj = getattr(obj, part)
            assert callable(obj), dotted


# ------------------------------------------------------------------ on a built site
SITE = os.environ.get("NTKIT_DOCS_SITE")
needs_site = pytest.mark.skipif(not SITE, reason="set NTKIT_DOCS_SITE to a built site "
                                                 "(mkdocs build --strict -d DIR)")


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("img", "script") and attrs.get("src"):
            (self.images if tag == "img" else self.links).append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.links.append(attrs["href"])


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(errors="replace"))
    return page


def _target(page: Path, url: str, site: Path) -> tuple[Path, str] | None:
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or url.startswith(("mailto:", "data:", "javascript:")):
        return None
    path = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
    if path.is_dir() or url.endswith("/"):
        path = path / "index.html"
    return path, parts.fragment


@needs_site
def test_built_site_internal_links_anchors_and_images_resolve():
    site = Path(SITE).resolve()
    # 404.html is served at any depth, so it links absolutely (site root): not checked
    pages = sorted(p for p in site.rglob("*.html") if p.name != "404.html")
    assert len(pages) >= 25, pages
    parsed = {p: _parse(p) for p in pages}
    broken = []
    for page, content in parsed.items():
        for url in content.links + content.images:
            target = _target(page, url, site)
            if target is None:
                continue
            path, fragment = target
            if not path.exists():
                broken.append(f"{page.relative_to(site)}: {url} (no {path})")
            elif fragment and path.suffix == ".html":
                ids = (parsed.get(path) or _parse(path)).ids
                if fragment not in ids:
                    broken.append(f"{page.relative_to(site)}: {url} (no #{fragment})")
    assert not broken, "\n".join(broken)


@needs_site
def test_built_site_figures_are_embedded_and_no_block_failed():
    site = Path(SITE).resolve()
    for name in TUTORIAL:
        page = site / "tutorial" / name / "index.html"
        content = _parse(page)
        figures = [src for src in content.images if src.startswith("data:image/")]
        assert figures, f"{page} has no figure"
        assert all(len(src) > 1000 for src in figures), page
    for page in site.rglob("*.html"):
        text = page.read_text(errors="replace")
        assert "Traceback (most recent call last)" not in text, page
    for page in ("reference/kernels/index.html", "reference/predict/index.html"):
        text = (site / page).read_text()
        assert 'id="ntkit.empirical_ntk"' in text or 'id="ntkit.predict.ensemble"' in text
