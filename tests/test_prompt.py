"""The prompt renderer against transformers' own `apply_chat_template` and tokenizer on the same files.

The oracle is the reference worker's procedure run with transformers: render `messages` with the checkpoint's
template (enable_thinking=False, generation prompt), append `<|im_tts_start|>`, split on `<|im_audio|>` and
`tokenizer.encode` each piece. Our PromptBuilder does the same with the `tokenizers` library and our own jinja2
environment; the ids must be equal for every conversation, under the golden set's template, under the official
Qwen3 template `init` writes, and under a template that uses every jinja feature chat templates rely on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from opens2s_edge.runtime.prompt import (
    AUDIO_MARKER,
    AUDIO_PLACEHOLDER_ID,
    DEFAULT_SYSTEM_PROMPT,
    TTS_START_TOKEN,
    MessageError,
    PromptBuilder,
    SpeechVocab,
    TokenizerError,
    message_text,
)
from opens2s_edge.training.presets import tokenizer_assets

AUDIO = {"audio": "base64-wav"}  # any truthy value: the worker only asks whether an item has audio

CONVERSATIONS = {
    "one audio turn": [{"role": "user", "content": [AUDIO]}],
    "audio then text in one turn": [{"role": "user", "content": [AUDIO, {"text": "What do you hear?"}]}],
    "multi-turn with replies": [
        {"role": "user", "content": [AUDIO]},
        {"role": "assistant", "content": "I am sorry to hear that."},
        {"role": "user", "content": "Thank you, that helps."},
        {"role": "assistant", "content": "<think>\nthe user is calmer\n</think>\n\nYou are welcome!"},
        {"role": "user", "content": [{"text": "One more thing:"}, AUDIO]},
    ],
    "a dict item and plain strings": [
        {"role": "user", "content": {"audio": "x"}},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Numbers: 3:45 pm, the 21st of June — ünïcödé too."},
    ],
    "tool turns": [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "clock", "arguments": {"zone": "UTC", "format": "24h"}}}]},
        {"role": "tool", "content": "17:45"},
        {"role": "tool", "content": "(second result)"},
        {"role": "user", "content": [AUDIO]},
    ],
}

# Namespace objects, reversed loops, loop controls, string methods, tojson with options, tests and filters.
FEATURE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1, count=0) %}"
    "{%- for m in messages[::-1] %}{%- if m.role == 'user' %}{%- set ns.last_user = messages|length - 1"
    " - loop.index0 %}{%- break %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{%- continue %}{%- endif %}"
    "{%- set ns.count = ns.count + 1 %}"
    "{{- '<|im_start|>' + m.role | upper | lower + '\\n' }}"
    "{%- if m.content is string %}{{- m.content.strip().replace('  ', ' ') }}{%- endif %}"
    "{%- if m.tool_calls is defined %}{{- m.tool_calls | tojson(indent=2, sort_keys=True) }}{%- endif %}"
    "{%- if loop.index0 == ns.last_user %}{{- ' [last user]' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- ns.count|string + ' turns, eos ' + eos_token }}{%- endif %}"
)


def _reference_ids(tok, messages: list[dict], system: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """ModelWorker.get_input_params, with transformers doing the rendering and tokenizing."""
    rendered = [{"role": "system", "content": system}] if system else []
    for m in messages:
        text, _ = message_text(m["content"])
        rendered.append({**{k: v for k, v in m.items() if k != "content"}, "role": m["role"], "content": text})
    prompt = tok.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    ids: list[int] = []
    for i, segment in enumerate((prompt + TTS_START_TOKEN).split(AUDIO_MARKER)):
        if i:
            ids.append(AUDIO_PLACEHOLDER_ID)
        ids += tok.encode(segment)
    return ids


@pytest.fixture(scope="module")
def init_tokenizer(tmp_path_factory) -> Path:
    """The tokenizer files `init` writes (the official Qwen3 chat template)."""
    folder = tmp_path_factory.mktemp("init_tokenizer")
    files, _, _ = tokenizer_assets(32, 64)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def _folders(golden_opens2s: Path, init_tokenizer: Path, tmp_path: Path) -> dict[str, Path]:
    feature = tmp_path / "feature_template"
    shutil.copytree(init_tokenizer, feature)
    config = json.loads((feature / "tokenizer_config.json").read_text())
    (feature / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": FEATURE_TEMPLATE}))
    return {"golden": golden_opens2s, "init (official Qwen3)": init_tokenizer, "feature template": feature}


def _renders_tool_turns(name: str, messages: str) -> bool:
    # The golden set's template is the plain-turn subset of Qwen3's: it has no tool role.
    return not (name == "golden" and messages == "tool turns")


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_prompt_ids_equal_transformers(golden_opens2s: Path, init_tokenizer: Path, tmp_path: Path,
                                       conversation: str) -> None:
    for name, folder in _folders(golden_opens2s, init_tokenizer, tmp_path).items():
        if not _renders_tool_turns(name, conversation):
            continue
        tok = AutoTokenizer.from_pretrained(str(folder))
        ours = PromptBuilder.from_folder(folder)
        messages = CONVERSATIONS[conversation]
        for system in (DEFAULT_SYSTEM_PROMPT, None):
            assert ours.encode(messages, system) == _reference_ids(tok, messages, system), (name, system)
        assert ours.encode(messages).count(AUDIO_PLACEHOLDER_ID) == sum(
            message_text(m["content"])[1] for m in messages)


def test_single_turn_prompt_is_the_golden_prompt(golden_opens2s: Path) -> None:
    import numpy as np

    golden = np.load(golden_opens2s / "golden.npz")
    info = json.loads((golden_opens2s / "golden.json").read_text())["inputs"][0]
    ours = PromptBuilder.from_folder(golden_opens2s)
    assert ours.render([{"role": "user", "content": [AUDIO]}]) == info["prompt_text"]
    assert ours.prompt_ids() == golden["u1/prompt_ids"].reshape(-1).tolist()


def test_released_conventions(golden_opens2s: Path, init_tokenizer: Path) -> None:
    """No `<|im_audio|>` token (it is a split marker), the TTS eos from tts/generation_config.json, a base
    vocabulary token; `init` writes the same conventions."""
    for folder in (golden_opens2s, init_tokenizer):
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert AUDIO_MARKER not in tok.get_vocab()
        vocab = SpeechVocab.from_folder(folder / "tts")
        tts_tok = AutoTokenizer.from_pretrained(str(folder / "tts"))
        assert vocab.offset == tts_tok.encode("<|audio_0|>")[0]  # the worker's units_bias
        assert vocab.eos_ids == (tts_tok.convert_tokens_to_ids("<|im_end|>"),)
        assert all(i < vocab.offset for i in vocab.eos_ids)


def test_eos_as_int_or_list_and_bad_configs(golden_opens2s: Path, tmp_path: Path) -> None:
    tts = tmp_path / "tts"
    shutil.copytree(golden_opens2s / "tts", tts)
    config = json.loads((tts / "generation_config.json").read_text())
    for value, want in ((1002, (1002,)), ([1002, 1000], (1002, 1000))):
        (tts / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": value}))
        assert SpeechVocab.from_folder(tts).eos_ids == want
    for value, match in (("x", "eos_token_id must be"), ([], "eos_token_id must be"), (2000, "is a speech token")):
        (tts / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": value}))
        with pytest.raises(TokenizerError, match=match):
            SpeechVocab.from_folder(tts)
    (tts / "generation_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "eos_token_id"}))
    with pytest.raises(TokenizerError, match="has no eos_token_id"):
        SpeechVocab.from_folder(tts)


def test_malformed_messages_are_named(golden_opens2s: Path) -> None:
    ours = PromptBuilder.from_folder(golden_opens2s)
    for messages, match in (([{"content": "hi"}], "message 0"), ([{"role": "user", "content": 5}], "message 0"),
                            ([{"role": "user", "content": ["text"]}], "item 0")):
        with pytest.raises(MessageError, match=match):
            ours.encode(messages)
