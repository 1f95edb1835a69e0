"""The PyTorch pipeline against what the reference implementation wrote in ../shared/golden."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from opens2s_edge.runtime.audio import load_wav
from opens2s_edge.training.generate import GenerationOptions, Generator

# The budgets the reference was run with (golden README: "a 24-token text budget and a 96-token speech budget").
BUDGET = dict(max_text_tokens=24, max_speech_tokens=96)


def _close(ours: np.ndarray, ref: np.ndarray, tol: float) -> None:
    ours, ref = np.asarray(ours, np.float64).reshape(ref.shape), np.asarray(ref, np.float64)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(ours - ref).max() / scale < tol


@pytest.fixture(scope="module")
def generator(golden_opens2s):
    return Generator(golden_opens2s)


@pytest.mark.parametrize("name", ["u1", "u2"])
def test_reference_ids_and_arrays(generator, golden_opens2s, name: str) -> None:
    golden = np.load(golden_opens2s / "golden.npz")
    wav = load_wav(golden_opens2s / f"{name}.wav")
    np.testing.assert_array_equal(wav, golden[f"{name}/wav"].reshape(-1))
    result = generator(wav, GenerationOptions(greedy=True, reference_sampling=True, **BUDGET))
    assert result.prompt_ids == golden[f"{name}/prompt_ids"].reshape(-1).tolist()
    assert result.text_ids == golden[f"{name}/text_ids"].reshape(-1).tolist()
    raw = golden[f"{name}/speech_ids_raw"].reshape(-1).tolist()
    assert result.speech_ids == [i for i in raw if not generator.vocab.is_eos(i)]
    _close(result.adapter_out, golden[f"{name}/adapter_out"], 1e-4)
    _close(result.tts_inputs, golden[f"{name}/tts_inputs"], 1e-4)
    _close(result.llm_first_logits, golden[f"{name}/llm_first_logits"], 1e-3)
    _close(result.tts_first_logits, golden[f"{name}/tts_first_logits"], 1e-3)


def test_default_sampling_stays_in_speech_vocabulary(generator, golden_opens2s) -> None:
    wav = load_wav(golden_opens2s / "u1.wav")
    raw = np.load(golden_opens2s / "golden.npz")["u1/speech_ids_raw"].reshape(-1)
    vocab = generator.vocab
    # The reference picks non-speech ids for u1 (its eos among them); the default restriction must not.
    info = json.loads((golden_opens2s / "golden.json").read_text())["inputs"][0]
    non_speech = ((raw < vocab.offset) | (raw >= vocab.offset + vocab.count)).sum()
    assert non_speech == info["n_units"] - info["units_in_audio_range"] > len(info["tts_eos_positions"])
    result = generator(wav, GenerationOptions(greedy=True))
    assert all(vocab.offset <= i < vocab.offset + vocab.count for i in result.speech_ids)
    assert result.speech_units == [i - vocab.offset for i in result.speech_ids]
    sampled = generator(wav, GenerationOptions(seed=3))
    again = generator(wav, GenerationOptions(seed=3))
    assert sampled.to_json() == again.to_json()
    assert all(vocab.offset <= i < vocab.offset + vocab.count for i in sampled.speech_ids)


def test_generate_command_on_golden(golden_opens2s) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "opens2s_edge", "generate", "--checkpoint", str(golden_opens2s),
         "--audio", str(golden_opens2s / "u1.wav"), "--greedy", "--reference-sampling", "--max-text-tokens", "24",
         "--max-speech-tokens", "96", "--json"],
        capture_output=True, text=True, check=True, timeout=300)
    reply = json.loads(out.stdout)
    golden = np.load(golden_opens2s / "golden.npz")
    assert reply["text_ids"] == golden["u1/text_ids"].reshape(-1).tolist()
    eos = json.loads((golden_opens2s / "golden.json").read_text())["checkpoint"]["tts_eos_ids"]
    assert reply["speech_ids"] == [i for i in golden["u1/speech_ids_raw"].reshape(-1).tolist() if i not in eos]
    assert set(reply) == {"text", "text_ids", "speech_ids", "speech_units", "prompt_ids"}
    assert reply["prompt_ids"] == golden["u1/prompt_ids"].reshape(-1).tolist()
    assert all(0 <= u < 16384 for u in reply["speech_units"])
