"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread, restoring the count afterwards.

    Their problems are small: torch's thread pool costs more than it saves on them, and on
    shared cores it oversubscribes (measured: several times slower under load). Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
