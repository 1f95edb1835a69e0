"""`opens2s-edge serve` in a subprocess on a free loopback port, as the benchmarks and the server tests run it: the
real command, its port read from its own "listening on" line, stopped with SIGINT at the end of the block."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .harness import process_rss_bytes

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log: list[str] = field(default_factory=list)  # its stderr, line by line, for its whole life

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        """What an OpenAI SDK takes as `websocket_base_url`."""
        return f"ws://127.0.0.1:{self.port}/v1"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, str, str]:
        """(status, content type, body) of GET `path`; an HTTP error status is returned, not raised."""
        request = urllib.request.Request(self.http + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        """Every sample of GET /metrics, keyed by its name with its labels."""
        status, _, text = self.get("/metrics", headers)
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}: {text[:200]}")
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def metric(self, name: str, headers: dict | None = None) -> float:
        return self.metrics(headers).get(name, 0.0)

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.proc.pid)


@contextlib.contextmanager
def serve_process(bundle: Path, args: list[str] | tuple[str, ...] = (), *, env: dict | None = None,
                  start_timeout_s: float = 300, require_clean_exit: bool = True) -> Iterator[ServerProcess]:
    """`opens2s-edge serve BUNDLE --port 0 ARGS` until the block ends, then SIGINT (killed only if it has not exited
    60 s later). `require_clean_exit`: a status other than 0 raises, with the end of its log."""
    cmd = [sys.executable, "-m", "opens2s_edge", "serve", str(bundle), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    log: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def drain() -> None:  # keeps the pipe empty for the server's whole life
        for line in proc.stderr:
            log.append(line)
            found = LISTENING.search(line)
            if found and not port:
                port.append(int(found.group(1)))
                ready.set()
        ready.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if not ready.wait(start_timeout_s) or not port:
            raise RuntimeError("the server did not start:\n" + "".join(log[-30:]))
        yield ServerProcess(proc, port[0], log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(10)
    if require_clean_exit and proc.returncode != 0:
        raise RuntimeError(f"the server exited with status {proc.returncode}:\n" + "".join(log[-30:]))


__all__ = ["ServerProcess", "serve_process"]
