"""Decoding options shared by the PyTorch pipeline and the runtime: samplers and budgets for one turn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .interleave import InterleaveConfig
from .prompt import DEFAULT_SYSTEM_PROMPT, SpeechVocab
from .sampling import Sampler, SamplingConfig


@dataclass
class GenerationDefaults:
    """The checkpoint's generation configs: EOS ids and budgets (text from the LLM's, speech from tts/)."""

    text_eos_ids: tuple[int, ...]
    max_text_tokens: int
    speech_eos_id: int
    max_speech_tokens: int


@dataclass
class DecodeOptions:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    speech_temperature: float = 1.0
    speech_top_k: int = 0
    speech_top_p: float = 1.0
    reference_sampling: bool = False  # sample speech over the whole TTS vocabulary, as the reference does
    max_text_tokens: int | None = None
    max_speech_tokens: int | None = None
    seed: int = 0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


def make_samplers(options: DecodeOptions, vocab: SpeechVocab) -> tuple[Sampler, Sampler]:
    """Text and speech samplers sharing one seeded generator, drawn in decode order on every backend."""
    rng = np.random.default_rng(options.seed)
    text = Sampler(SamplingConfig(options.temperature, options.top_k, options.top_p, options.greedy), rng)
    speech_config = SamplingConfig(options.speech_temperature, options.speech_top_k, options.speech_top_p,
                                   options.greedy)
    if options.reference_sampling:
        return text, Sampler(speech_config, rng)
    return text, Sampler(speech_config, rng, (vocab.offset, vocab.offset + vocab.count), (vocab.eos_id,))


def interleave_config(strategy: str, defaults: GenerationDefaults, options: DecodeOptions) -> InterleaveConfig:
    return InterleaveConfig.from_strategy(
        strategy,
        max_text_tokens=options.max_text_tokens if options.max_text_tokens is not None else defaults.max_text_tokens,
        max_speech_tokens=(options.max_speech_tokens if options.max_speech_tokens is not None
                           else defaults.max_speech_tokens),
        text_eos_ids=tuple(defaults.text_eos_ids),
        speech_eos_id=defaults.speech_eos_id,
    )
