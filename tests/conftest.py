"""Shared fixtures. Golden data lives in ../shared/golden, written by the reference implementation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("OPENS2S_GOLDEN", REPO.parent / "shared" / "golden"))


def _golden(sub: str) -> Path:
    path = GOLDEN / sub
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"golden data missing at {path}: CI must run beside ../shared/golden")
        pytest.skip(f"golden data not found at {path} (set OPENS2S_GOLDEN)")
    return path


@pytest.fixture(scope="session")
def golden_opens2s() -> Path:
    return _golden("opens2s_tiny")


@pytest.fixture(scope="session")
def golden_decoder() -> Path:
    return _golden("glm4voice_decoder_tiny")


@pytest.fixture(scope="session")
def golden_root() -> Path:
    _golden("opens2s_tiny")
    return GOLDEN
