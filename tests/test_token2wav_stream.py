"""Streaming token2wav properties on the tiny golden decoder, token counts 1..80."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from opens2s_edge.runtime.token2wav_stream import StreamConfig, Token2WavError, Token2WavStream, time_grid
from opens2s_edge.training.token2wav.decoder import load_decoder

MAX_TOKENS = 80


@pytest.fixture(scope="module")
def decoder(golden_decoder: Path):  # noqa: ANN201
    return load_decoder(golden_decoder)


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 16384, MAX_TOKENS)


def _fork(stream: Token2WavStream) -> Token2WavStream:
    # An independent copy of the session state; the (stateless) backend is shared, not copied.
    return copy.deepcopy(stream, memo={id(stream.backend): stream.backend})


@pytest.fixture(scope="module")
def streamed(decoder, tokens) -> dict[int, list[np.ndarray]]:  # noqa: ANN001
    """For every N in 1..80: the PCM pieces of a stream fed N tokens one at a time, then finalized.

    One session is fed all 80 tokens; after each push a fork is finalized. That is exactly what a session fed
    only N tokens returns (the session is deterministic), at a fraction of the cost.
    """
    stream = decoder.stream(random_source=False)
    pieces: list[np.ndarray] = []
    out = {}
    for n in range(1, MAX_TOKENS + 1):
        pieces.append(stream.push(tokens[n - 1 : n]))
        fork = _fork(stream)
        out[n] = [p for p in [*pieces, fork.finalize()] if len(p)]
        out[n].append(np.asarray(fork.estimator_frames))  # last entry: estimator frames per chunk
    return out


def test_streamed_length_equals_non_streamed_length(decoder, tokens, streamed) -> None:  # noqa: ANN001
    for n in range(1, MAX_TOKENS + 1):
        assert sum(len(p) for p in streamed[n][:-1]) == decoder.spec.frames(n) * 256, n
    # The non-streamed length is frames(n) * 256: checked directly at the edges of the chunk schedule.
    for n in (1, 9, 10, 11, 30, 50, MAX_TOKENS):
        assert len(decoder.tokens_to_wav(tokens[:n], random_source=False)) == decoder.spec.frames(n) * 256


def test_short_streams_equal_the_non_streamed_output(decoder, tokens, streamed) -> None:  # noqa: ANN001
    # Below the first chunk the stream runs exactly the non-streamed computation.
    for n in (1, 5, 9):
        np.testing.assert_array_equal(
            np.concatenate(streamed[n][:-1]), decoder.tokens_to_wav(tokens[:n], random_source=False)
        )


def test_chunk_boundaries_are_continuous(streamed) -> None:  # noqa: ANN001
    for n in range(1, MAX_TOKENS + 1):
        pieces = streamed[n][:-1]
        wav = np.concatenate(pieces)
        jumps = np.abs(np.diff(wav))
        boundaries = np.cumsum([len(p) for p in pieces])[:-1] - 1  # jump index between two pieces
        inside = np.delete(jumps, boundaries)
        if len(boundaries):
            assert jumps[boundaries].max() <= inside.max(), n


def test_first_audio_after_one_block(decoder, tokens) -> None:  # noqa: ANN001
    stream = decoder.stream(random_source=False)
    got = [len(stream.push(tokens[i : i + 1])) for i in range(12)]
    assert got[:9] == [0] * 9 and got[9] > 0  # audio as soon as the 10th token arrives


def test_estimator_frames_bounded_by_the_window(decoder, tokens, streamed) -> None:  # noqa: ANN001
    spec = decoder.spec
    config = StreamConfig(first_chunk=spec.block_size)
    bound = spec.frames(config.max_window_tokens(spec))
    for n in range(1, MAX_TOKENS + 1):
        assert streamed[n][-1].max() <= bound, n
    # However long the response: 400 tokens, the cost per chunk stays put.
    long_tokens = np.resize(tokens, 400)
    stream = decoder.stream(random_source=False)
    total = sum(len(stream.push(long_tokens[i : i + 20])) for i in range(0, 400, 20)) + len(stream.finalize())
    assert total == spec.frames(400) * 256
    frames = stream.estimator_frames
    assert max(frames) <= bound and len(set(frames[2:-1])) == 1


def test_random_source_stream_and_chunk_sizes(decoder, tokens) -> None:  # noqa: ANN001
    for config in (StreamConfig(first_chunk=10, chunk=10), StreamConfig(first_chunk=5, chunk=13, window=7,
                                                                         mel_overlap=6, vocoder_lookahead=2)):
        stream = decoder.stream(config, seed=3)
        wav = np.concatenate([stream.push(tokens[:37]), stream.finalize()])
        assert len(wav) == decoder.spec.frames(37) * 256 and np.isfinite(wav).all()
    a, b = decoder.stream(seed=1), decoder.stream(seed=1)
    np.testing.assert_array_equal(
        np.concatenate([a.push(tokens[:25]), a.finalize()]), np.concatenate([b.push(tokens[:25]), b.finalize()])
    )


def test_stream_misuse_is_named(decoder) -> None:  # noqa: ANN001
    stream = decoder.stream()
    assert len(stream.finalize()) == 0  # nothing pushed: nothing to say
    with pytest.raises(Token2WavError, match="after finalize"):
        stream.push([1])
    with pytest.raises(Token2WavError, match="mel_overlap"):
        decoder.stream(StreamConfig(first_chunk=1))
    with pytest.raises(Token2WavError, match="window"):
        decoder.stream(StreamConfig(window=1))


def test_time_grid_is_the_cosine_schedule() -> None:
    t = time_grid(10, "cosine")
    np.testing.assert_allclose(t, 1 - np.cos(np.linspace(0, 1, 11) * np.pi / 2), atol=1e-7)
    assert t[0] == 0 and t[-1] == pytest.approx(1.0)
