"""Helpers shared by the reinforcement-learning tests."""

import importlib.util

import pytest

HAS_MINATAR = importlib.util.find_spec("minatar") is not None
HAS_ALE = all(importlib.util.find_spec(m) is not None for m in ("gymnasium", "ale_py", "cv2"))

needs_minatar = pytest.mark.skipif(not HAS_MINATAR, reason="minatar is not installed (pip install lowbit[rl])")
needs_ale = pytest.mark.skipif(not HAS_ALE, reason="gymnasium, ale-py or opencv is not installed "
                                                   "(pip install lowbit[rl])")
