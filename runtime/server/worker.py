"""The engine's one thread, and how the turns of several sessions share it.

The engine is not thread-safe, and a conversation's turn is an iterator whose every `next()` is one small piece of
work (an audio encode plus prefill, one LLM or TTS decode step, one token2wav chunk). So one thread owns the engine
and every conversation on it, and runs the live turns **round robin, one event each**: with k turns in flight, each
advances one step in k. Nobody waits for another session's whole reply (a one-turn-at-a-time queue would hold the
k-th session's first audio behind k-1 complete replies); instead every reply slows by the same factor while the
machine is oversubscribed. Calls that touch a conversation outside a turn (creating one, adding a message, changing
its system prompt, releasing it) run on the same thread, before the next step.

What the schedule costs is measured per turn: `queue_s` (submitted until its first step started: the wait for the
thread) and `wait_s` (the time between its own steps spent on other sessions' steps). The event loop never runs
model work; events reach it through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..decoder import ContextFull
from ..engine import TurnDone

log = logging.getLogger("opens2s_edge.serve")


@dataclass(frozen=True)
class JobEnd:
    """The last item a job posts: `error` is what stopped the turn (None: it ended normally or was cancelled)."""

    error: BaseException | None
    queue_s: float
    wait_s: float
    busy_s: float
    steps: int


class TurnJob:
    """One turn on the engine thread. Its events (the engine's, then a `JobEnd`) arrive on `events`, in the event
    loop that submitted it. `cancel()` and `abort()` are safe to call from the loop at any time."""

    def __init__(self, make_turn: Callable[[], Any], loop: asyncio.AbstractEventLoop):
        self.make_turn = make_turn
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.submitted = time.perf_counter()
        self.turn: Any = None
        self.queue_s = 0.0
        self.wait_s = 0.0
        self.busy_s = 0.0
        self.steps = 0
        self.last_end = 0.0
        self._lock = threading.Lock()
        self._cancel: int | None = None
        self._cancelled = False
        self.aborted = False

    def cancel(self, delivered_samples: int) -> None:
        """Stop at the next step; the conversation keeps the reply as far as `delivered_samples` (engine rate)."""
        with self._lock:
            self._cancelled, self._cancel = True, delivered_samples

    def abort(self) -> None:
        """The client is gone: drop the turn at the next step without finishing it (nothing more is posted)."""
        self.aborted = True

    def cancel_request(self) -> tuple[bool, int | None]:
        with self._lock:
            return self._cancelled, self._cancel

    def post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop closed (the server is shutting down): nobody is listening any more
            pass


class EngineWorker:
    """The thread that owns the engine: `call()` runs a function on it; `submit()` starts a turn that is stepped
    round robin with the other live turns."""

    def __init__(self, name: str = "opens2s-engine"):
        self._cv = threading.Condition()
        self._calls: deque[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._jobs: deque[TurnJob] = deque()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.busy_s = 0.0  # seconds the thread spent in turn steps
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def live_turns(self) -> int:
        with self._cv:
            return len(self._jobs)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the engine thread; its result (or exception) here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if self._stopped:
                raise RuntimeError("the engine thread has stopped")
            self._calls.append((fn, loop, future))
            self._cv.notify()
        return await future

    def submit(self, make_turn: Callable[[], Any]) -> TurnJob:
        """Start a turn: `make_turn()` (run on the engine thread) returns the conversation's turn iterator."""
        job = TurnJob(make_turn, asyncio.get_running_loop())
        with self._cv:
            if self._stopped:
                raise RuntimeError("the engine thread has stopped")
            self._jobs.append(job)
            self._cv.notify()
        return job

    # -- the thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopped or self._calls or self._jobs):
                    self._cv.wait()
                if self._stopped:
                    return
                call = self._calls.popleft() if self._calls else None
                job = None if call is not None else self._jobs.popleft()
            if call is not None:
                self._run_call(*call)
            elif self._step(job):
                with self._cv:
                    self._jobs.append(job)

    @staticmethod
    def _run_call(fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        def settle(ok: bool, value: Any) -> None:
            if not future.done():  # the caller may have given up (its connection closed)
                (future.set_result if ok else future.set_exception)(value)

        try:
            result = (True, fn())
        except Exception as exc:  # handed to the caller, which turns it into a client error or a log line
            result = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:
            pass

    def _step(self, job: TurnJob) -> bool:
        """Advance `job` by one event; True while it has more."""
        start = time.perf_counter()
        if job.aborted:
            job.turn = None  # closing the turn's generator rolls it back; no model work runs
            return False
        if job.turn is None:
            job.queue_s = start - job.submitted
        else:
            job.wait_s += start - job.last_end
        more = True
        try:
            if job.turn is None:
                job.turn = job.make_turn()
            cancelled, delivered = job.cancel_request()
            if cancelled:
                done = job.turn.cancel(delivered_samples=delivered)
                if done is not None:
                    job.post(done)
                more = False
            else:
                event = next(job.turn)
                job.post(event)
                more = not isinstance(event, TurnDone)
            error = None
        except StopIteration:
            more, error = False, None
        except (ValueError, ContextFull) as exc:  # a named input error: the client is told what it was
            log.info("turn refused: %s", exc)
            more, error = False, exc
        except Exception as exc:  # reported to the client as a failed response; the traceback stays in the log
            log.exception("turn failed")
            more, error = False, exc
        end = time.perf_counter()
        job.busy_s += end - start
        job.last_end = end
        job.steps += 1
        self.busy_s += end - start
        self.steps += 1
        if not more:
            job.post(JobEnd(error, job.queue_s, job.wait_s, job.busy_s, job.steps))
            job.turn = None
        return more


__all__ = ["EngineWorker", "JobEnd", "TurnJob"]
