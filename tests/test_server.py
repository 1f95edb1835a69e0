"""`opens2s-edge serve` driven by clients nobody here wrote: the official `openai` SDK's realtime client (turns by
server VAD and by hand in one session, a cancel, a barge-in, malformed events), Chromium running the page with a fake
microphone fed from a wav, 20 concurrent SDK sessions whose replies must equal each conversation run alone on the
engine, and the limits (API key both ways, origin, session count, message size, event rate, buffer length).

Each server is the real command in a subprocess on a free loopback port (`--port 0`), stopped by the test (SIGINT)
and required to exit cleanly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

from opens2s_edge.benchmarks.serve_process import ServerProcess as Server  # noqa: E402
from opens2s_edge.benchmarks.serve_process import serve_process  # noqa: E402
from opens2s_edge.runtime.audio import load_wav  # noqa: E402
from opens2s_edge.runtime.server.audio import ReplyEncoder, decode_pcm16, resample  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "opens2s_edge" / "assets" / "hello.wav"
CHROMIUM = "/usr/bin/chromium"
TIMEOUT = 120


# -- a server in a subprocess ------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve(bundle: Path, *args: str, env: dict | None = None) -> Iterator[Server]:
    """The real command on one thread; it must stop cleanly on SIGINT (the helper raises otherwise)."""
    with serve_process(bundle, ["--threads", "1", *args], env=env, start_timeout_s=TIMEOUT) as server:
        yield server


def _client(server: Server, key: str = "sk-dummy-local"):  # noqa: ANN202 - the SDK's own client type
    return openai.AsyncOpenAI(api_key=key, websocket_base_url=server.ws_base)


def _pcm24(wav16k: np.ndarray, gain: float = 1.0) -> bytes:
    """Our own test signal as the wire wants it: 24 kHz pcm16 (resampled here with soxr, as any client might)."""
    w24 = resample(np.asarray(wav16k, np.float32) * gain, 16000, 24000)
    return (np.clip(w24, -1, 1) * 32767).astype("<i2").tobytes()


async def _append(conn, pcm: bytes, piece_ms: int = 100) -> None:  # noqa: ANN001
    step = 24000 * 2 * piece_ms // 1000
    for i in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())


async def _until(conn, kind: str, seen: list | None = None, on_event=None) -> list:  # noqa: ANN001
    """Events up to and including the first of type `kind`."""
    events = [] if seen is None else seen
    async with asyncio.timeout(TIMEOUT):
        async for event in conn:
            events.append(event)
            if on_event is not None:
                await on_event(event)
            if event.type == kind:
                return events
    raise AssertionError(f"connection closed before {kind}: {[e.type for e in events]}")


def _reply(events: list) -> tuple[str, bytes, object]:
    """(transcript from its deltas, reply audio bytes from its deltas, response.done) of one response."""
    text = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    return text, audio, next(e for e in events if e.type == "response.done")


def _types(events: list) -> list[str]:
    return [e.type for e in events]


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def main_server(tiny_bundle: Path) -> Iterator[Server]:
    """Replies long enough (4 token2wav chunks) for a cancel to land mid-reply."""
    with serve(tiny_bundle, "--seed", "3", "--max-text-tokens", "8", "--max-speech-tokens", "40") as server:
        yield server


# -- 1. the openai SDK ---------------------------------------------------------------------------------------------
def test_openai_sdk_realtime_client_turns_cancel_and_barge_in(main_server: Server) -> None:
    from openai.types.realtime import ResponseAudioDeltaEvent, ResponseDoneEvent, SessionCreatedEvent

    hello = load_wav(HELLO)
    silence = np.zeros(16000, np.float32)

    async def scenario() -> None:
        async with _client(main_server).realtime.connect(model="opens2s-edge") as conn:
            created = await conn.recv()
            assert isinstance(created, SessionCreatedEvent)
            assert created.session.audio.input.turn_detection.type == "server_vad"
            assert created.session.audio.input.format.rate == 24000

            # Turn 1, hands-free: the wav in 100 ms pieces, then silence; server VAD ends the turn and answers.
            await _append(conn, _pcm24(np.concatenate([hello, silence])))
            events = await _until(conn, "response.done")
            kinds = _types(events)
            for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "conversation.item.added", "response.created",
                         "response.output_item.added", "response.content_part.added",
                         "response.output_audio_transcript.delta", "response.output_audio.delta",
                         "response.output_audio.done", "response.output_audio_transcript.done",
                         "response.content_part.done", "response.output_item.done"):
                assert kind in kinds, (kind, kinds)
            assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
            deltas = [e for e in events if e.type == "response.output_audio.delta"]
            assert all(isinstance(e, ResponseAudioDeltaEvent) for e in deltas)
            text, audio, done = _reply(events)
            assert isinstance(done, ResponseDoneEvent) and done.response.status in ("completed", "incomplete")
            assert text and len(audio) > 24000 * 2 * 0.5  # at least half a second of 24 kHz pcm16
            said = next(e for e in events if e.type == "response.output_audio_transcript.done").transcript
            assert said == done.response.output[0].content[0].transcript
            assert text.startswith(said.rstrip("\ufffd")[: len(text)]) or said.startswith(text)
            first_usage = done.response.usage
            assert first_usage.output_token_details.audio_tokens > 0
            assert done.model_extra["timing"]["engine_first_audio_ms"] > 0

            # Turn 2, by hand: VAD off (voice and tools are acknowledged and reported ignored), append, commit, ask.
            await conn.session.update(session={"type": "realtime", "audio": {
                "input": {"turn_detection": None}, "output": {"voice": "alloy"}},
                "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]})
            updated = (await _until(conn, "session.updated"))[-1]
            assert updated.session.audio.input.turn_detection is None
            assert {"session.audio.output.voice", "session.tools"} <= set(updated.model_extra["ignored_fields"])
            await _append(conn, _pcm24(hello))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            events = await _until(conn, "response.done")
            assert "input_audio_buffer.speech_started" not in _types(events)
            text2, audio2, done2 = _reply(events)
            assert text2 and audio2
            assert done2.response.usage.input_token_details.cached_tokens > 0  # turn 1's prefix reused, not re-run
            assert done2.response.usage.input_tokens > first_usage.input_tokens

            # Turn 3, typed, cancelled as its first audio arrives: response.done says cancelled.
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Tell me more."}]})
            await conn.response.create()

            async def cancel_on_first_audio(event) -> None:  # noqa: ANN001
                if event.type == "response.output_audio.delta" and not cancelled:
                    cancelled.append(True)
                    await conn.response.cancel()

            cancelled: list[bool] = []
            events = await _until(conn, "response.done", on_event=cancel_on_first_audio)
            text3, _, done3 = _reply(events)
            assert done3.response.status == "cancelled"
            assert done3.response.status_details.reason == "client_cancelled"
            kept = done3.response.output[0].content[0].transcript
            assert done3.response.output[0].status == "incomplete" and text3.startswith(kept)

            # Turn 4: server VAD back on; speech during a reply interrupts it (barge-in, reason turn_detected).
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
                "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200, "silence_duration_ms": 400}}}})
            await _until(conn, "session.updated")
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Go on."}]})
            await conn.response.create()
            await _append(conn, _pcm24(np.concatenate([hello, silence])))
            events = await _until(conn, "response.done")
            assert events[-1].response.status == "cancelled"
            assert events[-1].response.status_details.reason == "turn_detected"
            assert _types(events).index("input_audio_buffer.speech_started") < len(events) - 1
            # ... and the interrupting speech is the next turn, answered when it ends. The audio goes in faster than
            # real time, so its end (and commit) may come before or after the cancelled response.done.
            cut = len(events)
            events = await _until(conn, "response.done", events)
            kinds = _types(events)
            assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created", cut)
            assert events[-1].response.status in ("completed", "incomplete")

            # Malformed and unknown events get an error naming them; the session goes on.
            errors = []
            for raw in ("{not json", json.dumps({"type": "no.such.event", "event_id": "evt_42"}),
                        json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}),
                        json.dumps({"type": "conversation.item.truncate", "item_id": "x", "content_index": 0,
                                    "audio_end_ms": 10}),
                        json.dumps([1, 2]), json.dumps({"type": "response.cancel"}),
                        '{"type": "session.update", "n": ' + "9" * 5000 + "}"):
                await conn.send_raw(raw)
                errors.append((await _until(conn, "error"))[-1].error)
            assert [e.code for e in errors] == ["invalid_json", "unknown_event", "invalid_value", "unsupported_event",
                                                "invalid_event", "response_cancel_not_active", "invalid_json"]
            assert "no.such.event" in errors[1].message and errors[1].event_id == "evt_42"
            assert not any("Traceback" in e.message for e in errors)
            await conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
            assert (await _until(conn, "session.updated"))[-1].session.instructions == "Be brief."

    asyncio.run(scenario())


def test_disconnect_mid_response_frees_the_session_at_once(main_server: Server) -> None:
    async def scenario() -> None:
        async with _client(main_server).realtime.connect(model="opens2s-edge") as conn:
            await conn.recv()
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Hello!"}]})
            await conn.response.create()
            await _until(conn, "response.output_audio.delta")
        # The client is gone mid-reply: its place is free right away, and its turn stops.
        assert json.loads(main_server.get("/health")[2])["sessions"] == 0
        deadline = time.monotonic() + 5
        while main_server.metric("opens2s_turns_active") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert main_server.metric("opens2s_turns_active") == 0
        assert main_server.metric('opens2s_turns_total{status="disconnected"}') >= 1

    asyncio.run(scenario())
    status, content_type, text = main_server.get("/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    for name in ("opens2s_turns_total", "opens2s_time_to_first_audio_seconds_bucket", "opens2s_rtf_count",
                 "opens2s_sessions_active", "opens2s_queue_seconds_sum", "process_resident_memory_bytes"):
        assert name in text, name


# -- 2. the page in a real browser ---------------------------------------------------------------------------------
def test_browser_page_hands_free_transcript_and_playback(main_server: Server, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: CI installs Debian's chromium (.ci/run)")
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    mic = tmp_path / "mic.wav"  # what the fake microphone says, on a loop: silence, the question, silence
    hello = load_wav(HELLO)
    sf.write(mic, np.concatenate([np.zeros(8000, np.float32), hello, np.zeros(3 * 16000, np.float32)]), 16000,
             subtype="PCM_16")
    args = ["--no-sandbox", "--headless", "--disable-gpu", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={mic}",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
    artifacts = Path(os.environ.get("OPENS2S_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "opens2s-test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page()
            console, problems = [], []  # problems: the page's uncaught errors and console errors (a 404 included)
            page.on("console", lambda m: (console.append(m.text), m.type == "error" and problems.append(m.text)))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(main_server.http + "/")
            page.click("#start")
            page.wait_for_function("() => window.opens2s.replies.some(r => r.done && r.audioSamples > 0)"
                                   " && window.opens2s.playedSamples > 2400", timeout=90_000)
            state = page.evaluate("() => ({user: window.opens2s.userTurns, errors: window.opens2s.errors, "
                                  "played: window.opens2s.playedSamples, replies: window.opens2s.replies.map("
                                  "r => ({t: r.transcript, s: r.status, ms: r.firstAudioMs, n: r.audioSamples}))})")
            shot = artifacts / "serve_page.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert state["errors"] == [] and problems == [], (state, problems, console)
    assert state["user"] >= 1
    reply = next(r for r in state["replies"] if r["n"] > 0)
    assert reply["t"] and reply["ms"] is not None and reply["ms"] > 0
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}; first audio {reply['ms']:.0f} ms; transcript {reply['t']!r}")


# -- 3. many sessions at once --------------------------------------------------------------------------------------
def test_twenty_concurrent_sessions_equal_each_conversation_alone(tiny_bundle: Path) -> None:
    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.engine import AudioChunk, Engine, TextDelta, TurnDone, TurnOptions

    sessions, rounds = 20, 5
    hello = load_wav(HELLO)
    wire_audio = {i: _pcm24(hello, 0.4 + 0.03 * i) for i in range(sessions)}

    def user_input(i: int, k: int) -> dict:
        if k == 0:  # the first turn speaks (each session at its own loudness), the others type
            return {"type": "input_audio", "audio": base64.b64encode(wire_audio[i]).decode()}
        topic = ["cats", "rain", "jazz"][k % 3]
        return {"type": "input_text", "text": f"Session {i}, question {k}: what about {topic}?"}

    # Each conversation alone, on an engine of our own, through the server's own output conversion.
    engine = Engine.from_bundle(load_bundle(tiny_bundle), threads=1)
    options = TurnOptions(seed=7, max_text_tokens=4, max_speech_tokens=12)
    alone = {}
    for i in range(sessions):
        conv = engine.conversation()
        alone[i] = []
        for k in range(rounds):
            part = user_input(i, k)
            audio = resample(decode_pcm16(part["audio"]), 24000, 16000) if "audio" in part else None
            encoder, text, pcm, done = ReplyEncoder(engine.sample_rate), "", [], None
            for event in conv.turn(audio, part.get("text", ""), options):
                if isinstance(event, TextDelta):
                    text += event.text
                elif isinstance(event, AudioChunk):
                    pcm.append(base64.b64decode(encoder.push(event.pcm)))
                elif isinstance(event, TurnDone):
                    done = event
            pcm.append(base64.b64decode(encoder.flush()))
            alone[i].append((text, b"".join(pcm), len(done.text_ids), len(done.speech_ids), done.reused))
    del engine

    with serve(tiny_bundle, "--max-sessions", str(sessions), "--seed", "7", "--max-text-tokens", "4",
               "--max-speech-tokens", "12", "--no-server-vad") as server:
        together: dict[int, list] = {i: [] for i in range(sessions)}
        rss: list[int] = []

        async def scenario() -> None:
            client = _client(server)
            async with contextlib.AsyncExitStack() as stack:
                conns = [await stack.enter_async_context(client.realtime.connect(model="opens2s-edge"))
                         for _ in range(sessions)]
                for conn in conns:
                    assert (await conn.recv()).type == "session.created"
                # The 21st is refused with a clear reason.
                async with client.realtime.connect(model="opens2s-edge") as extra:
                    refused = await extra.recv()
                    assert refused.type == "error" and refused.error.code == "session_limit_reached"
                    with pytest.raises(ConnectionClosed) as closed:
                        await extra.recv_bytes()
                    assert closed.value.rcvd.code == 1013 and "max-sessions" in closed.value.rcvd.reason

                async def one_turn(i: int, k: int) -> None:
                    conn = conns[i]
                    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                              "content": [user_input(i, k)]})
                    await conn.response.create()
                    events = await _until(conn, "response.done")
                    assert not [e for e in events if e.type == "error"], [e.error for e in events if e.type == "error"]
                    text, audio, done = _reply(events)
                    usage = done.response.usage
                    out, cached = usage.output_token_details, usage.input_token_details.cached_tokens
                    together[i].append((text, audio, out.text_tokens, out.audio_tokens, cached))

                for k in range(rounds):  # every session asks at once, then the next round
                    await asyncio.gather(*(one_turn(i, k) for i in range(sessions)))
                    rss.append(server.rss_bytes())

        asyncio.run(scenario())
        waited = server.metric("opens2s_step_wait_seconds_total")
        health = json.loads(server.get("/health")[2])
        errors = server.metric('opens2s_turns_total{status="failed"}')

    for i in range(sessions):
        assert together[i] == alone[i], i  # same text, same audio bytes, same token counts, same reuse
    assert sum(len(t) for t in together.values()) == sessions * rounds
    assert errors == 0 and health["sessions"] == 0
    assert waited > 0  # the turns really ran interleaved, each waiting on the others' steps
    # Memory flat: once every conversation exists and has answered, 80 more turns do not grow the server (a turn or
    # a conversation kept alive by a reference cycle grew it by about 1 MiB per turn until the collector ran).
    assert rss[-1] - rss[0] < 12 << 20, [r >> 20 for r in rss]


# -- security and limits ---------------------------------------------------------------------------------------------
def test_api_key_origin_and_limits(tiny_bundle: Path) -> None:
    key = "sk-local-" + "x" * 24
    with serve(tiny_bundle, "--max-text-tokens", "2", "--max-speech-tokens", "12", "--events-per-second", "20",
               env={"OPENS2S_EDGE_API_KEY": key}) as server:
        url = server.ws_base + "/realtime?model=opens2s-edge"

        async def scenario() -> None:
            # The SDK's way (Authorization: Bearer): a wrong key is refused at the handshake, the right one works.
            with pytest.raises(InvalidStatus) as refused:
                async with _client(server, "sk-wrong").realtime.connect(model="opens2s-edge") as conn:
                    await conn.recv()
            assert refused.value.response.status_code == 401
            assert b"Traceback" not in refused.value.response.body
            async with _client(server, key).realtime.connect(model="opens2s-edge") as conn:
                assert (await conn.recv()).type == "session.created"
            # A browser's way: the key as a subprotocol beside "realtime".
            async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{key}"]) as ws:
                assert ws.subprotocol == "realtime"
                assert json.loads(await ws.recv())["type"] == "session.created"
                # Manual turns: the buffer holds at most the bundle's audio profile (30 s); a longer append is refused.
                await ws.send(json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
                assert json.loads(await ws.recv())["type"] == "session.updated"
                ten_s = base64.b64encode(np.zeros(24000 * 10, "<i2").tobytes()).decode()
                replies = []
                for _ in range(4):
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": ten_s}))
                await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                while not replies or replies[-1]["type"] != "input_audio_buffer.cleared":
                    replies.append(json.loads(await ws.recv()))
                assert [r["error"]["code"] for r in replies if r["type"] == "error"] == ["input_audio_buffer_full"]
                # Events past the rate are dropped with one error, and the session stays up.
                for _ in range(150):
                    await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                seen = []
                async with asyncio.timeout(30):
                    while "rate_limit_exceeded" not in seen:
                        event = json.loads(await ws.recv())
                        seen.append(event["error"]["code"] if event["type"] == "error" else event["type"])
                # A message over the size limit closes the connection with 1009 (message too big).
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (4 << 20)}))
                with pytest.raises(ConnectionClosed) as big:
                    while True:
                        await ws.recv()
                assert big.value.sent is not None and big.value.sent.code == 1009
            # No key at all, and a page from another origin (with the key): refused at the handshake.
            with pytest.raises(InvalidStatus) as nokey:
                await websockets.connect(url)
            assert nokey.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as foreign:
                await websockets.connect(url, additional_headers={"Origin": "http://evil.example",
                                                                  "Authorization": f"Bearer {key}"})
            assert foreign.value.response.status_code == 403

        asyncio.run(scenario())
        assert server.get("/metrics")[0] == 401
        assert server.get("/metrics", {"Authorization": f"Bearer {key}"})[0] == 200
        assert server.get("/health")[0] == 200
        status, content_type, page = server.get("/")
        assert status == 200 and content_type.startswith("text/html") and "/app.js" in page
        assert server.get("/no/such/page")[0] == 404
    assert not any("Traceback" in line for line in server.log), "".join(server.log)


def test_serve_refuses_a_taken_port_with_a_named_error(tiny_bundle: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "opens2s_edge", "serve", str(tiny_bundle), "--port", str(port),
                              "--no-warmup"], capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr


def test_serve_is_registered() -> None:
    from opens2s_edge.cli import COMMANDS, build_parser

    assert COMMANDS["serve"][0] == "opens2s_edge.runtime.cli_serve"
    args = build_parser().parse_args(["serve", "b"])
    assert (args.host, args.port, args.max_sessions, args.api_key) == ("127.0.0.1", 8000, 8, None)
