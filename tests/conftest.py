"""Shared fixtures. Golden data lives in ../shared/golden, written by the reference implementation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET once, when it is first imported, and any test module (or torch) may import it while
# pytest collects: without an NVIDIA GPU its interpreter is the only way the kernels run, so it is set before anything.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("OPENS2S_GOLDEN", REPO.parent / "shared" / "golden"))


def _golden(sub: str) -> Path:
    path = GOLDEN / sub
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"golden data missing at {path}: CI must run beside ../shared/golden")
        pytest.skip(f"golden data not found at {path} (set OPENS2S_GOLDEN)")
    return path


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """One intra-op thread: two on a shared 2-core machine spin-wait each other (tiny matmuls 100x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory) -> Path:
    """The embedded default: `init --preset tiny` (checkpoint/ and decoder/)."""
    from opens2s_edge.training.presets import write_preset
    from opens2s_edge.training.token2wav.init import write_random_decoder

    root = tmp_path_factory.mktemp("tiny_default")
    write_preset("tiny", root / "checkpoint")
    write_random_decoder(root / "decoder", "tiny")
    return root


@pytest.fixture(scope="session")
def golden_bundle(golden_root: Path, tmp_path_factory) -> Path:
    from opens2s_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("golden_bundle") / "bundle"
    return export_bundle(golden_root / "opens2s_tiny", golden_root / "glm4voice_decoder_tiny", out,
                         max_context=256, progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_default: Path, tmp_path_factory) -> Path:
    from opens2s_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    return export_bundle(tiny_default / "checkpoint", tiny_default / "decoder", out, max_context=512,
                         progress=lambda _: None)
