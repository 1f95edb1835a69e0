"""Speech tokens -> waveform, streaming, torch-free: the one definition shared by the PyTorch and ONNX paths.

The decoder is three networks behind a small backend protocol (`Token2WavBackend`): the flow encoder
(tokens -> mu), the CFM velocity estimator (called with the conditional and unconditional passes as one batch
of 2) and the HiFT vocoder (mel -> waveform, with its sine source's phase and noise passed in). Everything
around them lives here and exists once: the Euler solver with classifier-free guidance (`solve_flow`), the
non-streaming synthesis (`synthesize`) and the streaming session (`Token2WavStream`).

Streaming, per chunk of new tokens [s, e):
- the flow sees a window of past tokens [p, e), p = s - window rounded down to an encoder block, and the
  committed mel of that past as its prompt (`cond`), so its cost does not grow with the response length;
- mel frames are indexed globally (frame(i) = floor(i * 441 / 64) at 12.5 Hz), so chunks tile the same frame
  grid as the non-streamed mel and the streamed audio has exactly the non-streamed length;
- the last `mel_overlap` frames of a chunk are held back and cross-faded with the next chunk's regeneration;
- the vocoder runs on committed mel with `vocoder_context` frames of left context and keeps `vocoder_lookahead`
  frames unsent until more mel arrives; its sine source continues from the phase the previous call reached at
  the same frame (the source cache), and the overlap audio is cross-faded;
- `finalize` flushes whatever is pending, for any token count.
The initial noise of the flow and the vocoder's source noise are drawn per global frame from seeded streams,
so a stream shorter than the first chunk reproduces `synthesize` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Token2WavError(ValueError):
    """Bad input to token2wav (the message names the input and what was expected)."""


class InvalidTokensError(Token2WavError):
    """Speech token ids that are empty, not integers, or outside [0, vocab_size)."""


@dataclass(frozen=True)
class DecoderSpec:
    """The numbers the algorithm needs from a decoder (read from config.yaml or an export manifest)."""

    vocab_size: int = 16384
    token_rate: float = 12.5
    sample_rate: int = 22050
    hop: int = 256  # waveform samples per mel frame
    mel_bins: int = 80
    block_size: int = 10  # flow encoder attention block, in tokens
    spk_dim: int = 192
    n_sines: int = 9  # HiFT sine source channels: fundamental + harmonics
    n_timesteps: int = 10
    cfg_rate: float = 0.7
    t_scheduler: str = "cosine"

    def frames(self, n_tokens: int) -> int:
        """Mel frames for the first n tokens as the reference's flow computes them: int(n / token_rate *
        sample_rate / hop) in float32, which is one frame short of exact arithmetic at some counts (3392 tokens
        at 12.5 Hz); the flow graph and the PyTorch flow do the same float32 arithmetic."""
        f32 = np.float32
        return int(f32(n_tokens) / f32(self.token_rate) * f32(self.sample_rate) / f32(self.hop))


class Token2WavBackend(Protocol):
    """What a runtime (PyTorch, onnxruntime, TensorRT) provides. All arrays are numpy float32 unless noted."""

    spec: DecoderSpec

    def encode(self, tokens: np.ndarray, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens (N,) int64 in [0, vocab), embedding (spk_dim,) -> mu (mel_bins, spec.frames(N)), spks (mel_bins,)."""
        ...

    def estimate(
        self,
        x: np.ndarray,
        mask: np.ndarray,
        mu: np.ndarray,
        t: np.ndarray,
        spks: np.ndarray,
        cond: np.ndarray,
    ) -> np.ndarray:
        """x, mu, cond (2, mel_bins, T); mask (2, 1, T); t (2,); spks (2, mel_bins) -> velocity (2, mel_bins, T)."""
        ...

    def vocode(self, mel: np.ndarray, phase: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """mel (mel_bins, T); phase (n_sines,) source phase in cycles at the first sample; noise (n_sines, T*hop)
        standard normal (zeros = no noise) -> wav (T*hop,), frame_phase (n_sines, T): the source phase in cycles
        at the first sample of each frame (what a later call starting at that frame passes as `phase`)."""
        ...


def validate_tokens(tokens: Iterable[int] | np.ndarray, vocab_size: int, *, allow_empty: bool = False) -> np.ndarray:
    """Speech token ids as an int64 array, or InvalidTokensError naming the first bad id."""
    arr = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        if allow_empty:
            return arr.astype(np.int64)
        raise InvalidTokensError("speech tokens: the list is empty; expected at least one token id")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise InvalidTokensError(f"speech tokens: expected integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise InvalidTokensError(
            f"speech tokens: id {int(arr[i])} at position {i} is out of range; expected 0 <= id < {vocab_size}"
            + (f" ({bad.size} ids out of range)" if bad.size > 1 else "")
        )
    return arr


def time_grid(n_steps: int, scheduler: str) -> np.ndarray:
    """Euler time points t_0 = 0 .. t_n = 1 (float32), cosine-warped as in the reference."""
    t = np.linspace(0.0, 1.0, n_steps + 1, dtype=np.float32)
    if scheduler == "cosine":
        t = (1.0 - np.cos(t * np.float32(0.5 * np.pi))).astype(np.float32)
    return t


Estimate = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def solve_flow(
    estimate: Estimate,
    mu: np.ndarray,
    spks: np.ndarray,
    cond: np.ndarray,
    noise: np.ndarray,
    *,
    n_steps: int = 10,
    cfg_rate: float = 0.7,
    scheduler: str = "cosine",
) -> np.ndarray:
    """Integrate the flow from noise to mel: Euler steps with classifier-free guidance.

    mu, cond, noise (mel_bins, T); spks (mel_bins,). Each step is one estimator call on a batch of 2: the
    conditional pass and the unconditional one (mu, spks and cond zeroed); v = (1 + r) v_cond - r v_uncond.
    """
    t_span = time_grid(n_steps, scheduler)
    x = noise.astype(np.float32, copy=True)
    n_frames = x.shape[-1]
    mask = np.ones((2, 1, n_frames), np.float32)
    mu2 = np.stack([mu, np.zeros_like(mu)]).astype(np.float32)
    spks2 = np.stack([spks, np.zeros_like(spks)]).astype(np.float32)
    cond2 = np.stack([cond, np.zeros_like(cond)]).astype(np.float32)
    r = np.float32(cfg_rate)
    # The reference advances t by dt (t += dt) and takes dt from the grid: same floats as here.
    t = t_span[0]
    dt = t_span[1] - t_span[0]
    for step in range(1, len(t_span)):
        x2 = np.stack([x, x])
        v = estimate(x2, mask, mu2, np.full((2,), t, np.float32), spks2, cond2)
        x = x + dt * ((np.float32(1.0) + r) * v[0] - r * v[1])
        t = np.float32(t + dt)
        if step < len(t_span) - 1:
            dt = t_span[step + 1] - t
    return x.astype(np.float32, copy=False)


class _FrameNoise:
    """Standard-normal noise indexed by global mel frame: frame k always gets the same draws.

    Frames are drawn in order from one seeded generator, so chunking does not change the noise; frames before
    `release()` are forgotten, keeping memory bounded in a long stream.
    """

    def __init__(self, seed: int, stream: int, rows: int, per_frame: int):
        self._rng = np.random.default_rng([seed, stream])
        self._rows = rows
        self._per_frame = per_frame
        self._base = 0
        self._buf = np.zeros((0, rows, per_frame), np.float32)

    def frames(self, start: int, stop: int) -> np.ndarray:
        """(rows, (stop - start) * per_frame) noise for global frames [start, stop)."""
        end = self._base + len(self._buf)
        if stop > end:
            more = self._rng.standard_normal((stop - end, self._rows, self._per_frame)).astype(np.float32)
            self._buf = np.concatenate([self._buf, more])
        if start < self._base:
            raise RuntimeError(f"noise for frame {start} was released (kept from {self._base})")
        block = self._buf[start - self._base : stop - self._base]
        return block.transpose(1, 0, 2).reshape(self._rows, -1)

    def release(self, before: int) -> None:
        drop = min(max(0, before - self._base), len(self._buf))
        self._buf = self._buf[drop:]
        self._base += drop


class _Randomness:
    """The three random inputs of a synthesis: flow noise, source phase, source noise (or none of them)."""

    def __init__(self, spec: DecoderSpec, seed: int, random_source: bool):
        self.flow = _FrameNoise(seed, 0, spec.mel_bins, 1)
        self.random_source = random_source
        self.source = _FrameNoise(seed, 1, spec.n_sines, spec.hop) if random_source else None
        self.spec = spec
        if random_source:
            # As the reference: a uniform random start phase for every harmonic, 0 for the fundamental.
            phase = np.random.default_rng([seed, 2]).uniform(-0.5, 0.5, spec.n_sines).astype(np.float32)
            phase[0] = 0.0
            self.phase0 = np.mod(phase, 1.0).astype(np.float32)
        else:
            self.phase0 = np.zeros(spec.n_sines, np.float32)

    def source_noise(self, start: int, stop: int) -> np.ndarray:
        if self.source is None:
            return np.zeros((self.spec.n_sines, (stop - start) * self.spec.hop), np.float32)
        return self.source.frames(start, stop)

    def release(self, before: int) -> None:
        self.flow.release(before)
        if self.source is not None:
            self.source.release(before)


def _embedding(spec: DecoderSpec, embedding: np.ndarray | None) -> np.ndarray:
    if embedding is None:
        return np.zeros(spec.spk_dim, np.float32)
    emb = np.asarray(embedding, np.float32).reshape(-1)
    if emb.shape != (spec.spk_dim,):
        raise Token2WavError(f"speaker embedding: expected {spec.spk_dim} values, got {emb.size}")
    return emb


# One flow pass attends over all its frames (6.9 per token at 12.5 Hz): the estimator's attention maps take
# about 2 (CFG batch) x 8 (heads) x 4 bytes x frames^2, 3 KB x tokens^2 for the released decoder (measured: 400
# tokens +0.7 GB, 1000 tokens 2.3 GB). A pass is therefore held to SINGLE_PASS_TOKENS (32 s of speech, ~0.5 GB);
# longer inputs are synthesized through the bounded-history stream below in LONG_INPUT_STREAM windows, whose
# passes see at most window + block + chunk tokens, so memory stays flat whatever the length.
SINGLE_PASS_TOKENS = 400


def synthesize_mel(
    backend: Token2WavBackend,
    tokens: np.ndarray,
    *,
    prompt_tokens: np.ndarray | None = None,
    prompt_mel: np.ndarray | None = None,
    embedding: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Non-streaming flow: tokens -> mel (mel_bins, frames(N)), optionally continuing a prompt.

    `noise` overrides the initial noise for the whole window (prompt frames included), (mel_bins, frames).
    """
    spec = backend.spec
    tokens = validate_tokens(tokens, spec.vocab_size)
    prompt = validate_tokens([] if prompt_tokens is None else prompt_tokens, spec.vocab_size, allow_empty=True)
    if len(prompt) + len(tokens) > SINGLE_PASS_TOKENS:
        raise Token2WavError(
            f"speech tokens: one flow pass takes at most {SINGLE_PASS_TOKENS} tokens (its memory grows with the "
            f"square of the length), got {len(prompt) + len(tokens)}; synthesize() and streams take any length")
    n_prompt = 0 if prompt_mel is None else int(np.asarray(prompt_mel).shape[-1])
    mu, spks = backend.encode(np.concatenate([prompt, tokens]), _embedding(spec, embedding))
    total = mu.shape[-1]
    if n_prompt >= total:
        raise Token2WavError(f"prompt mel: {n_prompt} frames leave none for the {len(tokens)} new tokens")
    cond = np.zeros_like(mu)
    if n_prompt:
        prompt_mel = np.asarray(prompt_mel, np.float32)
        if prompt_mel.size != spec.mel_bins * n_prompt:
            raise Token2WavError(f"prompt mel: expected shape ({spec.mel_bins}, frames), got {prompt_mel.shape}")
        cond[:, :n_prompt] = prompt_mel.reshape(spec.mel_bins, n_prompt)
    if noise is None:
        noise = _FrameNoise(seed, 0, spec.mel_bins, 1).frames(0, total)
    elif noise.shape != mu.shape:
        raise Token2WavError(f"initial noise: expected shape {mu.shape}, got {noise.shape}")
    mel = solve_flow(
        backend.estimate, mu, spks, cond, noise,
        n_steps=spec.n_timesteps, cfg_rate=spec.cfg_rate, scheduler=spec.t_scheduler,
    )
    return mel[:, n_prompt:]


def synthesize(
    backend: Token2WavBackend,
    tokens: Iterable[int] | np.ndarray,
    *,
    embedding: np.ndarray | None = None,
    seed: int = 0,
    random_source: bool = True,
) -> np.ndarray:
    """Non-streaming tokens -> waveform (float32, spec.frames(N) * hop samples). Up to SINGLE_PASS_TOKENS in one
    flow pass; longer inputs in bounded windows (LONG_INPUT_STREAM), so memory does not grow with the length."""
    spec = backend.spec
    tokens = validate_tokens(tokens, spec.vocab_size)
    if len(tokens) > SINGLE_PASS_TOKENS:
        stream = Token2WavStream(backend, LONG_INPUT_STREAM, embedding=embedding, seed=seed,
                                 random_source=random_source)
        return np.concatenate([stream.push(tokens), stream.finalize()])
    rand = _Randomness(spec, seed, random_source)
    n_frames = spec.frames(len(tokens))
    mel = synthesize_mel(backend, tokens, embedding=embedding, noise=rand.flow.frames(0, n_frames))
    wav, _ = backend.vocode(mel, rand.phase0, rand.source_noise(0, n_frames))
    return wav.astype(np.float32, copy=False)


@dataclass(frozen=True)
class StreamConfig:
    """Streaming knobs. Token counts are speech tokens (80 ms each); frame counts are mel frames (11.6 ms)."""

    first_chunk: int = 10  # tokens before the first audio: one encoder block
    chunk: int = 20  # tokens per later chunk
    window: int = 20  # past tokens the flow sees as its prompt (bounded history)
    mel_overlap: int = 10  # frames held back per chunk and cross-faded with the next
    vocoder_context: int = 8  # committed frames re-fed to the vocoder as left context
    vocoder_lookahead: int = 4  # frames vocoded but not sent until the vocoder sees what follows

    def check(self, spec: DecoderSpec) -> None:
        problems = []
        if self.first_chunk < 1 or self.chunk < 1:
            problems.append("first_chunk and chunk must be at least 1 token")
        if self.window < 0 or self.mel_overlap < 0 or self.vocoder_context < 0 or self.vocoder_lookahead < 0:
            problems.append("window, mel_overlap, vocoder_context and vocoder_lookahead must be >= 0")
        if min(spec.frames(self.first_chunk), spec.frames(self.chunk)) <= self.mel_overlap + self.vocoder_lookahead:
            problems.append(
                f"a chunk of {min(self.first_chunk, self.chunk)} tokens makes "
                f"{spec.frames(min(self.first_chunk, self.chunk))} frames, not more than "
                f"mel_overlap + vocoder_lookahead = {self.mel_overlap + self.vocoder_lookahead}"
            )
        if self.mel_overlap and spec.frames(self.window) <= self.mel_overlap:
            problems.append(
                f"window of {self.window} tokens ({spec.frames(self.window)} frames) must cover more than "
                f"mel_overlap = {self.mel_overlap} frames"
            )
        if problems:
            raise Token2WavError("stream config: " + "; ".join(problems))

    def max_window_tokens(self, spec: DecoderSpec) -> int:
        """The most tokens one flow call sees: window rounded down to a block, plus the largest chunk."""
        return self.window + spec.block_size - 1 + max(self.first_chunk, self.chunk)


# Windows for inputs longer than one pass: 200-token chunks with 40 tokens (3.2 s) of history.
LONG_INPUT_STREAM = StreamConfig(first_chunk=200, chunk=200, window=40)


def _fade(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raised-cosine fade-out/fade-in pair summing to 1, excluding the endpoints."""
    w = (0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float64) + 1) / (n + 1))).astype(np.float32)
    return 1.0 - w, w


