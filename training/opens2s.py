"""OpenS2S: audio encoder + adapter -> Qwen3 LLM -> (llm2tts, llm_ln) -> Qwen3 TTS LM.

Attribute names are the released checkpoint's prefixes (`audio_encoder_model.`, `audio_adapter.`,
`llm_model.`, `tts_lm_model.`, `llm2tts.`, `llm_ln.`), so its state dict loads strictly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from opens2s_edge.runtime.interleave import parse_strategy

from .audio_encoder import Adapter, AudioEncoder, AudioEncoderConfig
from .qwen3 import Qwen3Config, Qwen3LM

SPEAKER_DIM = 512  # the reference's spk2tts input width


@dataclass
class OpenS2SConfig:
    """Parsed view of an OpenS2S config.json; `raw` keeps every field so a save writes them all back."""

    raw: dict
    audio: AudioEncoderConfig
    llm: Qwen3Config
    tts: Qwen3Config
    adapter_inner_dim: int
    conv_kernel_sizes: list[int]
    interleave_strategy: str

    @classmethod
    def from_dict(cls, d: dict) -> OpenS2SConfig:
        for key in ("audio_encoder_config", "llm_config", "tts_lm_config"):
            if key not in d:
                raise ValueError(f"config.json has no {key!r}: not an OpenS2S (omnispeech) config")
        llm_raw, tts_raw = d["llm_config"], d["tts_lm_config"]
        for name, sub in (("llm_config", llm_raw), ("tts_lm_config", tts_raw), ("audio_encoder_config",
                                                                               d["audio_encoder_config"])):
            if not isinstance(sub, dict):
                raise ValueError(f"config.json {name} must be an object, got {type(sub).__name__}")
            if name != "audio_encoder_config" and sub.get("model_type", "qwen3") != "qwen3":
                raise ValueError(f"{name}.model_type {sub.get('model_type')!r} is not supported (qwen3 only)")
        llm = _section("llm_config", lambda: Qwen3Config.from_dict(llm_raw))
        tts = _section("tts_lm_config", lambda: Qwen3Config.from_dict(tts_raw, speaker_dim=SPEAKER_DIM))
        return cls(
            raw=copy.deepcopy(d),
            audio=_section("audio_encoder_config", lambda: AudioEncoderConfig.from_dict(d["audio_encoder_config"])),
            llm=llm,
            tts=tts,
            adapter_inner_dim=_positive(d.get("adapter_inner_dim", 512), "adapter_inner_dim"),
            conv_kernel_sizes=[_positive(k, "conv_kernel_sizes") for k in
                               str(d.get("conv_kernel_sizes", "5,5,5")).split(",")],
            interleave_strategy=_strategy(d.get("interleave_strategy", "1:2")),
        )


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _section(name: str, build: Callable[[], Any]) -> Any:
    """A sub-config, with a missing or mistyped field named as `name.field` (before any module is built from it)."""
    try:
        config = build()
    except KeyError as exc:
        raise ValueError(f"config.json {name} lacks the field {exc.args[0]!r}") from None
    except (TypeError, ZeroDivisionError) as exc:
        raise ValueError(f"config.json {name}: {exc}") from None
    for f in dataclasses.fields(config):
        kind, value = _TYPES.get(str(f.type)), getattr(config, f.name)
        if kind is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise ValueError(f"config.json {name}.{f.name} = {value!r:.40} is not {str(f.type)}")
        if kind is int and value < 0:
            raise ValueError(f"config.json {name}.{f.name} = {value} is negative")
    return config


def _positive(value: object, name: str) -> int:
    try:
        n = int(str(value).strip()) if not isinstance(value, bool) else -1
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"config.json {name} = {value!r:.40} is not a positive integer")
    return n


def _strategy(value: object) -> str:
    parse_strategy(str(value))  # refused here, at load, rather than mid-turn
    return str(value)


class OpenS2S(nn.Module):
    def __init__(self, config: OpenS2SConfig):
        super().__init__()
        self.config = config
        self.audio_encoder_model = AudioEncoder(config.audio)
        self.audio_adapter = Adapter(config.audio.d_model, config.adapter_inner_dim, config.llm.hidden_size,
                                     config.conv_kernel_sizes)
        self.llm_model = Qwen3LM(config.llm)
        self.tts_lm_model = Qwen3LM(config.tts)
        self.llm2tts = nn.Linear(config.llm.hidden_size, config.tts.hidden_size, bias=False)
        self.llm_ln = nn.LayerNorm(config.tts.hidden_size, eps=1e-5)

    def audio_embeddings(self, features: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        """Log-mel (B, n_mels, 3000*S) + valid log-mel frames (B,) -> adapter embeddings (B, 187*S+, D_llm)
        over the whole input and the valid 6.25 Hz rows (B,). Static shapes: this is the audio graph."""
        encoded, enc_lengths = self.audio_encoder_model(features, length)
        return self.audio_adapter(encoded, enc_lengths)

    def encode_audio(self, features: Tensor, length: Tensor) -> Tensor:
        """One utterance: its valid adapter embeddings (1, T6.25, D_llm)."""
        embeds, valid = self.audio_embeddings(features, length)
        return embeds[:, : int(valid[0])]

    def tts_input(self, llm_hidden: Tensor) -> Tensor:
        """LLM final-norm hidden states -> TTS LM input embeddings."""
        return self.llm_ln(self.llm2tts(llm_hidden))

    def splice_prompt(self, prompt_ids: list[int], audio_embeds: Tensor, placeholder: int) -> Tensor:
        """Prompt embeddings with the audio embeddings in place of the placeholder id: (1, T, D)."""
        ids = torch.tensor(prompt_ids)
        where = (ids == placeholder).nonzero().flatten().tolist()
        if len(where) != 1:
            raise ValueError(f"the prompt must hold exactly one audio placeholder, found {len(where)}")
        cut = where[0]
        embed = self.llm_model.embed
        device = self.llm2tts.weight.device
        before = embed(ids[:cut].to(device))
        after = embed(ids[cut + 1:].to(device))
        return torch.cat([before, audio_embeds[0].to(before.dtype), after])[None]
