"""A griffe extension for the API reference: ntkit's docstrings cross-reference in Sphinx
roles (``:class:`~ntkit.kernels.Kernels```, ``:func:`gradient_descent_mse```), which Markdown
would show verbatim. They are rewritten to inline code (``Kernels``, with a leading ``~``
keeping only the last component, as Sphinx does), before the docstring is parsed."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRolesToCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
