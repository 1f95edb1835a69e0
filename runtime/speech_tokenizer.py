"""GLM-4-Voice's speech tokenizer without torch: the reference procedure around an exported ONNX graph.

The released tokenizer (THUDM/glm-4-voice-tokenizer) is a `WhisperVQForConditionalGeneration` folder: `config.json`,
`model.safetensors`, `preprocessor_config.json`. Its `speech_tokenizer.utils.extract_speech_token` turns audio into
12.5 Hz units like this, and so does this module:

1. every input is read as float32; another rate is resampled to 16 kHz (windowed-sinc, Hann window, 6 zero crossings,
   roll-off 0.99: the resampler the reference uses) and only the first channel is kept, as the reference does;
2. each input is cut into 30 s segments; the segments of all inputs, in order, are run in batches of 128;
3. in a batch every segment is zero-padded to the longest one, rounded up to the encoder's total stride
   (conv stride 2 x pooling kernel x hop 160 samples), then turned into the Whisper log-mel (`runtime/audio.py`; the
   dynamic-range clamp is per segment, over its padded length);
4. a mel frame is valid when its first sample is inside the segment (the extractor's sample mask taken every hop);
   the valid tokens are those whose subsampled mask (every 2nd frame, then every kernel-th) is set: ceil(L / (2 k))
   of them for L valid frames;
5. the valid tokens of an input's segments are concatenated.

The encoder itself (convolutions, block-causal layers, pooling, nearest-code search) is the graph
`speech_tokenizer.onnx` that `opens2s-edge export-tokenizer` writes (export/speech_tokenizer.py) from the one PyTorch
definition (training/speech_tokenizer.py). This file also holds what both sides read from the released folder
(`TokenizerStructure`, and the log-mel `Frontend` of runtime/audio.py), so the checks are written once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from . import audio as frontend
from .files import read_json

SAMPLE_RATE = 16_000
SEGMENT_SECONDS = 30  # the reference cuts at 30 s whatever the feature extractor's chunk_length says
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE
BATCH_SEGMENTS = 128  # the reference's batch: which segments share a batch decides how far each is padded
CONV_STRIDE = 2  # conv1 has stride 1, conv2 stride 2 (fixed in the architecture, not in config.json)
GRAPH = "speech_tokenizer"
KIND = "speech_tokenizer"

log = logging.getLogger(__name__)


class SpeechTokenizerError(ValueError):
    """A speech tokenizer folder, its config, an exported tokenizer bundle or an input is not what is expected."""


# -- what the released folder says ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerStructure:
    """Every structural value of the encoder below the codebook, read from config.json."""

    d_model: int
    heads: int
    ffn_dim: int
    n_mels: int
    max_source_positions: int
    encoder_layers: int  # in the file; only the first `quantize_position` run
    quantize_position: int
    vocab_size: int
    pooling_kernel: int | None  # None: no pooling
    pooling_type: str  # "avg" | "max"
    pooling_position: int
    block_size: int | None  # block-causal attention over this many 50 Hz frames; None: no block mask
    causal_attention: bool  # encoder_causal_attention or quantize_causal_encoder: plain causal, no padding mask
    causal_convolution: bool
    ema: bool  # quantize_ema_decay set: the file carries the EMA buffers the reference's strict load expects

    @property
    def kernel(self) -> int:
        return self.pooling_kernel or 1

    @property
    def frames_per_token(self) -> int:
        """100 Hz mel frames per token: conv stride x pooling kernel (8 for GLM-4-Voice: 12.5 Hz)."""
        return CONV_STRIDE * self.kernel

    def stride_samples(self, hop: int) -> int:
        return self.frames_per_token * hop

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> TokenizerStructure:
        try:
            return cls(**d)
        except TypeError as exc:
            raise SpeechTokenizerError(f"{where}: speech tokenizer structure does not match this version: "
                                       f"{exc}") from exc

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> TokenizerStructure:
        """Parse and check a WhisperVQ config.json; every problem the reference would hit later is named now."""
        vq = [k for k in ("quantize_vocab_size", "quantize_position") if config.get(k) is None]
        if vq:
            raise SpeechTokenizerError(
                f"{where} has no VQ fields ({', '.join(vq)} missing): a plain Whisper config, not a GLM-4-Voice "
                "WhisperVQ speech tokenizer (expected quantize_vocab_size, quantize_position, pooling_*, "
                "quantize_causal_block_size)")
        sizes = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                 "max_source_positions")
        missing = [k for k in sizes if config.get(k) is None]
        if missing:
            raise SpeechTokenizerError(f"{where} lacks {', '.join(missing)}")

        def integer(name: str, value: object, low: int = 1) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpeechTokenizerError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
            return value

        def flag(name: str) -> bool:
            value = config.get(name, False)
            if value is None:
                return False
            if not isinstance(value, bool):
                raise SpeechTokenizerError(f"{where}: {name} must be true or false, got {value!r}")
            return value

        d_model, heads = integer("d_model", config["d_model"]), integer("encoder_attention_heads",
                                                                        config["encoder_attention_heads"])
        if d_model % heads:
            raise SpeechTokenizerError(f"{where}: d_model {d_model} is not divisible by encoder_attention_heads "
                                       f"{heads}")
        layers = integer("encoder_layers", config["encoder_layers"])
        qpos = integer("quantize_position", config["quantize_position"])
        if qpos > layers:
            raise SpeechTokenizerError(f"{where}: quantize_position {qpos} is past the last of {layers} encoder layers")
        activation = config.get("activation_function", "gelu")
        if activation != "gelu":
            raise SpeechTokenizerError(f"{where}: activation_function {activation!r} is not supported (the "
                                       "GLM-4-Voice tokenizer uses 'gelu', the exact erf form)")
        kernel = config.get("pooling_kernel_size")
        kernel = None if kernel is None else integer("pooling_kernel_size", kernel)
        pooling_type = config.get("pooling_type", "max")
        if pooling_type not in ("avg", "max"):
            raise SpeechTokenizerError(f"{where}: pooling_type {pooling_type!r} is not 'avg' or 'max'")
        ppos = config.get("pooling_position", 0)
        ppos = integer("pooling_position", 0 if ppos is None else ppos, low=0)
        if kernel is not None and not 1 <= ppos <= qpos:
            # The reference asserts pooling_position <= quantize_position; with position 0 it never pools but
            # still subsamples the mask by the kernel, and its extract_speech_token fails on the shapes.
            raise SpeechTokenizerError(f"{where}: pooling_position {ppos} must be in 1..quantize_position ({qpos}) "
                                       f"when pooling_kernel_size is set")
        block = config.get("quantize_causal_block_size")
        block = None if block is None else integer("quantize_causal_block_size", block)
        if block is not None and kernel is not None and block // kernel < 1:
            raise SpeechTokenizerError(f"{where}: quantize_causal_block_size {block} is smaller than the pooling "
                                       f"kernel {kernel} (the pooled block size would be 0)")
        structure = cls(
            d_model=d_model, heads=heads, ffn_dim=integer("encoder_ffn_dim", config["encoder_ffn_dim"]),
            n_mels=integer("num_mel_bins", config["num_mel_bins"]),
            max_source_positions=integer("max_source_positions", config["max_source_positions"]),
            encoder_layers=layers, quantize_position=qpos,
            vocab_size=integer("quantize_vocab_size", config["quantize_vocab_size"]),
            pooling_kernel=kernel, pooling_type=pooling_type, pooling_position=ppos, block_size=block,
            causal_attention=flag("encoder_causal_attention") or flag("quantize_causal_encoder"),
            causal_convolution=flag("encoder_causal_convolution"),
            ema=config.get("quantize_ema_decay") is not None)
        return structure


def tokenizer_frontend(config: dict, n_mels: int, where: str = "preprocessor_config.json") -> frontend.Frontend:
    """The checkpoint's WhisperFeatureExtractor as our frontend, where the reference procedure runs on it: its
    segments are 30 s at 16 kHz (utils.extract_speech_token hard-codes both) and its bins are the encoder's."""
    try:
        features = frontend.Frontend.from_config(config, where)
    except frontend.FrontendError as exc:
        raise SpeechTokenizerError(str(exc)) from exc
    wrong = []
    if features.sample_rate != SAMPLE_RATE:
        wrong.append(f"sampling_rate {features.sample_rate} (expected {SAMPLE_RATE})")
    if features.n_mels != n_mels:
        wrong.append(f"feature_size {features.n_mels} differs from config.json's num_mel_bins {n_mels}")
    if wrong:
        raise SpeechTokenizerError(f"{where}: the reference tokenizes 16 kHz audio with the encoder's mel bins; "
                                   f"this extractor has {'; '.join(wrong)}")
    return features


