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


@pytest.fixture(autouse=True)
def _seeded_global_rngs(request):
    """Seed torch's and numpy's global generators per test (from its id), so that a test
    drawing unseeded random inputs sees the same inputs on every run and in any order."""
    import zlib

    import numpy as np

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    yield
