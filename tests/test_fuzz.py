"""Fuzzing every parser a user's bytes cross (hypothesis): the only outcomes allowed are a result or the parser's
named error; each case has a deadline, so a hang fails too. The inputs tried per parser are counted and checked.

Parsers: the wav reader, the speech-token list, the bundle manifest (bytes and structure), the decoder's
config.yaml, the checkpoint's config.json, the prompt renderer's messages, the realtime server's client events
(session.update, conversation.item.create, response.max_output_tokens).
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opens2s_edge.cli import UserError
from opens2s_edge.runtime.audio import AudioInputError, load_wav
from opens2s_edge.runtime.bundle import BundleError, read_manifest
from opens2s_edge.runtime.manifest import Manifest, ManifestError
from opens2s_edge.runtime.prompt import MessageError, PromptBuilder, TokenizerError
from opens2s_edge.runtime.server.protocol import (
    Message,
    ProtocolError,
    SessionConfig,
    error_event,
    parse_item,
    parse_max_output_tokens,
    parse_session_update,
    parse_turn_detection,
)
from opens2s_edge.training.opens2s import OpenS2SConfig
from opens2s_edge.training.token2wav.cli import parse_tokens
from opens2s_edge.training.token2wav.config import DecoderConfigError, parse_config

EXAMPLES = 100
FUZZ = settings(max_examples=EXAMPLES, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TRIED: dict[str, int] = {}


def _count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def wav_bytes(workdir: Path) -> bytes:
    sf.write(workdir / "seed.wav", (np.sin(np.arange(4000) / 7) * 0.3).astype(np.float32), 16000, subtype="PCM_16")
    return (workdir / "seed.wav").read_bytes()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out[: max(0, len(out) - cut)])


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
       cut=st.integers(0, 9000), junk=st.binary(max_size=64))
def test_wav_reader(workdir: Path, wav_bytes: bytes, edits: list, cut: int, junk: bytes) -> None:
    _count("wav reader")
    path = workdir / "case.wav"
    path.write_bytes(_mutate(wav_bytes, edits, cut) + junk)
    try:
        wav = load_wav(path)
    except AudioInputError:
        return
    assert wav.dtype == np.float32 and wav.ndim == 1


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.lists(st.integers(-5, 20000), max_size=60).map(
    lambda xs: ", ".join(map(str, xs)))))
def test_token_parser(text: str) -> None:
    _count("token list")
    try:
        tokens = parse_tokens(text)
    except UserError:
        return
    assert tokens.dtype == np.int64 and tokens.ndim == 1 and tokens.size > 0


@pytest.fixture(scope="module")
def manifest(tiny_bundle: Path) -> dict:
    return json.loads((tiny_bundle / "manifest.json").read_text())


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(
    max_size=8), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _paths(d: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_manifest_structure(manifest: dict, data: st.DataObject) -> None:
    _count("manifest structure")
    m = copy.deepcopy(manifest)
    paths = [p for p in _paths(m) if p]
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(paths))
        parent = m
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(_JSON)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        spec = Manifest.from_json(m)
    except ManifestError:
        return
    assert isinstance(spec.graphs, dict)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_manifest_bytes(workdir: Path, raw: bytes) -> None:
    _count("manifest bytes")
    folder = workdir / "bundle"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_bytes(raw)
    try:
        read_manifest(folder)
    except BundleError:
        return


@pytest.fixture(scope="module")
def yaml_text(golden_decoder: Path) -> str:
    return (golden_decoder / "config.yaml").read_text()


@FUZZ
@given(data=st.data())
def test_decoder_config(yaml_text: str, data: st.DataObject) -> None:
    _count("decoder config.yaml")
    lines = yaml_text.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            del lines[i]
        elif choice == 1:
            lines[i] = lines[i].split(":")[0] + ": " + data.draw(st.sampled_from(
                ["-1", "0", "1e9", "'x'", "[]", "{}", "!ref <nope>", "!new:x.Y", "null", "[1, [2]]"]))
        elif choice == 2:
            lines.insert(i, data.draw(st.text(max_size=20)))
        else:
            lines[i] = "  " + lines[i]
    try:
        parse_config("\n".join(lines))
    except DecoderConfigError:
        return


@pytest.fixture(scope="module")
def checkpoint_config(golden_opens2s: Path) -> dict:
    return json.loads((golden_opens2s / "config.json").read_text())


@FUZZ
@given(data=st.data())
def test_checkpoint_config(checkpoint_config: dict, data: st.DataObject) -> None:
    _count("checkpoint config.json")
    d = copy.deepcopy(checkpoint_config)
    section = data.draw(st.sampled_from(["llm_config", "tts_lm_config", "audio_encoder_config", None]))
    target = d if section is None else d[section]
    key = data.draw(st.sampled_from(sorted(target)))
    if data.draw(st.booleans()):
        del target[key]
    else:
        target[key] = data.draw(_JSON)
    try:
        OpenS2SConfig.from_dict(d)
    except ValueError:
        return


@pytest.fixture(scope="module")
def prompt(golden_opens2s: Path, workdir: Path) -> PromptBuilder:
    return PromptBuilder.from_folder(shutil.copytree(golden_opens2s, workdir / "tok", dirs_exist_ok=True))


_ITEM = st.fixed_dictionaries({}, optional={"audio": _JSON, "text": _JSON})
_MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", 3, None]),
                                               "content": st.one_of(st.text(max_size=40), _ITEM,
                                                                    st.lists(_ITEM, max_size=3), _JSON)})


@FUZZ
@given(messages=st.lists(_MESSAGE, max_size=4), system=st.one_of(st.none(), st.text(max_size=20)))
def test_prompt_renderer(prompt: PromptBuilder, messages: list, system: str | None) -> None:
    _count("prompt messages")
    try:
        ids = prompt.encode(messages, system)
    except (MessageError, TokenizerError):
        return
    assert all(isinstance(i, int) for i in ids)


# -- the realtime server's client events ------------------------------------------------------------------------
# What a client can send: any JSON (Python's json also reads NaN and Infinity), any text, and valid events with one to
# three fields made wrong: deleted, given a value of another type or range, or given junk keys beside them.
_WIRE = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=4), max_leaves=12)
_JUNK = st.one_of(_WIRE, st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.sampled_from([
    float("nan"), float("inf"), -float("inf"), 1e308, 10**400, 2**63, -1, 0, 0.5, 24000, [], {}, ["audio"], "",
    "inf", "auto", "none", "audio/pcm", "audio/pcmu", "server_vad", "semantic_vad", "realtime", "message",
    "function_call", "user", "assistant", "system", "input_audio", "output_audio", "AAAA", "AAA"]))
_FORMAT = st.just({"type": "audio/pcm", "rate": 24000})
_VAD = st.fixed_dictionaries({"type": st.just("server_vad")}, optional={
    "threshold": st.floats(0.05, 0.95), "prefix_padding_ms": st.integers(0, 5000),
    "silence_duration_ms": st.integers(1, 10000), "create_response": st.booleans(),
    "interrupt_response": st.booleans(), "idle_timeout_ms": st.none()})
_SESSION = st.fixed_dictionaries({"type": st.just("realtime")}, optional={
    "instructions": st.text(max_size=20),
    "output_modalities": st.sampled_from([["audio"], ["text"], ["audio", "text"]]),
    "max_output_tokens": st.one_of(st.just("inf"), st.integers(1, 4096)), "tools": st.just([]),
    "tool_choice": st.just("auto"), "model": st.just("opens2s-edge"),
    "audio": st.fixed_dictionaries({}, optional={
        "input": st.fixed_dictionaries({}, optional={"format": _FORMAT, "turn_detection": st.one_of(st.none(), _VAD),
                                                     "noise_reduction": st.none(), "transcription": st.none()}),
        "output": st.fixed_dictionaries({}, optional={"format": _FORMAT, "voice": st.sampled_from(["alloy", "marin"]),
                                                      "speed": st.sampled_from([1.0, 1.25])})})})
_PCM = st.binary(min_size=2, max_size=96).map(lambda b: base64.b64encode(b[: len(b) // 2 * 2]).decode())
_TEXT = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "text", "output_text"]),
                               "text": st.text(max_size=12)})
_AUDIO = st.fixed_dictionaries({"type": st.just("input_audio"), "audio": _PCM},
                               optional={"transcript": st.one_of(st.none(), st.text(max_size=12))})
_SPOKEN = st.fixed_dictionaries({"type": st.just("output_audio"), "transcript": st.text(max_size=12)})
_ID = {"id": st.text(min_size=1, max_size=64)}
_ITEM = st.one_of(*(st.fixed_dictionaries({"type": st.just("message"), "role": st.just(role),
                                           "content": st.lists(part, min_size=1, max_size=3)}, optional=_ID)
                    for role, part in (("user", st.one_of(_TEXT, _AUDIO)), ("assistant", st.one_of(_TEXT, _SPOKEN)),
                                       ("system", _TEXT))))


def _decoded(text: str) -> object:
    """A frame's text as the server reads it: JSON when it is, else the string itself."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def _corrupted(data: st.DataObject, event: dict) -> tuple[object, int]:
    """`event` with up to three of its fields made wrong, and how many were."""
    event = copy.deepcopy(event)
    n = data.draw(st.integers(0, 3))
    for _ in range(n):
        paths = [p for p in _paths(event) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = event
        for key in path[:-1]:
            parent = parent[key]
        how = data.draw(st.integers(0, 2))
        if how == 0:
            del parent[path[-1]]
        elif how == 1 or not isinstance(parent[path[-1]], dict):
            parent[path[-1]] = copy.deepcopy(data.draw(_JUNK))  # sampled values are shared objects
        else:
            parent[path[-1]][data.draw(st.text(max_size=8))] = copy.deepcopy(data.draw(_JUNK))
    if data.draw(st.integers(0, 9)) == 0:  # now and then not an event at all: any JSON, text, or bytes
        return data.draw(st.one_of(_JUNK, st.text(max_size=60).map(_decoded), st.binary(max_size=40))), -1
    return event, n


def _named(exc: ProtocolError) -> None:
    """The refusal becomes an `error` event: it must carry a code, a message and valid JSON."""
    assert exc.code and isinstance(exc.message, str) and exc.message
    json.dumps(error_event(exc.code, exc.message, exc.param), allow_nan=False)


@FUZZ
@given(data=st.data())
def test_realtime_session_update(data: st.DataObject) -> None:
    _count("realtime session.update")
    session, wrong = _corrupted(data, data.draw(_SESSION))
    current = SessionConfig("You are a helpful assistant.")
    try:
        config, ignored = parse_session_update(current, session, vad_available=True)
    except ProtocolError as exc:
        assert wrong != 0, exc  # a valid session.update is taken
        _named(exc)
    else:
        assert isinstance(config, SessionConfig) and all(isinstance(name, str) for name in ignored)
        json.dumps(config.to_json("sess_1", "opens2s-edge"), allow_nan=False)  # what session.updated sends
    turn, _ = _corrupted(data, data.draw(_VAD))
    try:
        parse_turn_detection(turn, current.turn_detection)
    except ProtocolError as exc:
        _named(exc)
    limit = data.draw(st.one_of(st.integers(-10, 5000), _JUNK))
    try:
        value = parse_max_output_tokens(limit, "response.max_output_tokens")
    except ProtocolError as exc:
        _named(exc)
    else:
        assert value is None or 1 <= value <= 4096


@FUZZ
@given(data=st.data(), rate=st.sampled_from([16000, 24000]))
def test_realtime_item_create(data: st.DataObject, rate: int) -> None:
    _count("realtime conversation.item.create")
    item, wrong = _corrupted(data, data.draw(_ITEM))
    try:
        message = parse_item(item, rate)
    except ProtocolError as exc:
        assert wrong != 0, exc  # a valid item is taken
        _named(exc)
        return
    assert isinstance(message, Message) and message.parts
    assert all(isinstance(p, str) or (isinstance(p, np.ndarray) and p.dtype == np.float32) for p in message.parts)
    json.dumps(message.item(), allow_nan=False)  # what conversation.item.added sends
    message.turn_input()


_PCM_SAMPLE = base64.b64encode(b"\x01\x00" * 64).decode()


@pytest.mark.parametrize("parse", [
    lambda: parse_session_update(SessionConfig(""), {"output_modalities": float("nan")}, True),  # was a TypeError
    lambda: parse_session_update(SessionConfig(""), {"output_modalities": 3}, True),
    lambda: parse_turn_detection({"prefix_padding_ms": float("inf")}, None),  # was an OverflowError
    lambda: parse_turn_detection({"silence_duration_ms": float("nan")}, None),  # was a ValueError
    lambda: parse_turn_detection({"threshold": 10**400}, None),  # was an OverflowError
    lambda: parse_item({"role": "user", "content": [{"type": "input_audio", "audio": _PCM_SAMPLE,
                                                      "transcript": float("nan")}]}, 16000),  # echoed NaN: not JSON
])
def test_realtime_fuzz_findings(parse) -> None:  # noqa: ANN001
    """What fuzzing the event parsers found, kept as cases: each is now the protocol's named error."""
    with pytest.raises(ProtocolError) as refused:
        parse()
    _named(refused.value)


def test_every_parser_was_fuzzed() -> None:
    """Runs after the fuzz tests in this file: each tried its full count of inputs."""
    print("fuzz inputs tried:", json.dumps(TRIED))
    assert len(TRIED) == 9 and all(n >= EXAMPLES for n in TRIED.values()), TRIED