def read_tokenizer_configs(folder: str | Path) -> tuple[TokenizerStructure, frontend.Frontend]:
    """The structure (config.json) and the features (preprocessor_config.json) of a released tokenizer folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpeechTokenizerError(f"speech tokenizer folder {folder} does not exist")
    config_path = folder / "config.json"
    structure = TokenizerStructure.from_config(read_json(config_path, SpeechTokenizerError, "tokenizer config"),
                                               str(config_path))
    pre_path = folder / "preprocessor_config.json"
    features = tokenizer_frontend(read_json(pre_path, SpeechTokenizerError, "feature extractor config"),
                                           structure.n_mels, str(pre_path))
    frames = -(-SEGMENT_SAMPLES // structure.stride_samples(features.hop)) * structure.frames_per_token
    if frames // CONV_STRIDE > structure.max_source_positions:
        raise SpeechTokenizerError(
            f"{config_path}: a 30 s segment padded to the stride gives {frames // CONV_STRIDE} encoder positions, "
            f"more than max_source_positions {structure.max_source_positions}")
    return structure, features


# -- audio in ---------------------------------------------------------------------------------------------------

@dataclass
class AudioInput:
    """One input as the tokenizer sees it: 16 kHz float32 samples, and what was done to get there."""

    name: str
    wav: np.ndarray
    sample_rate: int  # the file's rate
    channels: int
    resampled: bool = False
    notes: list[str] = field(default_factory=list)


def resample_reference(wav: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE, zero_crossings: int = 6,
                       rolloff: float = 0.99) -> np.ndarray:
    """Band-limited resampling as the reference does it (windowed sinc with a squared-cosine, i.e. Hann, window).

    Rates are reduced by their gcd to `up`/`down`; the cut-off is `rolloff` x the lower Nyquist; every output phase
    has its own kernel of 2*width+down taps over the input, zero-padded at both ends; ceil(n * up / down) samples.
    """
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if rate_in == rate_out:
        return wav.copy()
    g = math.gcd(int(rate_in), int(rate_out))
    down, up = int(rate_in) // g, int(rate_out) // g
    base = min(down, up) * rolloff
    width = math.ceil(zero_crossings * down / base)
    idx = np.arange(-width, width + down, dtype=np.float64)[None, :] / down
    t = (-np.arange(up, dtype=np.float64)[:, None] / up + idx) * base
    t = np.clip(t, -zero_crossings, zero_crossings)
    window = np.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    kernels = (sinc * window * (base / down)).astype(np.float32)  # (up, taps)
    padded = np.pad(wav, (width, width + down))
    n_steps = (padded.size - kernels.shape[1]) // down + 1
    frames = np.lib.stride_tricks.as_strided(padded, shape=(n_steps, kernels.shape[1]),
                                             strides=(padded.strides[0] * down, padded.strides[0]))
    out = (frames @ kernels.T).reshape(-1)  # output j = step j // up, phase j % up
    return np.ascontiguousarray(out[: math.ceil(up * wav.size / down)], dtype=np.float32)


def read_audio(path: str | Path, report: bool = True) -> AudioInput:
    """A file as the reference reads it: float32, the first channel, resampled to 16 kHz (both noted, and logged
    unless `report=False`)."""
    data, rate = frontend.read_audio_file(path)
    return audio_input(data, rate, str(path), report)


def check_audio_file(path: str | Path) -> None:
    """Cheap checks before a long run: the file exists, is not empty and its header is readable audio."""
    path = Path(path)
    if not path.is_file():
        raise frontend.AudioInputError(f"audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise frontend.AudioInputError(f"audio file {path} is empty (expected a wav/flac/ogg file)")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise frontend.AudioInputError(f"audio file {path} is corrupt or not a supported format: {exc}") from exc
    if info.frames == 0:
        raise frontend.AudioInputError(f"audio file {path} holds no samples")


def audio_input(samples: np.ndarray, sample_rate: int, name: str = "audio", report: bool = True) -> AudioInput:
    """Samples ((n,) or (n, channels)) at any rate as the tokenizer's input, with what was changed noted (and
    logged as a warning unless `report=False`)."""
    data = np.asarray(samples, dtype=np.float32)
    data = data[:, None] if data.ndim == 1 else data
    if data.ndim != 2 or data.shape[0] == 0:
        raise frontend.AudioInputError(f"{name}: expected (samples,) or (samples, channels) audio, got {data.shape}")
    if not np.isfinite(data).all():
        raise frontend.AudioInputError(f"{name}: audio holds NaN or Inf samples")
    if sample_rate <= 0:
        raise frontend.AudioInputError(f"{name}: sample rate {sample_rate} is not positive")
    item = AudioInput(name, np.ascontiguousarray(data[:, 0]), int(sample_rate), data.shape[1])
    if data.shape[1] > 1:
        item.notes.append(f"{data.shape[1]} channels: the first is tokenized (as the reference does)")
    if sample_rate != SAMPLE_RATE:
        item.wav = resample_reference(item.wav, sample_rate)
        item.resampled = True
        item.notes.append(f"resampled {sample_rate} Hz -> {SAMPLE_RATE} Hz")
    for note in item.notes if report else ():
        log.warning("%s: %s", name, note)
    return item


# -- the procedure ------------------------------------------------------------------------------------------------

def split_segments(wav: np.ndarray) -> list[np.ndarray]:
    """30 s pieces, the last one shorter."""
    return [wav[start: start + SEGMENT_SAMPLES] for start in range(0, wav.size, SEGMENT_SAMPLES)]


def valid_frames(n_samples: int, hop: int) -> int:
    """Mel frames whose first sample is inside the segment (the extractor's sample mask, every hop)."""
    return -(-n_samples // hop)


def valid_tokens(n_frames: int, structure: TokenizerStructure) -> int:
    """Tokens whose subsampled mask is set: frames 0, 2k, 4k, ... that are valid."""
    return -(-n_frames // structure.frames_per_token)


@dataclass
class SegmentBatch:
    features: np.ndarray  # (B, n_mels, T) float32, T a multiple of the encoder's frames per token
    frame_lengths: np.ndarray  # (B,) int64 valid mel frames
    owners: list[int]  # input index of each segment


def padded_length(lengths: Iterable[int], structure: TokenizerStructure, features: frontend.Frontend) -> int:
    """Samples every segment of a reference batch is padded to: the longest, rounded up to the stride."""
    stride = structure.stride_samples(features.hop)
    return -(-max(lengths) // stride) * stride


def segment_batch(segments: Sequence[np.ndarray], owners: list[int], features: frontend.Frontend,
                  padded_len: int) -> SegmentBatch:
    """Segments zero-padded to `padded_len` samples, then each one's log-mel (clamped over its padded length)."""
    mels, lengths = [], []
    for seg in segments:
        padded = np.zeros(padded_len, dtype=np.float32)
        padded[: seg.size] = seg
        mels.append(frontend.log_mel_spectrogram(padded, features))
        lengths.append(valid_frames(seg.size, features.hop))
    return SegmentBatch(np.stack(mels), np.asarray(lengths, dtype=np.int64), list(owners))


Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (features, frame_lengths) -> tokens (B, T / frames_per_token)
DEFAULT_CHUNK = 8


def iter_tokenize(run: Runner, inputs: Iterable[np.ndarray], structure: TokenizerStructure,
                  features: frontend.Frontend, batch_size: int = BATCH_SEGMENTS, chunk: int = DEFAULT_CHUNK,
                  on_batch: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, list[int]]]:
    """(input index, tokens) for each input as soon as its last segment has run, in input order.

    Segments are grouped exactly as the reference batches the list it is given (consecutive runs of `batch_size`
    over all inputs' segments) and each group is padded to its longest segment, so the tokens equal the
    reference's for the same list. A segment's tokens depend only on its samples and that padded length (the
    clamp, the attention and the pooling never mix segments), so a group runs in `chunk`-segment pieces: the
    memory of a chunk, the tokens of the whole batch. Inputs are read lazily, so a folder of any size streams.
    `on_batch(segments_done, inputs_done)` after each group.
    """
    if batch_size < 1 or chunk < 1:
        raise SpeechTokenizerError(f"batch size and chunk must be >= 1, got {batch_size} and {chunk}")
    pending: list[np.ndarray] = []
    owners: list[int] = []
    tokens: dict[int, list[int]] = {}
    remaining: dict[int, int] = {}
    finished = 0
    next_out = 0
    done_segments = 0

    def flush() -> Iterator[tuple[int, list[int]]]:
        nonlocal next_out, done_segments, finished
        padded_len = padded_length((s.size for s in pending), structure, features)
        for lo in range(0, len(pending), chunk):
            batch = segment_batch(pending[lo: lo + chunk], owners[lo: lo + chunk], features, padded_len)
            out = np.asarray(run(batch.features, batch.frame_lengths))
            want = (len(batch.owners), batch.features.shape[2] // structure.frames_per_token)
            if out.shape != want:
                raise SpeechTokenizerError(f"the tokenizer returned tokens of shape {out.shape}; expected {want}")
            for row, owner, frames in zip(out, batch.owners, batch.frame_lengths, strict=True):
                tokens[owner].extend(int(t) for t in row[: valid_tokens(int(frames), structure)])
                remaining[owner] -= 1
                finished += remaining[owner] == 0
        done_segments += len(pending)
        pending.clear()
        owners.clear()
        if on_batch is not None:
            on_batch(done_segments, finished)
        while remaining.get(next_out) == 0:
            yield next_out, tokens.pop(next_out)
            del remaining[next_out]
            next_out += 1

    for index, wav in enumerate(inputs):
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if wav.size == 0:
            raise frontend.AudioInputError(f"input {index} has no samples")
        segs = split_segments(wav)
        tokens[index], remaining[index] = [], len(segs)
        for seg in segs:
            pending.append(seg)
            owners.append(index)
            if len(pending) == batch_size:
                yield from flush()
    if pending:
        yield from flush()


def tokenize_all(run: Runner, inputs: Iterable[np.ndarray], structure: TokenizerStructure,
                 features: frontend.Frontend, batch_size: int = BATCH_SEGMENTS,
                 chunk: int = DEFAULT_CHUNK) -> list[list[int]]:
    """Tokens per input (the reference's `extract_speech_token` on the same list of 16 kHz inputs)."""
    return [t for _, t in iter_tokenize(run, inputs, structure, features, batch_size, chunk)]


def units_to_strings(tokens: Sequence[int]) -> str:
    """`<|audio_i|>` per unit, the form the training data and the TTS vocabulary use."""
    return "".join(f"<|audio_{int(t)}|>" for t in tokens)


# -- the exported graph ---------------------------------------------------------------------------------------------

class OnnxSpeechTokenizer:
    """The tokenizer bundle `opens2s-edge export-tokenizer` writes, run on onnxruntime (no torch).

    Implements the data pipeline's `SpeechTokenizer` protocol (`codebook_size`, `rate_hz`, `encode`).
    """

    name = "glm4voice-tokenizer"

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None, threads: int = 0,
                 verify: bool = True):
        import onnxruntime as ort

        from .bundle import BundleError, load_bundle

        try:
            bundle = load_bundle(folder, verify=verify)
        except BundleError as exc:
            raise SpeechTokenizerError(str(exc)) from exc
        section = bundle.manifest.get(KIND)
        if bundle.manifest.get("kind") != KIND or not isinstance(section, dict):
            raise SpeechTokenizerError(f"{folder} is a bundle but not a speech tokenizer bundle (no {KIND!r} section); "
                                       "write one with `opens2s-edge export-tokenizer`")
        self.folder = Path(folder)
        self.structure = TokenizerStructure.from_dict(section["structure"], str(self.folder / "manifest.json"))
        self.features = frontend.Frontend.from_json(section["features"])
        self.codebook_size = self.structure.vocab_size
        self.rate_hz = self.features.sample_rate / self.structure.stride_samples(self.features.hop)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(bundle.graph_path(section.get("graph", GRAPH))), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))

    @property
    def source(self) -> str:
        return str(self.folder)

    def run_batch(self, features: np.ndarray, frame_lengths: np.ndarray) -> np.ndarray:
        tokens, _ = self.session.run(["tokens", "token_length"], {
            "input_features": np.ascontiguousarray(features, dtype=np.float32),
            "feature_length": np.ascontiguousarray(frame_lengths, dtype=np.int64)})
        return tokens

    def tokenize(self, inputs: Iterable[np.ndarray], batch_size: int = BATCH_SEGMENTS,
                 chunk: int = DEFAULT_CHUNK) -> list[list[int]]:
        """Tokens per 16 kHz input, batched as the reference batches them."""
        return tokenize_all(self.run_batch, inputs, self.structure, self.features, batch_size, chunk)

    def encode(self, wav: np.ndarray, sample_rate: int) -> list[int]:
        item = audio_input(wav, sample_rate)
        return self.tokenize([item.wav])[0]
