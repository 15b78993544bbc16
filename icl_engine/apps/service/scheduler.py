"""Admission, batching and the one model thread of a service.

Every piece of model work (a classify request, a generation, a search, a completion) is a Job
with a deadline. `submit` admits it only when the work queued ahead of it, priced at the
measured seconds per unit of its kind (EWMA over finished work), leaves it time to finish by its
deadline, the queue holds less than `max_queue_s` seconds of work and fewer than `max_queue`
jobs; otherwise it raises Overloaded at once (the route answers 503 with Retry-After), instead of
letting the request queue into a timeout. Before the first measurement of a kind its price is 0:
the queue's length bounds it.

The loop takes the oldest job whose deadline has not passed (an expired or abandoned one is
dropped before it reaches the LM: `icl_jobs_dropped`), and for a classify job the other classify
jobs with the same engine key that arrived within `max_wait_s`, up to `max_batch_texts` texts:
they become ONE engine call (their options may differ), run on the single worker thread inside
a cancellation scope (core/cancel.py) that stops it at the LM's next batch boundary once every
job in it is dead (deadline passed, or its client left: `abandon`). When a merged call fails,
its jobs run one by one, so a bad request fails alone.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ...core import cancel
from .metrics import Metrics

__all__ = ["Job", "Scheduler", "Overloaded"]

EWMA = 0.3  # weight of the newest measurement of seconds per unit


class Overloaded(RuntimeError):
    """Refused at admission: the queue cannot take this work in time (503, Retry-After)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    kind: str  # "classify" | "generate" | "search" | "complete": one price per kind
    units: int  # texts (classify), tokens at most (generate, complete), 1 (search)
    run: Callable[[Sequence["Job"]], list]  # on the worker thread: one result per job of the group
    deadline: float  # time.monotonic() by which its answer is due
    key: str | None = None  # classify jobs with equal keys may share an engine call
    payload: object = None  # what `run` reads of this job (texts, options)
    future: asyncio.Future | None = None
    arrived: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # its client left or gave up (set on the event loop, read on the worker)

    def dead(self, now: float | None = None) -> bool:
        return self.abandoned or (now if now is not None else time.monotonic()) >= self.deadline


