"""Training data: the reference's jsonl message format, read lazily, and the collator into model inputs.

One row per line:
```
{"messages": [
  {"role": "system", "content": "You are a helpful assistant."},                    # optional
  {"role": "user", "content": [{"text": "", "audio": "/data/q.wav", "speech_units": "", "spk_emb": ""}]},
  {"role": "assistant", "content": [{"text": "hello", "audio": "",
                                      "speech_units": "<|audio_12|><|audio_7|>", "spk_emb": "spk.npy"}]}]}
```
- A user audio item is a path, or `path:start:frames` (a segment in the file's own sample frames, as the
  reference's `get_waveform` reads it). Relative paths resolve against the jsonl file's folder.
- User text items go into the user turn in order, around the audio; a user turn with no audio is a
  text-to-speech instruction row (stage 3).
- Assistant speech units are `<|audio_i|>` tokens with 0 <= i < 16384 (a list of ints is accepted too);
  `spk_emb` is an optional .npy speaker vector of 512 values, zeros when absent (what the reference passes).
- Rows are single-turn: at most one system message, then one user and one assistant message.

The file is never loaded whole: an index of line offsets is built once, rows are parsed on access, and a
bad row raises `DataError` naming the file and line.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tokenizers import Tokenizer

from opens2s_edge.runtime.audio import audio_features, load_wav
from opens2s_edge.runtime.files import write_jsonl_atomic  # noqa: F401 (re-exported for callers)
from opens2s_edge.runtime.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    GLM4VOICE_UNITS,
    SPEECH_TOKEN_FORMAT,
    TTS_END_TOKEN,
    PromptBuilder,
    SpeechVocab,
)

from .checkpoint import read_frontend
from .opens2s import SPEAKER_DIM

IGNORE_INDEX = -100
SAMPLE_RATE = 16000
_UNIT_RE = re.compile(r"<\|audio_(\d+)\|>")


class DataError(ValueError):
    """A training row is malformed or points at something missing; the message names file and line."""


@dataclass(frozen=True)
class AudioRef:
    path: Path
    start: int = 0
    frames: int = -1  # -1: to the end of the file

    @classmethod
    def parse(cls, spec: str, base: Path) -> AudioRef:
        start, frames = 0, -1
        parts = spec.rsplit(":", 2)
        # `path:start:frames` only when both tails are integers: a Windows drive or a colon in a name stays a path.
        if len(parts) == 3 and _is_int(parts[1]) and _is_int(parts[2]):
            spec, start, frames = parts[0], int(parts[1]), int(parts[2])
        path = Path(spec)
        if not path.is_absolute():
            path = base / path
        return cls(path, start, frames)

    def __str__(self) -> str:
        return f"{self.path}" if self.start == 0 and self.frames < 0 else f"{self.path}:{self.start}:{self.frames}"


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


@dataclass
class Sample:
    """One parsed row. `user` holds the user turn's parts in order: a str (text) or an AudioRef."""

    where: str  # "file:line", for error messages downstream
    system: str
    user: list[str | AudioRef]
    response_text: str
    units: list[int] | None = None  # vocoder codes 0..16383, speech EOS not included
    spk_emb: Path | None = None

    @property
    def audio(self) -> list[AudioRef]:
        return [p for p in self.user if isinstance(p, AudioRef)]


def parse_units(value: object, where: str) -> list[int]:
    """`<|audio_i|>...` string (or list of ints) -> codes, each checked against the 16384-code vocabulary."""
    if isinstance(value, list):
        if not all(isinstance(u, int) and not isinstance(u, bool) for u in value):
            raise DataError(f"{where}: speech_units list must hold integers")
        units = value
    elif isinstance(value, str):
        units = [int(m) for m in _UNIT_RE.findall(value)]
        leftover = _UNIT_RE.sub("", value).strip()
        if leftover:
            raise DataError(f"{where}: speech_units has text that is not a <|audio_i|> token: {leftover[:40]!r}")
    else:
        raise DataError(f"{where}: speech_units must be a string of <|audio_i|> tokens or a list of ints")
    bad = [u for u in units if not 0 <= u < GLM4VOICE_UNITS]
    if bad:
        raise DataError(f"{where}: speech unit {bad[0]} is outside the vocabulary 0..{GLM4VOICE_UNITS - 1}")
    return list(units)


