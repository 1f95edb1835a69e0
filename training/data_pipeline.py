"""The empathetic data construction pipeline (OpenS2S paper, section 3.2) as resumable, sharded steps.

```
seed               seed manifest (audio + transcript + paralinguistic labels) -> shards
instructions       LLM writes a paralinguistic-sensitive user instruction for each seed speaker
instruction_speech TTS speaks the instruction in the seed speaker's voice (cloned from the seed audio)
responses          LLM answers empathetically and names the emotion the answer should carry
response_speech    controllable TTS speaks the answer with that emotion
units              speech tokenizer turns the answer speech into 12.5 Hz units -> training rows (data.py format)
```
Every step reads `work_dir/<k>_<step>/shard-NNNNN.jsonl` from the step before and writes its own. A finished
shard is renamed into place from a `.partial` file that grows one flushed line per finished item, so a
killed run loses at most the item in flight and the next run skips finished shards and finished items.
Audio is written to a temporary name and renamed. Items that fail (an LLM answer that does not parse
after the retries, a TTS error) are listed in `shard-NNNNN.failed.jsonl` and left out. Workers split the
shards (`worker`, `num_workers`): a shard only depends on the same shard of the step before.

The LLM and TTS are clients behind small protocols: `OpenAIChatClient` speaks the OpenAI-compatible
`/chat/completions` API over urllib (vLLM, llama.cpp server, SGLang, hosted APIs); `HTTPTTSClient` posts to
a TTS server; `EspeakTTS` runs espeak-ng locally. The speech tokenizer is a protocol too: with
`PipelineConfig.speech_tokenizer` set to a GLM-4-Voice tokenizer folder (the released one, PyTorch, or a bundle from
`opens2s-edge export-tokenizer`, onnxruntime) the units are GLM-4-Voice's own (training/speech_tokenizer.py); the
default `MEL_QUANTIZER` names `MelQuantizer`, a deterministic no-weights stand-in for tests (see its docstring).
Every training row records which tokenizer made its units (`meta.units_tokenizer`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf

from opens2s_edge.runtime.files import atomic_file, write_jsonl_atomic

# PipelineConfig.speech_tokenizer's default: the no-weights stand-in, named so in configs and rows.
MEL_QUANTIZER = "mel-quantizer"
STEPS = ("seed", "instructions", "instruction_speech", "responses", "response_speech", "units")
EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "surprised", "disgusted")
NUM_UNITS = 16384


class PipelineError(RuntimeError):
    """A pipeline input or client failed in a way the run cannot skip over."""


class ItemError(RuntimeError):
    """One item failed (bad LLM answer, TTS error): it is recorded and skipped, the run goes on."""


# -- clients ---------------------------------------------------------------------------------------------

class ChatClient(Protocol):
    def chat(self, messages: list[dict], **options: object) -> str: ...


class TTSClient(Protocol):
    def synthesize(self, text: str, out_path: Path, *, emotion: str | None = None,
                   reference_audio: Path | None = None) -> None: ...


class SpeechTokenizer(Protocol):
    name: str  # recorded in every row's meta.units_tokenizer
    codebook_size: int
    rate_hz: float

    def encode(self, wav: np.ndarray, sample_rate: int) -> list[int]: ...


class OpenAIChatClient:
    """`POST {base_url}/chat/completions` with urllib; retries on 429/5xx and connection errors."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, retry_wait: float = 1.0, temperature: float = 0.7, max_tokens: int = 256):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.retry_wait = max_retries, retry_wait
        self.temperature, self.max_tokens = temperature, max_tokens
        self.requests = 0

    def chat(self, messages: list[dict], **options: object) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **options}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_wait * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            self.requests += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
                if exc.code in (408, 429) or exc.code >= 500:
                    continue
                raise PipelineError(f"LLM request to {self.url} failed: {last}") from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = str(exc)
                continue
            except json.JSONDecodeError as exc:
                raise ItemError(f"LLM at {self.url} returned non-JSON: {exc}") from exc
            try:
                return str(payload["choices"][0]["message"]["content"])
            except (KeyError, IndexError, TypeError) as exc:
                raise ItemError(f"LLM at {self.url} returned no choices[0].message.content: "
                                f"{json.dumps(payload)[:200]}") from exc
        raise PipelineError(f"LLM at {self.url} unreachable after {self.max_retries + 1} tries: {last}")