class Scheduler:
    def __init__(self, metrics: Metrics, *, max_batch_texts: int, max_wait_s: float, max_queue_s: float,
                 max_queue: int):
        self.metrics = metrics
        self.max_batch_texts, self.max_wait_s = max_batch_texts, max_wait_s
        self.max_queue_s, self.max_queue = max_queue_s, max_queue
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="icl-model")
        self.price: dict[str, float] = {}  # kind -> measured seconds per unit
        self._queue: deque[Job] = deque()
        self._running: tuple[list[Job], float, float] | None = None  # (jobs, started, expected seconds)
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ the event loop's side

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for j in self._queue:
            if j.future is not None and not j.future.done():
                j.future.set_exception(RuntimeError("the service is shutting down"))
        self._queue.clear()
        self.worker.shutdown(wait=True)

    async def call(self, fn: Callable, *args):
        """Run `fn(*args)` on the model thread now, outside the queue (start-up loading)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def estimate(self, job: Job) -> float:
        return self.price.get(job.kind, 0.0) * job.units

    def backlog(self, now: float) -> float:
        """Seconds of work ahead of a job admitted now: the queue, and what is left of the running call."""
        ahead = sum(self.estimate(j) for j in self._queue if not j.dead(now))
        if self._running is not None:
            _, started, expected = self._running
            ahead += max(0.0, expected - (now - started))
        return ahead

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> asyncio.Future:
        """Admit `job` (its future resolves to its result) or raise Overloaded at once."""
        now = time.monotonic()
        wait = self.backlog(now)
        why = ("the queue is full" if len(self._queue) >= self.max_queue else
               "the queue holds too much work" if wait > self.max_queue_s else
               "it could not finish before its deadline" if now + wait + self.estimate(job) > job.deadline else None)
        if why is not None:
            self.metrics.rejected.labels(job.kind).inc()
            raise Overloaded(f"overloaded: {why} ({len(self._queue)} requests, about {wait:.1f} s of work ahead)",
                             retry_after=max(1, math.ceil(wait)))
        job.future = asyncio.get_running_loop().create_future()
        self._queue.append(job)
        self.metrics.admitted.labels(job.kind).inc()
        self._gauge()
        self._arrived.set()
        return job.future

    def abandon(self, job: Job) -> None:
        """Its client left or its deadline passed: drop it if queued, let a running call stop."""
        job.abandoned = True

    def _gauge(self) -> None:
        self.metrics.queue_jobs.set(len(self._queue))
        self.metrics.queue_texts.set(sum(j.units for j in self._queue if j.kind == "classify"))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = await self._next_group()
            if not group:
                continue
            now = time.monotonic()
            self._running = (group, now, sum(self.estimate(j) for j in group))
            try:
                outcome = await loop.run_in_executor(self.worker, self._execute, group)
            finally:
                self._running = None
            for job, (result, error) in zip(group, outcome):
                _settle(job, result, error)

    async def _next_group(self) -> list[Job]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        first = self._pop_live()
        if first is None or first.kind != "classify":
            self._gauge()
            return [first] if first is not None else []
        # requests that arrive within max_wait_s of the first join its engine call
        end = first.arrived + self.max_wait_s
        while self._texts_like(first) + first.units < self.max_batch_texts and (left := end - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
                break
        group, n = [first], first.units
        for j in list(self._queue):
            if j.kind == "classify" and j.key == first.key and n + j.units <= self.max_batch_texts:
                self._queue.remove(j)
                if j.dead():
                    self._drop(j)
                    continue
                group.append(j)
                n += j.units
        self._gauge()
        self.metrics.batch_texts.observe(n)
        self.metrics.batch_requests.observe(len(group))
        return group

    def _texts_like(self, first: Job) -> int:
        return sum(j.units for j in self._queue if j.kind == "classify" and j.key == first.key)

    def _pop_live(self) -> Job | None:
        while self._queue:
            j = self._queue.popleft()
            if not j.dead():
                return j
            self._drop(j)
        return None

    def _drop(self, job: Job) -> None:
        self.metrics.dropped.labels(job.kind).inc()
        _settle(job, None, cancel.Cancelled("dropped before it reached the model: its deadline passed or its "
                                            "client left"))

    # ------------------------------------------------------------------ the worker thread's side

    def _execute(self, group: list[Job]) -> list[tuple[object, BaseException | None]]:
        """Run a group (one engine call), then, if it failed for another reason than being
        cancelled, its jobs one by one. Measures the price of the kind."""
        started = time.monotonic()
        try:
            return self._run_group(group, started)
        finally:
            self.metrics.busy.labels(group[0].kind).inc(time.monotonic() - started)

    def _run_group(self, group: list[Job], started: float) -> list[tuple[object, BaseException | None]]:
        try:
            with cancel.scope(lambda: all(j.dead() for j in group)):
                results = group[0].run(group)
            self._measured(group, time.monotonic() - started)
            return [(r, None) for r in results]
        except cancel.Cancelled as e:
            self.metrics.cancelled.labels(group[0].kind).inc(len(group))
            return [(None, e)] * len(group)
        except Exception as e:
            if len(group) == 1:
                return [(None, e)]
        out = []
        for j in group:  # one by one: only the request at fault gets the error
            try:
                with cancel.scope(j.dead):
                    out.append((j.run([j])[0], None))
            except Exception as e:
                out.append((None, e))
        return out

    def _measured(self, group: list[Job], seconds: float) -> None:
        units = sum(j.units for j in group)
        if units > 0:
            kind, per = group[0].kind, seconds / units
            old = self.price.get(kind)
            self.price[kind] = per if old is None else (1 - EWMA) * old + EWMA * per


def _settle(job: Job, result, error: BaseException | None) -> None:
    f = job.future
    if f is None or f.done():  # its client gave up meanwhile
        return
    f.set_exception(error) if error is not None else f.set_result(result)
