"""Helpers of the documentation build (imported by hooks.py, by executed code blocks and by
tests/test_docs.py). Not part of ntkit.

* :func:`figure_html` embeds a matplotlib figure drawn during the build in the page.
* :func:`public_api`, :func:`api_entries` and :func:`executed_names` say what the API
  reference must cover, what it covers, and which public names the executed examples use.
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import re
from pathlib import Path

# A fenced block that markdown-exec runs: ```python exec="on" ...``` (or exec="1"/"true").
_EXEC_BLOCK = re.compile(r'^(?P<fence>`{3,}|~{3,})python[^\n]*\bexec="(?:on|1|true)"[^\n]*\n'
                         r"(?P<body>.*?)^(?P=fence)[ \t]*$", re.DOTALL | re.MULTILINE)
_API_ENTRY = re.compile(r"^:::[ \t]+(?P<name>[\w.]+)[ \t]*$", re.MULTILINE)


def figure_html(fig, alt: str, caption: str | None = None) -> str:
    """The figure as an ``<img>`` holding its SVG (a data URI), in a ``<figure>``; the
    figure is closed. Print it from a block with ``html="1"``."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue().encode()).decode()
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure class="ntkit-figure"><img alt="{html.escape(alt)}" '
            f'src="data:image/svg+xml;base64,{data}">{cap}</figure>')


def image_html(path, alt: str, caption: str | None = None) -> str:
    """A PNG or SVG file written during the build, embedded like :func:`figure_html`."""
    path = Path(path)
    kind = "svg+xml" if path.suffix == ".svg" else "png"
    data = base64.b64encode(path.read_bytes()).decode()
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure class="ntkit-figure"><img alt="{html.escape(alt)}" '
            f'src="data:image/{kind};base64,{data}">{cap}</figure>')


def public_api() -> set[str]:
    """Every public name: ``ntkit.X`` for X in ``ntkit.__all__`` and, for the submodules it
    exports, ``ntkit.X.Y`` for Y in their ``__all__``."""
    import ntkit

    names = set()
    for name in ntkit.__all__:
        names.add(f"ntkit.{name}")
        obj = getattr(ntkit, name)
        if isinstance(obj, type(ntkit)):
            module = importlib.import_module(f"ntkit.{name}")
            names.update(f"ntkit.{name}.{member}" for member in module.__all__)
    return names


def api_entries(reference_dir: Path) -> set[str]:
    """The names with a ``::: name`` (mkdocstrings) entry in the reference pages."""
    found = set()
    for page in sorted(Path(reference_dir).glob("*.md")):
        found.update(m.group("name") for m in _API_ENTRY.finditer(page.read_text()))
    return found


def executed_blocks(docs_dir: Path) -> dict[str, list[str]]:
    """The source of every block markdown-exec runs, by page (relative path)."""
    blocks = {}
    for page in sorted(Path(docs_dir).rglob("*.md")):
        found = [m.group("body") for m in _EXEC_BLOCK.finditer(page.read_text())]
        if found:
            blocks[str(page.relative_to(docs_dir))] = found
    return blocks


def executed_names(docs_dir: Path) -> set[str]:
    """The public names (as in :func:`public_api`) that some executed block uses: written
    ``nk.X``/``ntkit.X`` for top-level names and ``<module>.Y`` (``predict.ensemble``,
    ``nk.scale.solve``, ...) for submodule members, or imported by name."""
    code = "\n".join(b for blocks in executed_blocks(docs_dir).values() for b in blocks)
    used = set()
    for qualified in public_api():
        parts = qualified.split(".")
        name = parts[-1]
        owner = "(?:nk|ntkit)" if len(parts) == 2 else re.escape(parts[1])
        written = re.search(rf"\b{owner}\.{re.escape(name)}\b", code)
        imported = re.search(rf"^\s*from\s+ntkit(?:\.{re.escape(parts[1])})?\s+import\s+"
                             rf"[^\n]*\b{re.escape(name)}\b", code, re.MULTILINE) if len(parts) == 3 \
            else re.search(rf"^\s*from\s+ntkit\s+import\s+[^\n]*\b{re.escape(name)}\b",
                           code, re.MULTILINE)
        if written or imported:
            used.add(qualified)
    return used
