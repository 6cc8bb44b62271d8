from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REAL_KERNELS


@pytest.fixture
def real_kernels() -> Path:
    if not (REAL_KERNELS / "test1_B30.mha").exists():
        pytest.skip("../shared/data/real-kernels is not beside this checkout")
    return REAL_KERNELS
