"""Decoding options shared by the PyTorch pipeline and the runtime: samplers and budgets for one turn."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from . import cli_args
from .interleave import InterleaveConfig
from .prompt import DEFAULT_SYSTEM_PROMPT, SpeechVocab
from .sampling import Sampler, SamplingConfig


@dataclass
class GenerationDefaults:
    """The checkpoint's generation configs: EOS ids and budgets (text from the LLM's, speech from tts/)."""

    text_eos_ids: tuple[int, ...]
    max_text_tokens: int
    speech_eos_ids: tuple[int, ...]
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

    def __post_init__(self) -> None:
        """Refuse what sampling or the schedule would fail on mid-turn, naming the field."""
        self.sampling_configs()
        for name in ("max_text_tokens", "max_speech_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None for the checkpoint's), got {value!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= cli_args.SEED_MAX:
            raise ValueError(f"seed must be an integer in 0..2^63-1, got {self.seed!r}")

    def sampling_configs(self) -> tuple[SamplingConfig, SamplingConfig]:
        """The text and speech samplers' settings (SamplingConfig checks each; speech errors say `speech_`)."""
        text = SamplingConfig(self.temperature, self.top_k, self.top_p, self.greedy)
        try:
            speech = SamplingConfig(self.speech_temperature, self.speech_top_k, self.speech_top_p, self.greedy)
        except ValueError as exc:
            raise ValueError(f"speech_{exc}") from None
        return text, speech


def make_samplers(options: DecodeOptions, vocab: SpeechVocab) -> tuple[Sampler, Sampler]:
    """Text and speech samplers sharing one seeded generator, drawn in decode order on every backend."""
    rng = np.random.default_rng(options.seed)
    text_config, speech_config = options.sampling_configs()
    text = Sampler(text_config, rng)
    if options.reference_sampling:
        return text, Sampler(speech_config, rng)
    return text, Sampler(speech_config, rng, (vocab.offset, vocab.offset + vocab.count), vocab.eos_ids)


def interleave_config(strategy: str, defaults: GenerationDefaults, options: DecodeOptions) -> InterleaveConfig:
    return InterleaveConfig.from_strategy(
        strategy,
        max_text_tokens=options.max_text_tokens if options.max_text_tokens is not None else defaults.max_text_tokens,
        max_speech_tokens=(options.max_speech_tokens if options.max_speech_tokens is not None
                           else defaults.max_speech_tokens),
        text_eos_ids=tuple(defaults.text_eos_ids),
        speech_eos_ids=tuple(defaults.speech_eos_ids),
    )


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling and budget options every command that decodes takes."""
    p.add_argument("--greedy", action="store_true", help="greedy decoding for text and speech")
    p.add_argument("--reference-sampling", action="store_true",
                   help="sample speech over the whole TTS vocabulary, as the reference does")
    p.add_argument("--max-text-tokens", type=cli_args.at_least(1), default=None,
                   help="text budget (default: the checkpoint's)")
    p.add_argument("--max-speech-tokens", type=cli_args.at_least(1), default=None,
                   help="speech budget (default: the checkpoint's)")
    p.add_argument("--temperature", type=cli_args.non_negative_float, default=1.0,
                   help="text sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=cli_args.at_least(0), default=0, help="text top-k (0: off)")
    p.add_argument("--top-p", type=cli_args.probability, default=1.0, help="text nucleus mass in (0, 1] (1: off)")
    p.add_argument("--speech-temperature", type=cli_args.non_negative_float, default=1.0,
                   help="speech sampling temperature")
    p.add_argument("--seed", type=cli_args.seed, default=0, help="0..2^63-1")


def decode_options_from_args(args: argparse.Namespace, cls: type[DecodeOptions] = DecodeOptions) -> DecodeOptions:
    return cls(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               speech_temperature=args.speech_temperature, reference_sampling=args.reference_sampling,
               max_text_tokens=args.max_text_tokens, max_speech_tokens=args.max_speech_tokens, seed=args.seed)
