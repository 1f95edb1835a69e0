"""The server's counters, written in the Prometheus text exposition format (version 0.0.4) for `GET /metrics`.

Updated only from the event loop's thread, so no locks. Written here rather than with prometheus_client: a few
counters and histograms do not justify a dependency on the device.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total:.6f}",
                  f"{self.name}_count {self.n}"]
        return lines


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Metrics:
    def __init__(self) -> None:
        self.sessions_active = 0
        self.sessions_total = 0
        self.sessions_refused: Counter[str] = Counter()
        self.turns: Counter[str] = Counter()
        self.turns_active = 0
        self.client_errors: Counter[str] = Counter()
        self.audio_out_s = 0.0
        self.wait_s = 0.0
        self.first_audio = Histogram(
            "opens2s_time_to_first_audio_seconds",
            "From the response request (response.create, or the end of speech under server VAD) to its first "
            "audio delta sent, as the server sees it.", LATENCY_BUCKETS)
        self.engine_first_audio = Histogram(
            "opens2s_engine_time_to_first_audio_seconds",
            "The engine's own time to first audio: from the turn's first step to its first audio chunk.",
            LATENCY_BUCKETS)
        self.queue = Histogram(
            "opens2s_queue_seconds",
            "From a response's submission to its first step on the engine thread.", QUEUE_BUCKETS)
        self.rtf = Histogram(
            "opens2s_rtf", "Real-time factor of completed turns: engine wall time over seconds of reply audio.",
            RTF_BUCKETS)

    def render(self, engine_busy_s: float, live_turns: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:g}" if isinstance(value, int) else f"{name}{labels} {value:.6f}"
                         for labels, value in samples)

        def by(label: str, counts: Counter[str]) -> list[tuple[str, float]]:
            return [(f'{{{label}="{key}"}}', n) for key, n in sorted(counts.items())]

        metric("opens2s_sessions_active", "gauge", "Open Realtime sessions (connections with a conversation).",
               [("", self.sessions_active)])
        metric("opens2s_sessions_total", "counter", "Realtime sessions accepted since start.",
               [("", self.sessions_total)])
        metric("opens2s_sessions_refused_total", "counter", "Connections refused, by reason.",
               by("reason", self.sessions_refused))
        metric("opens2s_turns_total", "counter",
               "Responses finished, by status (completed, incomplete, cancelled, failed, disconnected).",
               by("status", self.turns))
        metric("opens2s_turns_active", "gauge", "Responses in flight on the engine thread.", [("", live_turns)])
        for h in (self.first_audio, self.engine_first_audio, self.queue, self.rtf):
            lines.extend(h.render())
        metric("opens2s_step_wait_seconds_total", "counter",
               "Time live turns spent waiting for other sessions' steps.", [("", float(self.wait_s))])
        metric("opens2s_engine_busy_seconds_total", "counter", "Time the engine thread spent running turn steps.",
               [("", float(engine_busy_s))])
        metric("opens2s_audio_output_seconds_total", "counter", "Seconds of reply audio sent.",
               [("", float(self.audio_out_s))])
        metric("opens2s_client_errors_total", "counter", "Error events sent to clients, by code.",
               by("code", self.client_errors))
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", [("", resident_bytes())])
        return "\n".join(lines) + "\n"


__all__ = ["Histogram", "Metrics", "resident_bytes"]
