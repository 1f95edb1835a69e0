"""The shared numpy sampler: each option checked against its definition on known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from opens2s_edge.runtime.sampling import Sampler, SamplingConfig


def _draws(sampler: Sampler, logits: np.ndarray, n: int) -> np.ndarray:
    return np.bincount([sampler(logits) for _ in range(n)], minlength=logits.shape[0])


def test_greedy_is_argmax_and_restriction_applies() -> None:
    logits = np.array([0.0, 5.0, 1.0, 4.0, 3.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert Sampler(SamplingConfig(greedy=True), rng)(logits) == 1
    assert Sampler(SamplingConfig(temperature=0.0), rng)(logits) == 1
    # Allowed = [3, 5) plus id 0: the best allowed id is 3.
    assert Sampler(SamplingConfig(greedy=True), rng, (3, 5), (0,))(logits) == 3


def test_temperature_sampling_follows_softmax() -> None:
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    counts = _draws(Sampler(SamplingConfig(temperature=1.0), np.random.default_rng(1)), logits, 20000)
    expected = np.array([0.1, 0.2, 0.3, 0.4]) * 20000
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001


def test_top_k_and_top_p_support() -> None:
    logits = np.log(np.array([0.05, 0.15, 0.5, 0.3]))
    top_k = _draws(Sampler(SamplingConfig(top_k=2), np.random.default_rng(2)), logits, 4000)
    assert top_k[0] == 0 and top_k[1] == 0 and top_k[2] > top_k[3] > 0
    # top_p 0.75: sorted 0.5, 0.3 reach 0.8 >= 0.75, so ids 2 and 3 survive, renormalized to 5:3.
    top_p = _draws(Sampler(SamplingConfig(top_p=0.75), np.random.default_rng(3)), logits, 8000)
    assert top_p[0] == 0 and top_p[1] == 0
    assert abs(top_p[2] / top_p.sum() - 0.625) < 0.03


def test_restricted_sampling_never_leaves_the_allowed_set() -> None:
    logits = np.random.default_rng(4).normal(size=50).astype(np.float32) * 3
    sampler = Sampler(SamplingConfig(temperature=1.5), np.random.default_rng(5), (10, 20), (49,))
    picks = {sampler(logits) for _ in range(2000)}
    assert picks <= set(range(10, 20)) | {49} and len(picks) > 5


def test_seed_reproduces_and_bad_config_is_named() -> None:
    logits = np.random.default_rng(6).normal(size=100)
    a = [Sampler(SamplingConfig(), np.random.default_rng(7))(logits) for _ in range(1)]
    b = [Sampler(SamplingConfig(), np.random.default_rng(7))(logits) for _ in range(1)]
    assert a == b
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