def _write_wav_atomic(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    with atomic_file(path) as tmp:
        sf.write(str(tmp), wav, sample_rate, subtype="PCM_16")


class HTTPTTSClient:
    """`POST {url}` with JSON {"text", "emotion", "reference_audio" (base64 wav or null)}; the server answers
    with a wav file (any rate). This is the shape of CosyVoice2/F5-style voice-cloning servers behind a
    thin adapter; the answer is checked to be readable audio before it is kept."""

    def __init__(self, url: str, timeout: float = 120.0):
        self.url, self.timeout = url, timeout

    def synthesize(self, text: str, out_path: Path, *, emotion: str | None = None,
                   reference_audio: Path | None = None) -> None:
        ref = base64.b64encode(Path(reference_audio).read_bytes()).decode() if reference_audio else None
        body = json.dumps({"text": text, "emotion": emotion, "reference_audio": ref}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                audio = resp.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise ItemError(f"TTS at {self.url} failed: {exc}") from exc
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            f.write(audio)
            f.flush()
            try:
                wav, sr = sf.read(f.name, dtype="float32", always_2d=True)
            except RuntimeError as exc:
                raise ItemError(f"TTS at {self.url} did not return readable audio: {exc}") from exc
        _write_wav_atomic(Path(out_path), wav.mean(axis=1), sr)


# espeak-ng prosody per emotion: words per minute, pitch (0-99), amplitude (0-200).
_ESPEAK_PROSODY = {
    "neutral": (160, 50, 100), "happy": (185, 70, 120), "sad": (125, 30, 80), "angry": (190, 45, 160),
    "fearful": (180, 75, 90), "surprised": (175, 85, 120), "disgusted": (140, 35, 110),
}
_ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")


class EspeakTTS:
    """Local TTS through the espeak-ng command, written at 16 kHz (via sox when present).

    Honest limits: espeak-ng cannot clone a voice. With a reference audio it picks one of its voice
    variants from a hash of the reference path (so one seed speaker keeps one voice, and speakers differ),
    and the emotion only sets rate, pitch and loudness. It is the test and smoke-run client; use an
    HTTPTTSClient in front of a voice-cloning, emotion-controllable TTS for real data."""

    def __init__(self, voice: str = "en-us", sample_rate: int = 16000, executable: str = "espeak-ng"):
        path = shutil.which(executable)
        if path is None:
            raise PipelineError(f"{executable} not found: install espeak-ng (apt-get install espeak-ng)")
        self.exe, self.voice, self.sample_rate = path, voice, sample_rate
        self.sox = shutil.which("sox")

    def synthesize(self, text: str, out_path: Path, *, emotion: str | None = None,
                   reference_audio: Path | None = None) -> None:
        speed, pitch, amp = _ESPEAK_PROSODY.get((emotion or "neutral").lower(), _ESPEAK_PROSODY["neutral"])
        voice = self.voice
        if reference_audio is not None:
            h = int(hashlib.sha256(str(reference_audio).encode()).hexdigest(), 16)
            voice = f"{self.voice}+{_ESPEAK_VARIANTS[h % len(_ESPEAK_VARIANTS)]}"
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.wav"
            cmd = [self.exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-a", str(amp), "-w", str(raw),
                   "--", text]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0 or not raw.is_file():
                raise ItemError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.strip()[:200]}")
            if self.sox:
                conv = Path(tmp) / "out.wav"
                proc = subprocess.run([self.sox, str(raw), "-r", str(self.sample_rate), "-c", "1", "-b", "16",
                                       str(conv)], capture_output=True, text=True, timeout=60)
                if proc.returncode != 0:
                    raise ItemError(f"sox failed: {proc.stderr.strip()[:200]}")
                raw = conv
            with atomic_file(out_path) as tmp_out:
                shutil.copyfile(raw, tmp_out)


def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    fb = np.zeros((n_mels, bins.size))
    for i in range(n_mels):
        lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
        fb[i] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None)
    return fb


