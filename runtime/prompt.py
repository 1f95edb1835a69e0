"""The OpenS2S prompt, rendered as the reference worker renders its `messages`: the checkpoint's own chat template
over the whole conversation, each user audio written as `<|im_audio_start|><|im_audio|><|im_audio_end|>`, the
rendered text split on `<|im_audio|>` (a string marker, not a token: the released tokenizer has no such token)
and each piece tokenized, with AUDIO_PLACEHOLDER_ID where an audio's embeddings go, then `<|im_tts_start|>`.

Uses the `tokenizers` library and jinja2 (sandboxed, configured as transformers configures it), no transformers.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from tokenizers import Tokenizer

from .files import read_json

AUDIO_PLACEHOLDER_ID = -200
AUDIO_MARKER = "<|im_audio|>"  # the reference's DEFAULT_AUDIO_TOKEN: split on, never tokenized
AUDIO_START_TOKEN = "<|im_audio_start|>"
AUDIO_END_TOKEN = "<|im_audio_end|>"
TTS_START_TOKEN = "<|im_tts_start|>"
TTS_END_TOKEN = "<|im_tts_end|>"
SPEECH_TOKEN_FORMAT = "<|audio_{}|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
GLM4VOICE_UNITS = 16384  # the GLM-4-Voice speech tokenizer's codebook: what `init` writes and training data holds
AUDIO_ITEM = f"{AUDIO_START_TOKEN}{AUDIO_MARKER}{AUDIO_END_TOKEN}"

_SPEECH_TOKEN = re.compile(r"^<\|audio_(\d+)\|>$")


class TokenizerError(ValueError):
    """A tokenizer folder is missing a file or a token the OpenS2S prompt needs."""


class MessageError(ValueError):
    """A conversation message that is not in the reference worker's format."""


def _read_json(path: Path) -> dict:
    data = read_json(path, TokenizerError, "tokenizer file")
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_tokenizer(folder: Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
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


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers marks assistant spans with it)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # As transformers: jinja's own tojson escapes HTML characters, chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = _strftime_now


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    # Compiled once per template text (as transformers caches it): compiling costs milliseconds every turn, and each
    # compiled template is a reference cycle left to the cycle collector.
    return _ENV.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **kwargs: object) -> str:
    """Render a Hugging Face chat template the way transformers' `apply_chat_template` does."""
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.exceptions.TemplateError as exc:
        raise TokenizerError(f"the chat template failed to render: {exc}") from exc


def message_text(content: Any, where: str = "message") -> tuple[str, int]:
    """A message's content as the reference worker flattens it, and how many audios it holds.

    A string is taken as it is; a list of items (or one item as a dict) concatenates, per item, the audio marker
    when the item has a truthy "audio", else its "text"."""
    if isinstance(content, str):
        return content, 0
    items = [content] if isinstance(content, dict) else content
    if not isinstance(items, list):
        raise MessageError(f"{where}: content must be a string, an item or a list of items, "
                           f"got {type(content).__name__}")
    text, audios = "", 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise MessageError(f"{where}: item {i} must be an object with 'audio' and/or 'text'")
        if item.get("audio"):
            text += AUDIO_ITEM
            audios += 1
        elif item.get("text"):
            if not isinstance(item["text"], str):
                raise MessageError(f"{where}: item {i} text must be a string")
            text += item["text"]
    return text, audios