def _items(content: object, where: str, role: str) -> list[dict]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list) or not all(isinstance(i, dict) for i in content):
        raise DataError(f"{where}: {role} content must be a string or a list of objects")
    return content


def parse_row(obj: object, where: str, base: Path, check_files: bool = True) -> Sample:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DataError(f"{where}: a row must be an object with a 'messages' list")
    messages = obj["messages"]
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles and roles[0] == "system":
        system_msg, rest = messages[0], messages[1:]
    else:
        system_msg, rest = None, messages
    if [m.get("role") if isinstance(m, dict) else None for m in rest] != ["user", "assistant"]:
        raise DataError(f"{where}: expected messages [system?, user, assistant], got roles {roles}")
    system = DEFAULT_SYSTEM_PROMPT
    if system_msg is not None:
        system = "".join(str(i.get("text") or "") for i in _items(system_msg.get("content"), where, "system"))

    user: list[str | AudioRef] = []
    for item in _items(rest[0].get("content"), where, "user"):
        if item.get("speech_units"):
            raise DataError(f"{where}: speech_units belong to the assistant, not the user")
        if item.get("audio"):
            ref = AudioRef.parse(str(item["audio"]), base)
            if check_files and not ref.path.is_file():
                raise DataError(f"{where}: audio file {ref.path} does not exist")
            user.append(ref)
        elif item.get("text"):
            user.append(str(item["text"]))
    if not user:
        raise DataError(f"{where}: the user turn has neither audio nor text")

    text, units, spk = [], None, None
    for item in _items(rest[1].get("content"), where, "assistant"):
        if item.get("audio"):
            raise DataError(f"{where}: assistant audio is not supported; give speech_units instead")
        if item.get("text"):
            text.append(str(item["text"]))
        if item.get("speech_units"):
            if units is not None:
                raise DataError(f"{where}: the assistant turn has more than one speech_units item")
            units = parse_units(item["speech_units"], where)
        if item.get("spk_emb"):
            spk = Path(str(item["spk_emb"]))
            spk = spk if spk.is_absolute() else base / spk
            if check_files and not spk.is_file():
                raise DataError(f"{where}: speaker embedding {spk} does not exist")
    if not text:
        raise DataError(f"{where}: the assistant turn has no text")
    return Sample(where, system, user, "".join(text), units, spk)


class JsonlDataset(torch.utils.data.Dataset):
    """Rows of one or more jsonl files, indexed by line offsets and parsed on access."""

    def __init__(self, paths: Sequence[str | Path], check_files: bool = True):
        self.paths = [Path(p) for p in paths]
        self.check_files = check_files
        self._index: list[tuple[int, int, int]] = []  # (file, byte offset, 1-based line number)
        for fi, path in enumerate(self.paths):
            if not path.is_file():
                raise DataError(f"data file {path} does not exist")
            with open(path, "rb") as f:
                offset = 0
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        self._index.append((fi, offset, lineno))
                    offset += len(line)
        if not self._index:
            raise DataError(f"no rows in {', '.join(map(str, self.paths))}")

    def __len__(self) -> int:
        return len(self._index)

    def where(self, i: int) -> str:
        fi, _, lineno = self._index[i]
        return f"{self.paths[fi]}:{lineno}"

    def __getitem__(self, i: int) -> Sample:
        fi, offset, lineno = self._index[i]
        path = self.paths[fi]
        where = f"{path}:{lineno}"
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: malformed JSON: {exc}") from exc
        return parse_row(obj, where, path.parent, self.check_files)

    def validate(self) -> int:
        """Parse every row (streaming, nothing kept); raises on the first bad one. Returns the row count."""
        for i in range(len(self)):
            self[i]
        return len(self)


