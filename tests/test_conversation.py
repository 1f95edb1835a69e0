"""Conversations on one engine: every history prompt against transformers, KV reuse against fresh prefills (the
reference's way), onnxruntime against PyTorch, barge-in rollback against a fresh conversation holding the cut
reply, independence of interleaved conversations, history trimming, the speaker vector, the VAD, the chat command.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_prompt import _reference_ids  # the transformers oracle, written once
from transformers import AutoTokenizer

from opens2s_edge.runtime.audio import load_wav
from opens2s_edge.runtime.bundle import load_bundle
from opens2s_edge.runtime.conversation import AudioPart, Conversation
from opens2s_edge.runtime.engine import AudioChunk, Engine, HistoryTrimmed, TurnDone, TurnOptions

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "opens2s_edge" / "assets" / "hello.wav"
GREEDY = dict(greedy=True, max_text_tokens=10, max_speech_tokens=40)


def _done(turn) -> TurnDone:  # noqa: ANN001
    events = list(turn)
    assert isinstance(events[-1], TurnDone)
    return events[-1]


def _worker_history(conv: Conversation) -> list[dict]:
    """The conversation's history as plain messages (audio as samples): what a fresh conversation is given."""
    out = []
    for m in conv.history:
        if m.role == "user":
            out.append({"role": "user", "content": [{"audio": p.wav} if isinstance(p, AudioPart) else {"text": p}
                                                    for p in m.parts]})
        else:
            out.append({"role": m.role, "content": m.content()})
    return out


@pytest.fixture(scope="module")
def golden_engine(golden_bundle: Path) -> Engine:
    return Engine.from_bundle(load_bundle(golden_bundle))


@pytest.fixture(scope="module")
def turns(golden_opens2s: Path) -> list[tuple[np.ndarray | None, str]]:
    u1, u2 = load_wav(golden_opens2s / "u1.wav"), load_wav(golden_opens2s / "u2.wav")
    return [(u1, ""), (None, "Thank you, that helps a lot."), (u2, "Also this:")]


def test_every_history_prompt_equals_transformers_and_reuse_equals_fresh(golden_engine: Engine, golden_opens2s,
                                                                         turns) -> None:
    tok = AutoTokenizer.from_pretrained(str(golden_opens2s))
    conv = golden_engine.conversation()
    for k, (audio, text) in enumerate(turns):
        before = _worker_history(conv)
        done = _done(conv.turn(audio, text, TurnOptions(**GREEDY)))
        # The prompt of the whole history, rendered and split as the reference worker does.
        messages = conv.messages()[:-1]
        assert done.prompt_ids == _reference_ids(tok, messages)
        # The same turn from fresh caches with the whole history prefilled (earlier audio encoded again).
        fresh = golden_engine.conversation(history=before)
        again = _done(fresh.turn(audio, text, TurnOptions(**GREEDY)))
        assert (again.text_ids, again.speech_ids) == (done.text_ids, done.speech_ids), k
        assert again.reused == 0 and again.prefilled == done.reused + done.prefilled
        if k:
            assert done.reused > 0 and done.prefilled < again.prefilled  # only the new part was computed


def test_onnxruntime_and_pytorch_conversations_agree(golden_engine: Engine, golden_opens2s: Path, turns) -> None:
    from opens2s_edge.training.generate import Generator

    ours = golden_engine.conversation()
    torch_conv = Generator(golden_opens2s, max_context=256).conversation()
    for audio, text in turns[:2]:
        a = _done(ours.turn(audio, text, TurnOptions(**GREEDY)))
        b = _done(torch_conv.turn(audio, text, TurnOptions(**GREEDY)))
        assert (a.prompt_ids, a.text_ids, a.speech_ids, a.reused) == (b.prompt_ids, b.text_ids, b.speech_ids,
                                                                       b.reused)