class MelQuantizer:
    """A deterministic speech tokenizer at GLM-4-Voice's rate (12.5 Hz) and codebook size (16384).

    What it is: a 64-bin log-mel frame every 80 ms (160 ms Hann window), mean/variance normalised per
    utterance, projected by a fixed seeded Gaussian matrix onto 14 directions; the 14 signs are the code's
    bits (locality-sensitive hashing, so similar frames tend to share bits). What it is not: GLM-4-Voice's
    tokenizer (a vector-quantised Whisper encoder whose codes carry phonetic content and which its decoder
    turns back into speech). Codes from this class exercise the pipeline and the training stages; speech
    decoded from a model trained on them is not meaningful."""

    name = f"{MEL_QUANTIZER} (no-weights stand-in, not GLM-4-Voice units)"
    codebook_size = NUM_UNITS
    rate_hz = 12.5
    bits = 14
    n_mels = 64

    def __init__(self, seed: int = 0):
        self.projection = np.random.default_rng(seed).standard_normal((self.bits, self.n_mels))
        self._fb: dict[int, np.ndarray] = {}

    def encode(self, wav: np.ndarray, sample_rate: int) -> list[int]:
        wav = np.asarray(wav, dtype=np.float64).reshape(-1)
        hop = int(round(sample_rate / self.rate_hz))
        win = 2 * hop
        n_fft = 1 << (win - 1).bit_length()
        n_frames = max(1, int(np.ceil(wav.size / hop)))
        padded = np.pad(wav, (hop // 2, n_frames * hop + win))
        idx = np.arange(win)[None, :] + hop * np.arange(n_frames)[:, None]
        spec = np.abs(np.fft.rfft(padded[idx] * np.hanning(win), n=n_fft)) ** 2
        if sample_rate not in self._fb:
            self._fb[sample_rate] = _mel_filterbank(sample_rate, n_fft, self.n_mels)
        logmel = np.log(spec @ self._fb[sample_rate].T + 1e-6)
        logmel = (logmel - logmel.mean(0)) / (logmel.std(0) + 1e-5)
        signs = (logmel @ self.projection.T) > 0
        return (signs.astype(np.int64) << np.arange(self.bits)).sum(1).tolist()


# -- shards and steps -------------------------------------------------------------------------------------

@dataclass
class PipelineConfig:
    seed_manifest: Path  # jsonl: {"id", "audio", "text", optional "emotion", "gender", "age", ...}
    work_dir: Path
    num_shards: int = 1
    concurrency: int = 1  # items in flight per step (LLM/TTS calls are latency-bound)
    llm_retries: int = 2  # extra LLM calls when an answer does not parse
    system_prompt: str = "You are a helpful assistant."
    # The units step's tokenizer: a GLM-4-Voice tokenizer folder (released, or an export-tokenizer bundle), or
    # MEL_QUANTIZER, the deterministic no-weights stand-in (units a decoder cannot speak; for tests).
    speech_tokenizer: str | Path = MEL_QUANTIZER

    def __post_init__(self) -> None:
        self.seed_manifest, self.work_dir = Path(self.seed_manifest), Path(self.work_dir)
        if self.speech_tokenizer != MEL_QUANTIZER:
            self.speech_tokenizer = Path(self.speech_tokenizer)
            if not self.speech_tokenizer.is_dir():
                raise PipelineError(f"speech_tokenizer {self.speech_tokenizer} is not a folder (a GLM-4-Voice "
                                    f"tokenizer or tokenizer bundle; {MEL_QUANTIZER!r} for the stand-in)")
        if self.num_shards < 1:
            raise PipelineError("num_shards must be >= 1")


@dataclass
class StepReport:
    step: str
    shard: int
    status: str  # "done", "skipped"
    items: int = 0
    resumed: int = 0
    failed: int = 0


@dataclass
class Clients:
    llm: ChatClient
    tts: TTSClient
    tokenizer: SpeechTokenizer | None = None  # None: the one PipelineConfig.speech_tokenizer names


def open_units_tokenizer(choice: str | Path, seed: int = 0) -> SpeechTokenizer:
    """`MEL_QUANTIZER` -> MelQuantizer(seed); a folder -> GLM-4-Voice's tokenizer (PyTorch, or onnxruntime for a
    tokenizer bundle)."""
    if choice == MEL_QUANTIZER:
        return MelQuantizer(seed)
    from .speech_tokenizer import SpeechTokenizerError, open_speech_tokenizer

    try:
        return open_speech_tokenizer(Path(choice))
    except SpeechTokenizerError as exc:
        raise PipelineError(f"speech tokenizer: {exc}") from exc


def step_dir(cfg: PipelineConfig, step: str) -> Path:
    return cfg.work_dir / f"{STEPS.index(step):02d}_{step}"


def shard_path(cfg: PipelineConfig, step: str, shard: int) -> Path:
    return step_dir(cfg, step) / f"shard-{shard:05d}.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PipelineError(f"{path}:{lineno}: malformed JSON: {exc}") from exc
    return rows


def _read_partial(path: Path) -> dict[str, dict]:
    """Finished items of an interrupted shard; a torn last line (killed mid-write) is cut off."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    good = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not line.endswith(b"\n"):
                break
            done[row["id"]] = row
            good += len(line)
    with open(path, "r+b") as f:
        f.truncate(good)
    return done


def _shard_of(item_id: str, num_shards: int) -> int:
    return int(hashlib.sha256(item_id.encode()).hexdigest(), 16) % num_shards


def run_seed(cfg: PipelineConfig) -> list[StepReport]:
    """Validate the seed manifest and deal its rows to shards by a hash of the id (stable across runs)."""
    out_dir = step_dir(cfg, "seed")
    paths = [shard_path(cfg, "seed", s) for s in range(cfg.num_shards)]
    if all(p.is_file() for p in paths):
        return [StepReport("seed", s, "skipped") for s in range(cfg.num_shards)]
    if not cfg.seed_manifest.is_file():
        raise PipelineError(f"seed manifest {cfg.seed_manifest} does not exist")
    base = cfg.seed_manifest.parent
    shards: list[list[dict]] = [[] for _ in range(cfg.num_shards)]
    seen: set[str] = set()
    for lineno, row in enumerate(read_jsonl(cfg.seed_manifest), 1):
        where = f"{cfg.seed_manifest}:{lineno}"
        for key in ("id", "audio", "text"):
            if not row.get(key):
                raise PipelineError(f"{where}: seed row needs {key!r}")
        item_id = str(row["id"])
        if item_id in seen:
            raise PipelineError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        audio = Path(row["audio"])
        audio = audio if audio.is_absolute() else (base / audio).resolve()
        if not audio.is_file():
            raise PipelineError(f"{where}: seed audio {audio} does not exist")
        shards[_shard_of(item_id, cfg.num_shards)].append({**row, "id": item_id, "audio": str(audio)})
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, rows in enumerate(shards):
        write_jsonl_atomic(paths[s], rows)
    return [StepReport("seed", s, "done", len(rows)) for s, rows in enumerate(shards)]


def run_item_step(cfg: PipelineConfig, step: str, shard: int, fn: Callable[[dict], dict]) -> StepReport:
    """Apply `fn` to every row of the previous step's shard, resuming from the `.partial` file."""
    out = shard_path(cfg, step, shard)
    if out.is_file():
        return StepReport(step, shard, "skipped")
    src = shard_path(cfg, STEPS[STEPS.index(step) - 1], shard)
    if not src.is_file():
        raise PipelineError(f"step {step} shard {shard}: input {src} is missing (run the earlier steps first)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    failed_path = out.with_name(out.name.replace(".jsonl", ".failed.jsonl"))
    done = _read_partial(partial)
    todo = [r for r in read_jsonl(src) if r["id"] not in done]
    failures = []

    def attempt(row: dict) -> tuple[dict, dict | None, str | None]:
        try:
            return row, fn(row), None
        except ItemError as exc:
            return row, None, str(exc)

    with open(partial, "a", encoding="utf-8") as f, ThreadPoolExecutor(max(1, cfg.concurrency)) as pool:
        for row, result, error in pool.map(attempt, todo):
            if error is not None:
                failures.append({"id": row["id"], "error": error})
                continue
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
            f.flush()
    if failures:
        write_jsonl_atomic(failed_path, failures)
    os.replace(partial, out)
    return StepReport(step, shard, "done", len(todo) - len(failures), len(done), len(failures))


# -- the content of each step -------------------------------------------------------------------------------

def _labels(row: dict) -> str:
    keys = [k for k in ("emotion", "gender", "age", "accent", "pace", "pitch") if row.get(k)]
    return ", ".join(f"{k}: {row[k]}" for k in keys) or "no labels"


def _one_line(text: str) -> str:
    text = text.strip().strip('"').strip()
    text = re.sub(r"\s+", " ", text)
    return text


def _json_object(text: str) -> dict | None:
    match = re.search(r"\{.*\}", text, flags=re.S)
    if not match:
        return None
    try:
        obj = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


INSTRUCTION_PROMPT = (
    "A person speaks to a voice assistant. From how they sound ({labels}) and what they once said "
    "(\"{text}\"), write one thing this person might say next to the assistant: a single first-person "
    "sentence whose best answer depends on their emotion and voice, not only on the words. "
    "Reply with the sentence only."
)
RESPONSE_PROMPT = (
    "The user said: \"{instruction}\". Their voice sounds: {labels}. Reply as an empathetic voice assistant "
    "in one or two short spoken sentences that acknowledge how they feel. Also choose the emotion your reply "
    "should be spoken with, one of: {emotions}. Answer as JSON: {{\"emotion\": \"...\", \"response\": \"...\"}}"
)


class Steps:
    """The per-item work of each step, bound to the clients."""

    def __init__(self, cfg: PipelineConfig, clients: Clients):
        self.cfg, self.clients = cfg, clients
        self._tokenizer = clients.tokenizer
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> SpeechTokenizer:
        # Loaded on first use: the other steps never need the model in memory.
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = open_units_tokenizer(self.cfg.speech_tokenizer)
            return self._tokenizer

    def instructions(self, row: dict) -> dict:
        prompt = INSTRUCTION_PROMPT.format(labels=_labels(row), text=row["text"])
        for _ in range(self.cfg.llm_retries + 1):
            text = _one_line(self.clients.llm.chat([{"role": "user", "content": prompt}]))
            if 0 < len(text) <= 400:
                return {**row, "instruction": text}
        raise ItemError(f"no usable instruction from the LLM for {row['id']}")

    def instruction_speech(self, row: dict) -> dict:
        path = step_dir(self.cfg, "instruction_speech") / "wavs" / f"{_safe(row['id'])}.wav"
        if not path.is_file():
            self.clients.tts.synthesize(row["instruction"], path, emotion=row.get("emotion"),
                                        reference_audio=Path(row["audio"]))
        return {**row, "instruction_audio": str(path.resolve())}

    def responses(self, row: dict) -> dict:
        prompt = RESPONSE_PROMPT.format(instruction=row["instruction"], labels=_labels(row),
                                        emotions=", ".join(EMOTIONS))
        messages = [{"role": "system", "content": self.cfg.system_prompt}, {"role": "user", "content": prompt}]
        for _ in range(self.cfg.llm_retries + 1):
            obj = _json_object(self.clients.llm.chat(messages))
            if obj and isinstance(obj.get("response"), str) and obj["response"].strip():
                emotion = str(obj.get("emotion", "neutral")).strip().lower()
                return {**row, "response": _one_line(obj["response"]),
                        "response_emotion": emotion if emotion in EMOTIONS else "neutral"}
        raise ItemError(f"no parsable empathetic response from the LLM for {row['id']}")

    def response_speech(self, row: dict) -> dict:
        path = step_dir(self.cfg, "response_speech") / "wavs" / f"{_safe(row['id'])}.wav"
        if not path.is_file():
            self.clients.tts.synthesize(row["response"], path, emotion=row["response_emotion"])
        return {**row, "response_audio": str(path.resolve())}

    def units(self, row: dict) -> dict:
        wav, sr = sf.read(row["response_audio"], dtype="float32", always_2d=True)
        tok = self.tokenizer
        units = tok.encode(wav.mean(axis=1), sr)
        if any(not 0 <= u < NUM_UNITS for u in units):
            raise ItemError(f"tokenizer produced units outside 0..{NUM_UNITS - 1} for {row['id']}")
        return {
            "id": row["id"],
            "messages": [
                {"role": "system", "content": self.cfg.system_prompt},
                {"role": "user", "content": [{"text": "", "audio": row["instruction_audio"], "speech_units": "",
                                              "spk_emb": ""}]},
                {"role": "assistant", "content": [{"text": row["response"], "audio": "",
                                                   "speech_units": "".join(f"<|audio_{u}|>" for u in units),
                                                   "spk_emb": ""}]},
            ],
            "meta": {**{k: row[k] for k in ("audio", "text", "emotion", "gender", "age", "instruction",
                                            "response_emotion", "response_audio") if k in row},
                     "units_tokenizer": units_tokenizer_name(tok)},
        }


def units_tokenizer_name(tok: object) -> str:
    """What made a row's units: the tokenizer's name, and the folder it was loaded from when it has one."""
    name = str(getattr(tok, "name", type(tok).__name__))
    source = getattr(tok, "source", None)
    return f"{name} ({source})" if source else name


def _safe(item_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", item_id)


def run_pipeline(cfg: PipelineConfig, clients: Clients, steps: Sequence[str] | None = None, worker: int = 0,
                 num_workers: int = 1) -> list[StepReport]:
    """Run the given steps (default all) for this worker's shards; finished work is skipped."""
    steps = list(steps or STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise PipelineError(f"unknown steps {unknown}; steps are {', '.join(STEPS)}")
    if not 0 <= worker < num_workers:
        raise PipelineError(f"worker {worker} is not in 0..{num_workers - 1}")
    work = Steps(cfg, clients)
    reports: list[StepReport] = []
    for step in steps:
        if step == "seed":
            # Every worker may deal the seed; the result is identical and written atomically.
            reports += run_seed(cfg)
            continue
        for shard in range(worker, cfg.num_shards, num_workers):
            reports.append(run_item_step(cfg, step, shard, getattr(work, step)))
    return reports


def collect_dataset(cfg: PipelineConfig, out: Path | None = None) -> Path:
    """Concatenate the finished unit shards into one training jsonl (data.py's format)."""
    paths = [shard_path(cfg, "units", s) for s in range(cfg.num_shards)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PipelineError(f"units shards not finished: {', '.join(missing)}")
    out = Path(out) if out is not None else cfg.work_dir / "dataset.jsonl"
    rows = [row for p in paths for row in read_jsonl(p)]
    write_jsonl_atomic(out, rows)
    return out