@dataclass
class PromptBuilder:
    """Renders conversations to prompt ids and decodes generated text; reads a checkpoint or bundle folder."""

    tokenizer: Tokenizer
    chat_template: str
    folder: Path
    special_tokens: dict[str, str]

    @classmethod
    def from_folder(cls, folder: str | Path) -> PromptBuilder:
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one is what the worker uses
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not template or not isinstance(template, str):
            raise TokenizerError(f"{folder / 'tokenizer_config.json'} has no chat_template")
        tok = load_tokenizer(folder)
        for token in (AUDIO_START_TOKEN, AUDIO_END_TOKEN, TTS_START_TOKEN):
            _token_id(tok, token, folder)
        special = {k: v if isinstance(v, str) else v.get("content", "")
                   for k, v in config.items()
                   if k in ("bos_token", "eos_token", "unk_token", "pad_token") and isinstance(v, (str, dict))}
        return cls(tok, template, folder, special)

    def render(self, messages: Sequence[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
        """The prompt text for `messages` (the reference worker's format), ending in `<|im_tts_start|>`."""
        rendered = []
        if system_prompt:
            rendered.append({"role": "system", "content": system_prompt})
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise MessageError(f"message {i}: expected an object with a string 'role' and a 'content'")
            text, _ = message_text(m["content"], f"message {i}")
            # Other keys (tool_calls, reasoning_content) reach the template as given; the worker's have none.
            rendered.append({**m, "content": text})
        return render_chat_template(self.chat_template, rendered, add_generation_prompt=True,
                                    enable_thinking=False, **self.special_tokens) + TTS_START_TOKEN

    def encode(self, messages: Sequence[dict], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
        """Prompt ids for `messages`; each audio's place, in order, is one AUDIO_PLACEHOLDER_ID."""
        ids: list[int] = []
        for i, segment in enumerate(self.render(messages, system_prompt).split(AUDIO_MARKER)):
            if i:
                ids.append(AUDIO_PLACEHOLDER_ID)
            ids.extend(self.tokenizer.encode(segment, add_special_tokens=True).ids)
        return ids

    def prompt_ids(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT, user_text: str = "") -> list[int]:
        """Prompt for one user turn of audio (then `user_text`, if any)."""
        content = [{"audio": True}] + ([{"text": user_text}] if user_text else [])
        return self.encode([{"role": "user", "content": content}], system_prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def eos_ids(value: Any, where: str) -> tuple[int, ...]:
    """A generation config's eos_token_id (an int or a list of ints) as a tuple."""
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TokenizerError(f"{where}: eos_token_id must be a token id or a list of ids, got {value!r}")
    return tuple(ids)


@dataclass(frozen=True)
class SpeechVocab:
    """Where the speech tokens `<|audio_i|>` and the speech EOS ids sit in the TTS LM's vocabulary."""

    offset: int  # the reference's units_bias: the id of <|audio_0|>
    eos_ids: tuple[int, ...]
    count: int

    @classmethod
    def from_folder(cls, tts_folder: str | Path) -> SpeechVocab:
        """Offset and count from the TTS tokenizer, EOS from `generation_config.json` beside it."""
        tts_folder = Path(tts_folder)
        tok = load_tokenizer(tts_folder)
        offset = _token_id(tok, SPEECH_TOKEN_FORMAT.format(0), tts_folder)
        units = sorted(int(m.group(1)) for t in tok.get_vocab(with_added_tokens=True)
                       if (m := _SPEECH_TOKEN.match(t)))
        count = len(units)
        bad = [u for u in units if tok.token_to_id(SPEECH_TOKEN_FORMAT.format(u)) != offset + u]
        if units != list(range(count)) or bad:
            raise TokenizerError(f"speech tokens in {tts_folder} are not contiguous from id {offset} "
                                 f"(<|audio_0|>..<|audio_{count - 1}|>)")
        config_path = tts_folder / "generation_config.json"
        config = _read_json(config_path)
        if "eos_token_id" not in config:
            raise TokenizerError(f"{config_path} has no eos_token_id (the TTS LM's end of speech)")
        eos = eos_ids(config["eos_token_id"], str(config_path))
        inside = [i for i in eos if offset <= i < offset + count]
        if inside:
            raise TokenizerError(
                f"{config_path}: eos id {inside[0]} is a speech token (<|audio_{inside[0] - offset}|>)")
        return cls(offset=offset, eos_ids=eos, count=count)

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def to_units(self, ids: Sequence[int]) -> list[int]:
        """TTS ids -> vocoder codes; a non-speech id becomes unit 0, as the reference's decoder clamps it."""
        return [i - self.offset if self.offset <= i < self.offset + self.count else 0 for i in ids]