def test_barge_in_keeps_what_was_heard(tiny_bundle: Path) -> None:
    engine = Engine.from_bundle(load_bundle(tiny_bundle))
    wav = load_wav(HELLO)
    options = TurnOptions(greedy=True, max_text_tokens=24, max_speech_tokens=160)
    full = _done(engine.conversation().turn(wav, "", options))
    conv = engine.conversation()
    turn = conv.turn(wav, "", options)
    chunks = 0
    for event in turn:
        if isinstance(event, AudioChunk):
            chunks += 1
            if chunks == 2:
                break
    cut = turn.cancel()
    assert cut.stopped == "cancelled" and 0 < len(cut.history_text) < len(full.text)
    assert full.text.startswith(cut.history_text)
    assert conv.messages()[-1] == {"role": "assistant", "content": cut.history_text}
    # The next turn continues from what was heard: as a fresh conversation whose history holds the cut reply.
    nxt = _done(conv.turn(None, "Sorry, go on.", options))
    fresh = engine.conversation(history=_worker_history(conv)[:-2])
    again = _done(fresh.turn(None, "Sorry, go on.", options))
    assert (nxt.text_ids, nxt.speech_ids) == (again.text_ids, again.speech_ids)
    assert nxt.reused > 0


def test_cancel_before_any_audio_keeps_no_reply(tiny_bundle: Path) -> None:
    engine = Engine.from_bundle(load_bundle(tiny_bundle))
    conv = engine.conversation()
    turn = conv.turn(load_wav(HELLO), "", TurnOptions(greedy=True))
    next(turn)
    done = turn.cancel(delivered_samples=0)
    assert done.stopped == "cancelled" and done.history_text == ""
    assert [m["role"] for m in conv.messages()] == ["user"]


def test_turns_and_conversations_are_freed_without_the_cycle_collector(tiny_bundle: Path) -> None:
    """A server stops reading a turn at TurnDone and drops a conversation when its client goes: both must be freed
    by reference counting at once (with the turn's arrays and the conversation's caches), not whenever gc runs."""
    import gc
    import weakref

    engine = Engine.from_bundle(load_bundle(tiny_bundle))
    options = TurnOptions(seed=7, max_text_tokens=4, max_speech_tokens=24)
    _done(engine.conversation().turn(None, "Warm up.", options))  # first-call caches (templates) are not garbage
    gc.collect()
    gc.disable()
    try:
        conv = engine.conversation()
        for text in ("Hello!", "And then?"):
            turn = conv.turn(None, text, options)
            for event in turn:  # stop at TurnDone, as the server does, without exhausting the iterator
                if isinstance(event, TurnDone):
                    break
            turn_ref = weakref.ref(turn)
            del turn, event
            assert turn_ref() is None, "the turn outlived its consumer"
        cut = conv.turn(None, "Interrupted.", options)
        next(cut)
        cut_ref, conv_ref = weakref.ref(cut), weakref.ref(conv)
        del cut, conv  # the client went away mid-turn
        assert cut_ref() is None and conv_ref() is None, "a dropped conversation waited for the cycle collector"
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_interleaved_conversations_are_independent(tiny_bundle: Path) -> None:
    engine = Engine.from_bundle(load_bundle(tiny_bundle))
    wav = load_wav(HELLO)
    other = np.sin(np.linspace(0, 3000, 30000)).astype(np.float32) * 0.2
    script = {"a": [(wav, ""), (None, "And then?")], "b": [(other, ""), (None, "Tell me more.")]}
    options = TurnOptions(seed=7, max_text_tokens=12, max_speech_tokens=48)
    alone = {}
    for name, turns in script.items():
        conv = engine.conversation()
        alone[name] = [_done(conv.turn(a, t, options)).speech_ids for a, t in turns]
    convs = {name: engine.conversation() for name in script}
    together = {name: [] for name in script}
    for k in range(2):
        iters = {name: convs[name].turn(*script[name][k], options) for name in script}
        live = dict(iters)
        while live:  # step by step, alternating between the two conversations
            for name in list(live):
                event = next(live[name], None)
                if event is None:
                    del live[name]
                elif isinstance(event, TurnDone):
                    together[name].append(event.speech_ids)
    assert together == alone