class Token2WavStream:
    """One streaming synthesis: `push` tokens as they arrive, get PCM back; `finalize` flushes the rest."""

    def __init__(
        self,
        backend: Token2WavBackend,
        config: StreamConfig | None = None,
        *,
        embedding: np.ndarray | None = None,
        seed: int = 0,
        random_source: bool = True,
    ):
        self.backend = backend
        self.spec = backend.spec
        self.config = config or StreamConfig(first_chunk=self.spec.block_size)
        self.config.check(self.spec)
        self._embedding = _embedding(self.spec, embedding)
        self._rand = _Randomness(self.spec, seed, random_source)
        self._tokens = np.zeros(0, np.int64)  # tokens from global index _tok_base on
        self._tok_base = 0
        self._n_tokens = 0
        self._consumed = 0  # tokens already turned into mel
        self._mel = np.zeros((self.spec.mel_bins, 0), np.float32)  # committed mel from global frame _mel_base on
        self._mel_base = 0
        self._tail: np.ndarray | None = None  # held-back frames right after the committed ones
        self._sent = 0  # frames whose audio was returned
        self._voc_phase: np.ndarray | None = None  # frame_phase of the last vocoder call ...
        self._voc_start = 0  # ... which started at this frame
        self._audio_tail = np.zeros(0, np.float32)  # last call's audio for frames after _sent
        self._finished = False
        self.estimator_frames: list[int] = []  # frames per estimator call, one entry per chunk

    @property
    def committed_frames(self) -> int:
        return self._mel_base + self._mel.shape[1]

    def push(self, tokens: Iterable[int] | np.ndarray) -> np.ndarray:
        """Add speech tokens; returns the PCM (float32) that became final, possibly empty."""
        if self._finished:
            raise Token2WavError("stream: push() after finalize()")
        new = validate_tokens(tokens, self.spec.vocab_size, allow_empty=True)
        self._tokens = np.concatenate([self._tokens, new])
        self._n_tokens += len(new)
        out = []
        while True:
            need = self.config.first_chunk if self._consumed == 0 else self.config.chunk
            if self._n_tokens - self._consumed < need:
                break
            self._flow_chunk(self._consumed + need, final=False)
            out.append(self._vocode(final=False))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def finalize(self) -> np.ndarray:
        """Flush everything: the last PCM, after which the stream holds spec.frames(N) * hop samples in all."""
        if self._finished:
            return np.zeros(0, np.float32)
        self._finished = True
        if self._n_tokens == 0:
            return np.zeros(0, np.float32)
        if self._consumed < self._n_tokens:
            self._flow_chunk(self._n_tokens, final=True)
        elif self._tail is not None:
            self._commit(self._tail)
            self._tail = None
        return self._vocode(final=True)

    def _window_start(self, start: int) -> int:
        if start == 0:
            return 0
        b = self.spec.block_size
        # Block-aligned so every token sees the same future (the rest of its block) as in the full sequence.
        return max(0, ((start - self.config.window) // b) * b)

    def _commit(self, frames: np.ndarray) -> None:
        self._mel = np.concatenate([self._mel, frames], axis=1)

    def _flow_chunk(self, end: int, final: bool) -> None:
        spec = self.spec
        start = self._consumed
        p = self._window_start(start)
        window_tokens = self._tokens[p - self._tok_base : end - self._tok_base]
        mu, spks = self.backend.encode(window_tokens, self._embedding)
        n_window = mu.shape[1]
        c = self.committed_frames
        n_new = spec.frames(end) - c  # frames from the committed boundary to the end of this chunk
        n_prompt = n_window - n_new
        if not 0 <= n_prompt <= c:
            raise RuntimeError(f"stream: window of {n_window} frames cannot hold {n_new} new frames after {c}")
        cond = np.zeros_like(mu)
        if n_prompt:
            cond[:, :n_prompt] = self._mel[:, c - n_prompt - self._mel_base : c - self._mel_base]
        noise = self._rand.flow.frames(c - n_prompt, c - n_prompt + n_window)
        mel = solve_flow(
            self.backend.estimate, mu, spks, cond, noise,
            n_steps=spec.n_timesteps, cfg_rate=spec.cfg_rate, scheduler=spec.t_scheduler,
        )
        self.estimator_frames.append(n_window)
        new = mel[:, n_prompt:]
        if self._tail is not None:
            n = self._tail.shape[1]
            fade_out, fade_in = _fade(n)
            new = new.copy()
            new[:, :n] = self._tail * fade_out + new[:, :n] * fade_in
        keep = 0 if final else self.config.mel_overlap
        self._commit(new[:, : new.shape[1] - keep])
        self._tail = new[:, new.shape[1] - keep :] if keep else None
        self._consumed = end
        self._prune(end)

    def _prune(self, consumed: int) -> None:
        """Forget tokens, mel and noise that no later chunk or vocoder call can use (bounded memory)."""
        next_p = self._window_start(consumed)
        drop_tok = next_p - self._tok_base
        if drop_tok > 0:
            self._tokens = self._tokens[drop_tok:]
            self._tok_base = next_p
        keep_from = max(0, min(self.spec.frames(next_p) - 2, self._sent - self.config.vocoder_context))
        drop_mel = keep_from - self._mel_base
        if drop_mel > 0:
            self._mel = self._mel[:, drop_mel:]
            self._mel_base = keep_from
        self._rand.release(min(keep_from, self._voc_start))

    def _vocode(self, final: bool) -> np.ndarray:
        spec = self.spec
        end = self.committed_frames
        emit_end = end if final else end - self.config.vocoder_lookahead
        if emit_end <= self._sent:
            return np.zeros(0, np.float32)
        start = max(self._mel_base, self._sent - self.config.vocoder_context, 0)
        if self._voc_phase is None:
            phase = self._rand.phase0
        else:
            phase = self._voc_phase[:, start - self._voc_start]
        mel = self._mel[:, start - self._mel_base : end - self._mel_base]
        wav, frame_phase = self.backend.vocode(mel, phase, self._rand.source_noise(start, end))
        hop = spec.hop
        audio = wav[(self._sent - start) * hop : (emit_end - start) * hop].astype(np.float32, copy=True)
        n = min(len(self._audio_tail), len(audio))
        if n:
            fade_out, fade_in = _fade(n)
            audio[:n] = self._audio_tail[:n] * fade_out + audio[:n] * fade_in
        self._audio_tail = wav[(emit_end - start) * hop :].astype(np.float32, copy=True)
        self._voc_phase = frame_phase
        self._voc_start = start
        self._sent = emit_end
        return audio
