"""PyTorch generation: speech in -> text ids + speech ids, through the shared interleave schedule.

`TorchTextDecoder` / `TorchSpeechDecoder` adapt our Qwen3 modules (static KV caches) to the
protocols in runtime/interleave.py; the schedule itself is the runtime's, so both paths decide alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opens2s_edge.runtime.audio import audio_features
from opens2s_edge.runtime.decoding import DecodeOptions, interleave_config, make_samplers
from opens2s_edge.runtime.interleave import InterleaveResult, interleave
from opens2s_edge.runtime.prompt import AUDIO_PLACEHOLDER_ID, PromptBuilder, SpeechVocab

from .checkpoint import load_checkpoint, read_generation_defaults
from .opens2s import SPEAKER_DIM, OpenS2S


def _row(t: torch.Tensor) -> np.ndarray:
    return t[0, -1].float().numpy()


class TorchTextDecoder:
    def __init__(self, model: OpenS2S, prompt_embeds: torch.Tensor):
        self.lm = model.llm_model
        self.prompt_embeds = prompt_embeds
        self.pos = 0

    def prefill(self) -> tuple[np.ndarray, np.ndarray]:
        logits, hidden = self.lm(self.prompt_embeds, 0)
        self.pos = self.prompt_embeds.shape[1]
        self.first_logits = logits[0, -1]
        self.last_hidden = hidden[:, -1:]
        return _row(logits), _row(hidden)

    def step(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        ids = torch.tensor([[token]], device=self.prompt_embeds.device)
        logits, hidden = self.lm(self.lm.embed(ids), self.pos)
        self.pos += 1
        self.last_hidden = hidden
        return _row(logits), _row(hidden)


class TorchSpeechDecoder:
    def __init__(self, model: OpenS2S, speaker: torch.Tensor | None = None):
        self.model = model
        self.lm = model.tts_lm_model
        param = model.llm2tts.weight
        self.speaker = speaker if speaker is not None else torch.zeros(1, 1, SPEAKER_DIM, dtype=param.dtype)
        self.pos = 0
        self.tts_inputs: list[torch.Tensor] = []  # projected LLM states, kept for inspection/tests
        self.first_logits: torch.Tensor | None = None

    def _run(self, embeds: torch.Tensor) -> np.ndarray:
        logits, _ = self.lm(embeds, self.pos)
        self.pos += embeds.shape[1]
        return _row(logits)

    def start(self) -> None:
        self.pos = 0
        self._run(self.lm.speaker_input(self.speaker.to(self.model.llm2tts.weight)))

    def feed_hidden(self, hidden: np.ndarray) -> np.ndarray:
        h = torch.from_numpy(hidden).to(self.model.llm2tts.weight)[None]
        projected = self.model.tts_input(h)
        self.tts_inputs.append(projected[0])
        logits = self._run(projected)
        if self.first_logits is None:
            self.first_logits = torch.from_numpy(logits)
        return logits

    def step(self, token: int) -> np.ndarray:
        ids = torch.tensor([[token]], device=self.model.llm2tts.weight.device)
        return self._run(self.lm.embed(ids))


GenerationOptions = DecodeOptions


@dataclass
class GenerationResult:
    text: str
    text_ids: list[int]
    speech_ids: list[int]  # TTS vocabulary ids, EOS excluded
    speech_units: list[int]  # vocoder codes 0..16383
    prompt_ids: list[int] = field(default_factory=list)
    adapter_out: np.ndarray | None = None
    tts_inputs: np.ndarray | None = None
    llm_first_logits: np.ndarray | None = None
    tts_first_logits: np.ndarray | None = None

    def to_json(self) -> dict:
        return {"text": self.text, "text_ids": self.text_ids, "speech_ids": self.speech_ids,
                "speech_units": self.speech_units}


class Generator:
    """A loaded checkpoint ready to answer turns. Caches are allocated once and reused."""

    def __init__(self, checkpoint: str | Path, dtype: torch.dtype = torch.float32, max_context: int = 4096):
        self.folder = Path(checkpoint)
        self.model = load_checkpoint(self.folder, dtype=dtype)
        self.prompt = PromptBuilder.from_folder(self.folder)
        self.vocab = SpeechVocab.from_folder(self.folder / "tts")
        self.defaults = read_generation_defaults(self.folder)
        self.model.llm_model.setup_cache(max_context)
        self.model.tts_lm_model.setup_cache(max_context)

    @torch.inference_mode()
    def __call__(self, wav: np.ndarray, options: GenerationOptions | None = None,
                 on_event: Callable[[str, int], None] | None = None) -> GenerationResult:
        options = options or GenerationOptions()
        model = self.model
        features, length = audio_features(wav)
        dtype = model.llm2tts.weight.dtype
        audio_embeds = model.encode_audio(torch.from_numpy(features).to(dtype), torch.tensor([length]))
        prompt_ids = self.prompt.prompt_ids(options.system_prompt)
        prompt_embeds = model.splice_prompt(prompt_ids, audio_embeds, AUDIO_PLACEHOLDER_ID)
        text_dec = TorchTextDecoder(model, prompt_embeds)
        speech_dec = TorchSpeechDecoder(model)
        text_sampler, speech_sampler = make_samplers(options, self.vocab)
        cfg = interleave_config(model.config.interleave_strategy, self.defaults, options)
        result = InterleaveResult()
        for event in interleave(text_dec, speech_dec, cfg, text_sampler, speech_sampler, result):
            if on_event is not None:
                on_event(event.kind, event.token)
        speech_ids = [i for i in result.speech_ids if i != self.vocab.eos_id]
        return GenerationResult(
            text=self.prompt.decode(result.text_ids),
            text_ids=result.text_ids,
            speech_ids=speech_ids,
            speech_units=self.vocab.to_units(speech_ids),
            prompt_ids=prompt_ids,
            adapter_out=audio_embeds.float().numpy(),
            tts_inputs=torch.cat(speech_dec.tts_inputs).float().numpy() if speech_dec.tts_inputs else None,
            llm_first_logits=getattr(text_dec, "first_logits", torch.zeros(0)).float().numpy(),
            tts_first_logits=None if speech_dec.first_logits is None else speech_dec.first_logits.numpy(),
        )