def test_history_is_trimmed_when_it_no_longer_fits(golden_engine: Engine) -> None:
    conv = golden_engine.conversation()
    long_text = "I am so sorry to hear that you had a hard day; it is understandable to feel tired. " * 2
    trimmed = []
    for _ in range(6):
        events = list(conv.turn(None, long_text, TurnOptions(greedy=True, max_text_tokens=8, max_speech_tokens=8)))
        trimmed += [e for e in events if isinstance(e, HistoryTrimmed)]
        assert isinstance(events[-1], TurnDone)
    assert trimmed and all(e.dropped > 0 for e in trimmed)
    assert conv.llm.pos <= conv.llm.max_len


def test_speaker_vector_changes_speech_like_pytorch(golden_engine: Engine, golden_opens2s: Path) -> None:
    from opens2s_edge.training.generate import Generator

    speaker = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    wav = load_wav(golden_opens2s / "u1.wav")
    plain = _done(golden_engine.conversation().turn(wav, "", TurnOptions(**GREEDY)))
    ours = _done(golden_engine.conversation(speaker=speaker).turn(wav, "", TurnOptions(**GREEDY)))
    theirs = _done(Generator(golden_opens2s, max_context=256).conversation(speaker=speaker).turn(
        wav, "", TurnOptions(**GREEDY)))
    assert ours.text_ids == plain.text_ids and ours.speech_ids != plain.speech_ids
    assert ours.speech_ids == theirs.speech_ids


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="needs espeak-ng, sox")
def test_vad_finds_speech_between_known_silences(tmp_path: Path) -> None:
    import soundfile as sf

    from opens2s_edge.runtime.vad import SAMPLE_RATE, speech_segments

    pieces, truth, pos = [], [], 0
    for i, (text, gap) in enumerate([("Hello there, how are you today?", 0.7),
                                     ("I failed my exam and I feel terrible.", 1.3), ("Thank you.", 0.9)]):
        raw, trimmed = tmp_path / f"{i}.wav", tmp_path / f"{i}t.wav"
        subprocess.run(["espeak-ng", "-w", str(raw), text], check=True)
        # Trimmed to the speech itself, so the silences between are exactly the ones inserted.
        subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", str(trimmed), "silence", "1", "0.02",
                        "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse"], check=True)
        speech, _ = sf.read(trimmed, dtype="float32")
        pieces += [np.zeros(int(gap * SAMPLE_RATE), np.float32), speech]
        pos += int(gap * SAMPLE_RATE)
        truth.append((pos, pos + speech.size))
        pos += speech.size
    pieces.append(np.zeros(SAMPLE_RATE, np.float32))
    found = speech_segments(np.concatenate(pieces))
    assert len(found) == len(truth)
    for (s, e), (ts, te) in zip(found, truth, strict=True):
        assert abs(s - ts) <= 0.1 * SAMPLE_RATE and abs(e - te) <= 0.1 * SAMPLE_RATE, (s, e, ts, te)


def test_chat_command_runs_a_conversation_from_stdin(tiny_bundle: Path, tmp_path: Path) -> None:
    lines = [str(HELLO), "Thank you, that helps.", "/history", f"/save {tmp_path / 'conv.jsonl'}", "/reset",
             "Hello again."]
    run = subprocess.run([sys.executable, "-m", "opens2s_edge", "chat", str(tiny_bundle), "--json", "--greedy",
                          "--max-text-tokens", "8", "--max-speech-tokens", "30", "--out-dir", str(tmp_path / "out")],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    history = next(json.loads(line) for line in run.stdout.splitlines() if line.startswith("["))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert len(rows) == 3
    for row in rows:
        assert {"text", "text_ids", "speech_ids", "speech_units", "prompt_ids", "reused", "prefilled",
                "latency"} <= set(row)
    assert rows[0]["prompt_ids"].count(-200) == 1 and rows[1]["prompt_ids"].count(-200) == 1
    assert rows[1]["reused"] > 0 and rows[2]["reused"] < rows[1]["reused"]  # /reset forgot the history
    saved = json.loads((tmp_path / "conv.jsonl").read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert (tmp_path / saved["messages"][1]["content"][0]["audio"]).is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["reply_001.wav", "reply_002.wav",
                                                                     "reply_003.wav"]
