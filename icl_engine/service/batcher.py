"""Dynamic micro-batching: classify requests that arrive together become one engine call.

A request waits in a queue; the batcher takes the oldest, waits at most `max_wait_ms` for more
(less when `max_batch_size` texts are already waiting), and runs every request with the same
engine options as ONE `Engine.classify` over all their texts, on the service's worker thread.
While that call runs, new requests queue up and form the next batch. The engine scores each
prompt as it would alone (positions come from the attention mask, so padding shifts nothing),
so a request's answer does not depend on what it was batched with (tests/test_serve.py checks
log-scores against the offline engine). When a merged call fails, its requests run one by one,
so a bad request fails alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from ..config import PipelineConfig
from .metrics import Metrics

__all__ = ["MicroBatcher"]

Run = Callable[[PipelineConfig, list[str]], list]  # (config, texts) -> one result per text, on the worker


@dataclass(eq=False)
class _Request:
    config: PipelineConfig
    key: str  # equal keys may share an engine call
    texts: list[str]
    future: asyncio.Future
    arrived: float  # event-loop time


class MicroBatcher:
    def __init__(self, run: Run, call: Callable, metrics: Metrics, *, max_batch_size: int, max_wait_ms: float):
        self.run, self.call, self.metrics = run, call, metrics  # call(fn, *args): awaits fn on the worker
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self._waiting: deque[_Request] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for r in self._waiting:
            if not r.future.done():
                r.future.set_exception(RuntimeError("the service is shutting down"))

    @property
    def depth(self) -> int:
        return sum(len(r.texts) for r in self._waiting)

    async def submit(self, config: PipelineConfig, texts: Sequence[str]) -> list:
        """One result per text, in order. Cancelling the wait (a timeout) drops the request if it
        has not been batched yet."""
        loop = asyncio.get_running_loop()
        request = _Request(config, config.key(), list(texts), loop.create_future(), loop.time())
        self._waiting.append(request)
        self.metrics.queue_texts.set(self.depth)
        self._arrived.set()
        return await request.future

    async def _next_batch(self) -> list[_Request]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = self._waiting[0].arrived + self.max_wait  # requests that queued during a call wait no longer
        while self.depth < self.max_batch_size and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
                break
        batch, n = [], 0
        while self._waiting and (not batch or n + len(self._waiting[0].texts) <= self.max_batch_size):
            r = self._waiting.popleft()
            if not r.future.done():  # its client gave up (timeout) before it was batched
                batch.append(r)
                n += len(r.texts)
        self.metrics.queue_texts.set(self.depth)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            groups: dict[str, list[_Request]] = {}
            for r in batch:
                groups.setdefault(r.key, []).append(r)
            for group in groups.values():
                await self._run_group(group)

    async def _run_group(self, group: list[_Request]) -> None:
        texts = [t for r in group for t in r.texts]
        self.metrics.batch_texts.observe(len(texts))
        self.metrics.batch_requests.observe(len(group))
        try:
            results = await self.call(self.run, group[0].config, texts)
        except Exception as e:
            if len(group) == 1:
                _settle(group[0], error=e)
                return
            for r in group:  # one by one: only the request at fault gets the error
                try:
                    _settle(r, await self.call(self.run, r.config, r.texts))
                except Exception as e1:
                    _settle(r, error=e1)
            return
        start = 0
        for r in group:
            _settle(r, results[start : start + len(r.texts)])
            start += len(r.texts)


def _settle(r: _Request, result=None, *, error: BaseException | None = None) -> None:
    if r.future.done():  # timed out meanwhile
        return
    r.future.set_exception(error) if error is not None else r.future.set_result(result)
