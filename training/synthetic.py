"""A small synthetic training set, made on the spot: espeak-ng speech of generated sentences, their
transcripts, generated assistant replies, and deterministic units of the spoken replies.

By default the units come from data_pipeline.MelQuantizer (12.5 Hz, 16384 codes), the no-weights stand-in for
GLM-4-Voice's tokenizer: such a set is for exercising the stages (the loss must fall), not for a model that speaks.
Given `speech_tokenizer` (a GLM-4-Voice tokenizer folder or tokenizer bundle) the units are GLM-4-Voice's. Every row
says which made its units (`units_tokenizer`).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soundfile as sf

from .data import units_to_text, write_jsonl_atomic
from .data_pipeline import MEL_QUANTIZER, EspeakTTS, open_units_tokenizer, units_tokenizer_name

_SUBJECTS = ("the cat", "my friend", "the teacher", "a small dog", "my sister", "the old man", "our team")
_VERBS = ("found", "lost", "painted", "opened", "watched", "carried", "cleaned")
_OBJECTS = ("a red box", "the garden", "the window", "a blue car", "the letter", "the kitchen", "a song")
_FEELINGS = ("happy", "sad", "tired", "excited", "worried", "calm")


def sentence(rng: random.Random) -> tuple[str, str]:
    """(user sentence, assistant reply): the reply depends on the sentence, so there is something to learn."""
    subj, verb, obj, feel = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS),
                             rng.choice(_FEELINGS))
    return f"{subj} {verb} {obj} and I feel {feel}", f"You feel {feel} because {subj} {verb} {obj}."


def make_synthetic_dataset(out_dir: str | Path, n: int = 8, seed: int = 0, text_only: int = 0,
                           speaker_every: int = 0, speech_tokenizer: str | Path = MEL_QUANTIZER) -> Path:
    """Write `out_dir/data.jsonl` with `n` speech rows (+ `text_only` rows whose user turn is text) and
    the wavs beside it. Every `speaker_every`-th row carries a speaker embedding (.npy). `speech_tokenizer`: a
    GLM-4-Voice tokenizer folder for real units, or MEL_QUANTIZER (the stand-in, seeded by `seed`).
    Returns the jsonl."""
    out_dir = Path(out_dir)
    wavs = out_dir / "wavs"
    wavs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tts = EspeakTTS()
    quantizer = open_units_tokenizer(speech_tokenizer, seed)
    units_name = units_tokenizer_name(quantizer)
    rows = []
    for i in range(n + text_only):
        user, reply = sentence(rng)
        reply_wav = wavs / f"reply_{i:04d}.wav"
        tts.synthesize(reply, reply_wav, emotion="neutral")
        audio, sr = sf.read(str(reply_wav), dtype="float32")
        units = quantizer.encode(audio, sr)
        assistant = {"text": reply, "audio": "", "speech_units": units_to_text(units), "spk_emb": ""}
        if speaker_every and i % speaker_every == 0:
            spk = out_dir / f"spk_{i:04d}.npy"
            np.save(spk, np.random.default_rng(seed + i).standard_normal((1, 1, 512)).astype(np.float32))
            assistant["spk_emb"] = spk.name
        if i < n:
            user_wav = wavs / f"user_{i:04d}.wav"
            tts.synthesize(user, user_wav, emotion="neutral", reference_audio=Path(f"speaker{i % 3}"))
            user_item = {"text": "", "audio": f"wavs/{user_wav.name}", "speech_units": "", "spk_emb": ""}
        else:
            user_item = {"text": user, "audio": "", "speech_units": "", "spk_emb": ""}
        rows.append({"messages": [{"role": "user", "content": [user_item]},
                                  {"role": "assistant", "content": [assistant]}],
                     "transcript": user, "units_tokenizer": units_name})
    return write_jsonl_atomic(out_dir / "data.jsonl", rows)
