"""Shared test settings."""

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (same seed, same result, in CI too);
# HYPOTHESIS_PROFILE=explore draws fresh ones, to hunt for new counterexamples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: the test models are tiny, and extra threads only contend (2-core CI)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
