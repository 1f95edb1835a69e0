"""The OpenS2S prompt: the checkpoint's own chat template around a user audio turn, audio placeholder
spliced out, then `<|im_tts_start|>`. Uses the `tokenizers` library and jinja2, no transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from .files import read_json

AUDIO_PLACEHOLDER_ID = -200
AUDIO_TOKEN = "<|im_audio|>"
AUDIO_START_TOKEN = "<|im_audio_start|>"
AUDIO_END_TOKEN = "<|im_audio_end|>"
TTS_START_TOKEN = "<|im_tts_start|>"
TTS_END_TOKEN = "<|im_tts_end|>"
SPEECH_TOKEN_FORMAT = "<|audio_{}|>"
SPEECH_EOS_TOKEN = "<|audio_eos|>"
NUM_SPEECH_TOKENS = 16384
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class TokenizerError(ValueError):
    """A tokenizer folder is missing a file or a token the OpenS2S prompt needs."""


def _read_json(path: Path) -> dict:
    return read_json(path, TokenizerError, "tokenizer file")


def _load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"missing tokenizer file {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
        raise TokenizerError(f"{path} could not be read as a tokenizers file: {exc}") from exc


def _token_id(tok: Tokenizer, token: str, where: Path) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise TokenizerError(f"token {token!r} is not in the tokenizer at {where}")
    return i


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **kwargs: object) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed jinja2)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


@dataclass
class PromptBuilder:
    """Builds prompt ids for a turn and decodes generated text; reads a checkpoint or bundle folder."""

    tokenizer: Tokenizer
    chat_template: str
    folder: Path

    @classmethod
    def from_folder(cls, folder: str | Path) -> PromptBuilder:
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if not template:
            raise TokenizerError(f"{folder / 'tokenizer_config.json'} has no chat_template")
        tok = _load_tokenizer(folder)
        for token in (AUDIO_TOKEN, AUDIO_START_TOKEN, AUDIO_END_TOKEN, TTS_START_TOKEN):
            _token_id(tok, token, folder)
        return cls(tok, template, folder)

    def prompt_ids(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT, user_text: str = "") -> list[int]:
        """Prompt for one user audio turn; the audio's place is AUDIO_PLACEHOLDER_ID."""
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": f"{AUDIO_START_TOKEN}{AUDIO_TOKEN}{AUDIO_END_TOKEN}{user_text}"})
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=True,
                                    enable_thinking=False) + TTS_START_TOKEN
        ids: list[int] = []
        for i, segment in enumerate(text.split(AUDIO_TOKEN)):
            if i:
                ids.append(AUDIO_PLACEHOLDER_ID)
            ids.extend(self.tokenizer.encode(segment, add_special_tokens=True).ids)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


@dataclass(frozen=True)
class SpeechVocab:
    """Where the 16384 speech tokens and the speech EOS sit in the TTS LM's vocabulary."""

    offset: int
    eos_id: int
    count: int = NUM_SPEECH_TOKENS

    @classmethod
    def from_folder(cls, tts_folder: str | Path) -> SpeechVocab:
        tts_folder = Path(tts_folder)
        tok = _load_tokenizer(tts_folder)
        offset = _token_id(tok, SPEECH_TOKEN_FORMAT.format(0), tts_folder)
        last = _token_id(tok, SPEECH_TOKEN_FORMAT.format(NUM_SPEECH_TOKENS - 1), tts_folder)
        if last != offset + NUM_SPEECH_TOKENS - 1:
            raise TokenizerError(f"speech tokens in {tts_folder} are not contiguous ({offset}..{last})")
        return cls(offset=offset, eos_id=_token_id(tok, SPEECH_EOS_TOKEN, tts_folder))

    def to_units(self, ids: list[int]) -> list[int]:
        """TTS ids -> vocoder codes 0..16383; a non-speech id becomes unit 0, as the reference's decoder does."""
        return [i - self.offset if self.offset <= i < self.offset + self.count else 0 for i in ids]
