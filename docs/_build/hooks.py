"""MkDocs hooks of the ntkit site (``hooks:`` in mkdocs.yml).

* Before anything is rendered, the API reference is checked against the code: every name in
  ``ntkit.__all__`` (and in the ``__all__`` of the public submodules it exports) must have a
  ``::: ntkit...`` entry in ``docs/reference/``. A newly exported name without one fails the
  build (a ``PluginError``), as does an entry for a name that no longer exists.
* Executed code (markdown-exec) runs with one torch thread: the tutorial's problems are
  small, where torch's thread pool costs more than it saves on a shared 2-core machine, and
  one thread makes the printed numbers the same on every machine.
* Three griffe messages about docstring *layout* in ntkit's sources ("Failed to get 'name:
  description' pair": an ``Attributes:`` entry written as prose) are logged as INFO, not
  WARNING, so that --strict fails on what matters here (broken references, missing API
  entries, raising examples) while those docstrings await a fix; the build prints them.
* The time each page takes to render (its executed code included) is logged and written to
  ``site/build-timings.json``; the CI budget is about 30 s a page on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from mkdocs.exceptions import PluginError

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the figure helper, ntkit_docs.py, lives beside this file
    sys.path.insert(0, str(HERE))

from ntkit_docs import api_entries, public_api

log = logging.getLogger("mkdocs.hooks.ntkit")
_started: dict[str, float] = {}
_timings: dict[str, float] = {}


class _DocstringLayoutToInfo(logging.Filter):
    """Turn griffe's "Failed to get 'name: description' pair" warnings into INFO records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "Failed to get 'name: description' pair" \
                in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def on_startup(**kwargs):
    for name in ("mkdocs.plugins.griffe", "griffe"):
        logging.getLogger(name).addFilter(_DocstringLayoutToInfo())


def on_config(config, **kwargs):
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    torch.set_num_threads(1)
    docs_dir = Path(config["docs_dir"])
    documented = api_entries(docs_dir / "reference")
    public = public_api()
    missing = sorted(public - documented)
    stale = sorted(documented - public)
    if missing:
        raise PluginError("API reference: no '::: <name>' entry in docs/reference/ for "
                          + ", ".join(missing))
    if stale:
        raise PluginError("API reference: entries for names that ntkit does not export: "
                          + ", ".join(stale))
    return config


def on_page_markdown(markdown, page, **kwargs):
    _started[page.file.src_uri] = time.perf_counter()
    return markdown


def on_page_content(html, page, **kwargs):
    start = _started.pop(page.file.src_uri, None)
    if start is not None:
        seconds = time.perf_counter() - start
        _timings[page.file.src_uri] = round(seconds, 2)
        if seconds > 1.0:
            log.info("rendered %s in %.1f s (executed code included)", page.file.src_uri,
                     seconds)
    return html


def on_post_build(config, **kwargs):
    path = Path(config["site_dir"]) / "build-timings.json"
    ordered = dict(sorted(_timings.items(), key=lambda kv: -kv[1]))
    path.write_text(json.dumps({"seconds_per_page": ordered,
                                "total_seconds": round(sum(_timings.values()), 1)}, indent=1))