def read_audio(ref: AudioRef, where: str = "") -> np.ndarray:
    """16 kHz mono float32 samples of a file or a `path:start:frames` segment."""
    prefix = f"{where}: " if where else ""
    if ref.start == 0 and ref.frames < 0:
        try:
            return load_wav(ref.path)
        except Exception as exc:  # load_wav's error types vary by codec; the row is what matters
            raise DataError(f"{prefix}cannot read audio {ref.path}: {exc}") from exc
    try:
        info = sf.info(str(ref.path))
        if info.samplerate != SAMPLE_RATE:
            raise DataError(f"{prefix}{ref}: segments (path:start:frames) need a {SAMPLE_RATE} Hz file, "
                            f"this one is {info.samplerate} Hz")
        if ref.start >= info.frames:
            raise DataError(f"{prefix}{ref}: start {ref.start} is past the end ({info.frames} frames)")
        wav, _ = sf.read(str(ref.path), start=ref.start, frames=ref.frames, dtype="float32", always_2d=True)
    except RuntimeError as exc:  # soundfile's errors derive from RuntimeError
        raise DataError(f"{prefix}cannot read audio {ref}: {exc}") from exc
    return wav.mean(axis=1).astype(np.float32)


@dataclass
class Batch:
    """Padded model inputs for a list of samples; every stage takes what it needs from here.

    LLM side: `input_ids` holds AUDIO_PLACEHOLDER_ID where each audio's embeddings go; `labels` are the
    input ids on the response (`text`, `<|im_tts_end|>`, `<|im_end|>`) and IGNORE_INDEX elsewhere (the
    loss shifts them by one). TTS side: `speech_ids` are TTS-vocabulary ids with the speech EOS appended;
    `tts_text_ids` is the response text in the TTS tokenizer (stage 2a's prefix).
    """

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long
    lengths: torch.Tensor  # (B,)
    response_start: torch.Tensor  # (B,) index of the first response token in input_ids
    response_len: torch.Tensor  # (B,)
    audio_features: torch.Tensor | None  # (A, 128, 3000*S)
    audio_lengths: torch.Tensor | None  # (A,) valid mel frames
    audio_owner: torch.Tensor | None  # (A,) sample index of each audio, in prompt order
    speech_ids: torch.Tensor | None  # (B, S) long
    speech_len: torch.Tensor | None  # (B,)
    speaker: torch.Tensor  # (B, 512)
    tts_text_ids: torch.Tensor | None = None  # (B, T2)
    tts_text_len: torch.Tensor | None = None
    where: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum()) + (int(self.speech_len.sum()) if self.speech_len is not None else 0)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class Collator:
    """Samples -> Batch, with the checkpoint's own tokenizers and chat template, so a training prompt is
    token for token the prompt `generate` and the runtime build (PromptBuilder)."""

    def __init__(self, checkpoint: str | Path, need_audio: bool = True, need_units: bool = False,
                 need_tts_text: bool = False, need_user_audio: bool = False, feature_cache: int = 0):
        folder = Path(checkpoint)
        self.prompt = PromptBuilder.from_folder(folder)
        self.vocab = SpeechVocab.from_folder(folder / "tts")
        self.tts_tokenizer = Tokenizer.from_file(str(folder / "tts" / "tokenizer.json"))
        tok = self.prompt.tokenizer
        self.pad_id = tok.token_to_id("<|endoftext|>") or 0
        self.tts_end_id = tok.token_to_id(TTS_END_TOKEN)
        self.im_end_id = tok.token_to_id("<|im_end|>")
        if self.tts_end_id is None or self.im_end_id is None:
            raise DataError(f"tokenizer in {folder} lacks {TTS_END_TOKEN} or <|im_end|>")
        self.need_audio, self.need_units, self.need_tts_text = need_audio, need_units, need_tts_text
        self.need_user_audio = need_user_audio
        self.frontend = read_frontend(folder)
        if self.frontend.sample_rate != SAMPLE_RATE:
            raise DataError(f"{folder}: the feature extractor runs at {self.frontend.sample_rate} Hz; training rows "
                            f"are read at {SAMPLE_RATE} Hz")
        # Small datasets revisit the same files every epoch; memoising the frontend saves most of a CPU step.
        self._features = functools.lru_cache(maxsize=feature_cache)(self._compute_features) if feature_cache \
            else self._compute_features

    def _compute_features(self, ref: AudioRef, where: str) -> tuple[np.ndarray, int]:
        f, n = audio_features(read_audio(ref, where), self.frontend)
        return f, int(n)

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Chat-template prompt for the sample's user turn, ending in `<|im_tts_start|>`; each audio's
        place is AUDIO_PLACEHOLDER_ID. For a lone audio item this equals PromptBuilder.prompt_ids."""
        content = [{"audio": True} if isinstance(p, AudioRef) else {"text": p} for p in sample.user]
        return self.prompt.encode([{"role": "user", "content": content}], sample.system or None)

    def response_ids(self, sample: Sample) -> list[int]:
        # The LLM answers `text <|im_tts_end|> <|im_end|>`; generation stops at <|im_end|>, and every one
        # of these tokens (EOS included) hands its hidden state to the TTS LM at inference.
        return self.prompt.tokenizer.encode(sample.response_text, add_special_tokens=False).ids + [
            self.tts_end_id, self.im_end_id]

    def __call__(self, samples: list[Sample]) -> Batch:
        inputs, labels, starts, resp_lens, speech, tts_text = [], [], [], [], [], []
        feats, feat_lens, owners, speakers = [], [], [], []
        for b, s in enumerate(samples):
            prompt, response = self.prompt_ids(s), self.response_ids(s)
            inputs.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
            starts.append(len(prompt))
            resp_lens.append(len(response))
            if self.need_user_audio and not s.audio:
                raise DataError(f"{s.where}: this stage needs user audio (the row's user turn is text only)")
            if self.need_units and s.units is None:
                raise DataError(f"{s.where}: this stage needs speech_units in the assistant turn")
            units = s.units or []
            if units and max(units) >= self.vocab.count:
                raise DataError(f"{s.where}: speech unit {max(units)} is outside the TTS vocabulary's "
                                f"{self.vocab.count} speech tokens")
            speech.append([self.vocab.offset + u for u in units] + ([self.vocab.eos_ids[0]] if units else []))
            if self.need_tts_text:
                tts_text.append(self.tts_tokenizer.encode(s.response_text, add_special_tokens=False).ids)
            if self.need_audio:
                for ref in s.audio:
                    f, n = self._features(ref, s.where)
                    feats.append(f[0])
                    feat_lens.append(int(n))
                    owners.append(b)
            speakers.append(self._speaker(s))
        audio = audio_len = owner = None
        if feats:
            width = max(f.shape[-1] for f in feats)
            audio = torch.zeros(len(feats), feats[0].shape[0], width)
            for i, f in enumerate(feats):
                audio[i, :, :f.shape[-1]] = torch.from_numpy(np.asarray(f, dtype=np.float32))
            audio_len, owner = torch.tensor(feat_lens), torch.tensor(owners)
        return Batch(
            input_ids=_pad(inputs, self.pad_id),
            labels=_pad(labels, IGNORE_INDEX),
            lengths=torch.tensor([len(r) for r in inputs]),
            response_start=torch.tensor(starts),
            response_len=torch.tensor(resp_lens),
            audio_features=audio, audio_lengths=audio_len, audio_owner=owner,
            speech_ids=_pad(speech, self.vocab.eos_ids[0]) if any(speech) else None,
            speech_len=torch.tensor([len(r) for r in speech]) if any(speech) else None,
            speaker=torch.stack(speakers),
            tts_text_ids=_pad(tts_text, self.pad_id) if tts_text else None,
            tts_text_len=torch.tensor([len(r) for r in tts_text]) if tts_text else None,
            where=[s.where for s in samples],
        )

    @staticmethod
    def _speaker(s: Sample) -> torch.Tensor:
        if s.spk_emb is None:
            return torch.zeros(SPEAKER_DIM)
        try:
            v = np.load(s.spk_emb)
        except (OSError, ValueError) as exc:
            raise DataError(f"{s.where}: cannot read speaker embedding {s.spk_emb}: {exc}") from exc
        if v.size != SPEAKER_DIM:
            raise DataError(f"{s.where}: speaker embedding {s.spk_emb} has {v.size} values, expected {SPEAKER_DIM}")
        return torch.from_numpy(v.reshape(SPEAKER_DIM).astype(np.float32))


def units_to_text(units: Sequence[int]) -> str:
    return "".join(SPEECH_TOKEN_FORMAT.format(u) for u in units)


