"""The data construction pipeline end to end against a local OpenAI-compatible HTTP server and espeak-ng:
real HTTP requests, real subprocess TTS, resumable shards."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from opens2s_edge.training.data_pipeline import (
    STEPS,
    Clients,
    EspeakTTS,
    HTTPTTSClient,
    MelQuantizer,
    OpenAIChatClient,
    PipelineConfig,
    PipelineError,
    collect_dataset,
    read_jsonl,
    run_pipeline,
    shard_path,
)

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


class StubState:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_next = 0  # answer 503 this many times (retry path)
        self.garbage_for: set[str] = set()  # instruction substrings that get an unparsable answer


def _handler(state: StubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tts":
                t = np.arange(16000) / 16000
                wav = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
                import io

                buf = io.BytesIO()
                sf.write(buf, wav, 16000, format="WAV")
                self._send(200, buf.getvalue(), "audio/wav")
                return
            if self.path != "/v1/chat/completions":
                self._send(404, b"{}")
                return
            state.requests.append(body)
            if state.fail_next:
                state.fail_next -= 1
                self._send(503, b'{"error": "busy"}')
                return
            prompt = body["messages"][-1]["content"]
            if "Answer as JSON" in prompt:
                said = re.search(r'The user said: "(.*?)"', prompt).group(1)
                if any(g in said for g in state.garbage_for):
                    content = "I cannot answer in JSON today."
                else:
                    content = 'Sure! {"emotion": "sad", "response": "I am sorry, that sounds hard. I am here."}'
            else:
                said = re.search(r'what they once said \("(.*?)"\)', prompt).group(1)
                content = f'"Can you help me? {said}"'
            reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
            self._send(200, json.dumps(reply).encode())

    return Handler


@pytest.fixture()
def stub() -> Iterator[tuple[str, StubState]]:
    state = StubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _seed(tmp: Path, n: int) -> Path:
    tts = EspeakTTS()
    rows = []
    for i in range(n):
        wav = tmp / "seed" / f"s{i}.wav"
        text = f"this is seed sentence number {i}"
        tts.synthesize(text, wav)
        rows.append({"id": f"utt{i}", "audio": f"seed/{wav.name}", "text": text,
                     "emotion": ["happy", "sad", "angry"][i % 3], "gender": "female", "age": "adult"})
    manifest = tmp / "seed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_pipeline_end_to_end_and_resume(tmp_path: Path, stub: tuple[str, StubState]) -> None:
    url, state = stub
    manifest = _seed(tmp_path, 5)
    cfg = PipelineConfig(manifest, tmp_path / "work", num_shards=2, concurrency=2)
    llm = OpenAIChatClient(url + "/v1", model="stub", timeout=10, retry_wait=0.01)
    state.fail_next = 1  # the first request meets a 503 and is retried
    state.garbage_for = {"number 3"}  # utt3's response never parses: recorded as failed, not fatal
    clients = Clients(llm=llm, tts=EspeakTTS())

    # Stop after the LLM response step, as if the run were killed there; then finish.
    first = run_pipeline(cfg, clients, steps=STEPS[:4])
    assert {r.step for r in first} == set(STEPS[:4])
    n_requests = len(state.requests)
    assert n_requests == 5 + 1 + 5 + 2  # instructions + the retried 503 + responses + 2 retries for utt3
    rest = run_pipeline(cfg, clients)
    assert len(state.requests) == n_requests, "finished LLM steps must not be asked again"
    assert [r.status for r in rest if r.step in STEPS[:4]] == ["skipped"] * (2 + 2 * 3)
    dataset = collect_dataset(cfg)
    rows = read_jsonl(dataset)
    assert sorted(r["id"] for r in rows) == ["utt0", "utt1", "utt2", "utt4"]
    failed = [p for p in (tmp_path / "work").rglob("*.failed.jsonl")]
    assert len(failed) == 1 and "utt3" in failed[0].read_text()
    for row in rows:
        user, assistant = row["messages"][1], row["messages"][2]
        assert Path(user["content"][0]["audio"]).is_file()
        assert assistant["content"][0]["text"] == "I am sorry, that sounds hard. I am here."
        units = [int(u) for u in re.findall(r"<\|audio_(\d+)\|>", assistant["content"][0]["speech_units"])]
        wav, sr = sf.read(row["meta"]["response_audio"])
        assert abs(len(units) - len(wav) / sr * 12.5) <= 2
        assert row["meta"]["response_emotion"] == "sad"
        assert row["meta"]["instruction"].startswith("Can you help me?")

    # A third run does nothing at all.
    again = run_pipeline(cfg, clients)
    assert all(r.status == "skipped" for r in again)
    assert len(state.requests) == n_requests


def test_pipeline_resumes_inside_a_shard(tmp_path: Path, stub: tuple[str, StubState]) -> None:
    url, state = stub
    manifest = _seed(tmp_path, 3)
    cfg = PipelineConfig(manifest, tmp_path / "work", num_shards=1)
    clients = Clients(llm=OpenAIChatClient(url + "/v1", model="stub", timeout=10), tts=EspeakTTS())
    run_pipeline(cfg, clients, steps=["seed", "instructions"])
    # Simulate a kill mid-shard: one finished item and a torn line in the partial file of the next step.
    src = read_jsonl(shard_path(cfg, "instructions", 0))
    partial = shard_path(cfg, "instruction_speech", 0).with_name("shard-00000.jsonl.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    wav = partial.parent / "wavs" / "done.wav"
    EspeakTTS().synthesize("already done", wav)
    done = {**src[0], "instruction_audio": str(wav)}
    partial.write_text(json.dumps(done) + "\n" + '{"id": "torn', encoding="utf-8")
    before = len(state.requests)
    run_pipeline(cfg, clients, steps=["instruction_speech"])
    rows = read_jsonl(shard_path(cfg, "instruction_speech", 0))
    assert [r["id"] for r in rows][0] == src[0]["id"] and len(rows) == 3
    assert rows[0]["instruction_audio"] == str(wav), "the finished item was kept, not redone"
    assert len(state.requests) == before


def test_http_tts_client_and_errors(tmp_path: Path, stub: tuple[str, StubState]) -> None:
    url, _ = stub
    out = tmp_path / "a.wav"
    HTTPTTSClient(url + "/tts").synthesize("hello", out, emotion="happy")
    wav, sr = sf.read(out)
    assert sr == 16000 and len(wav) == 16000
    units = MelQuantizer().encode(wav, sr)
    assert units == MelQuantizer().encode(wav, sr) and all(0 <= u < 16384 for u in units)
    assert len(units) == 13  # 1 s at 12.5 Hz, rounded up
    with pytest.raises(PipelineError, match="HTTP 404"):
        OpenAIChatClient(url + "/nope", model="m", timeout=5).chat([{"role": "user", "content": "x"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "audio": "missing.wav", "text": "t"}\n')
    with pytest.raises(PipelineError, match=r"bad\.jsonl:1: seed audio .*missing\.wav does not exist"):
        run_pipeline(PipelineConfig(bad, tmp_path / "w"), Clients(llm=None, tts=None), steps=["seed"])
