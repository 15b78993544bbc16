"""The FastAPI app: routes, errors in OpenAI's shape, the API key, metrics.

Every model call goes through the scheduler (scheduler.py): admitted or refused at once, batched,
run on the one model thread, dropped or cancelled when its deadline passes or its client leaves.
A request's failure is answered with its status and never reaches the server: user mistakes
400/404/408/413/422, an API key missing 401, overload 503 (with Retry-After), a deadline 504, a
bug 500 (logged with its traceback). Every error body is OpenAI's:
{"error": {"message": one sentence, "type": ..., "code": the status}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...core import cancel
from ...core.choices import Scoring
from ...core.config import EngineSpec, QueryOptions
from ...core.data import is_blank
from ...core.errors import one_line
from .. import indexes as index_ops
from .config import ServeConfig
from .guard import BodyGuard
from .metrics import CONTENT_TYPE, Metrics
from .scheduler import Job, Overloaded, Scheduler
from .schemas import ClassifyRequest, CompletionRequest, GenerateRequest, SearchRequest
from .state import NotFound, Service

__all__ = ["create_app", "APIError", "Context", "OPEN_PATHS", "router", "error"]

log = logging.getLogger("uvicorn.error")  # the server's own log: shown with its start-up lines
OPEN_PATHS = ("/healthz", "/readyz")  # never behind the API key: probes carry none
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               408: "timeout_error", 413: "invalid_request_error", 422: "invalid_request_error",
               499: "client_closed_request", 503: "overloaded_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, **headers):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


class Unavailable(RuntimeError):
    """The LM did not load (503)."""


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def error(status: int, message: str, *, code: str | int | None = None, **headers) -> JSONResponse:
    """OpenAI's error object; `code` is the HTTP status unless a more precise one is known."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "code": status if code is None else code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """FastAPI's list of errors -> (status, one sentence about the first)."""
    e = exc.errors()[0] if exc.errors() else {}
    if e.get("type") == "json_invalid":
        return 400, "the request body is not valid JSON"
    loc = ".".join(str(p) for p in e.get("loc", ())[1:])
    msg = str(e.get("msg", "invalid request")).removeprefix("Value error, ")
    if e.get("type") == "missing" and not loc:
        return 400, "the request needs a JSON body"
    return 422, f"{loc}: {msg}" if loc else msg


@dataclass
class Context:
    """What the routes share (one per app, at `app.state.ctx`)."""

    config: ServeConfig
    service: Service
    metrics: Metrics
    scheduler: Scheduler
    started: int = 0  # when the service started (Unix seconds): /v1/models' `created`

    def deadline(self) -> float:
        return time.monotonic() + self.config.timeout_s

    async def checked(self, fn: Callable, *args):
        """A cheap check on the event loop (index names, soft prompts), its errors mapped."""
        try:
            return fn(*args)
        except Exception as e:
            raise _api_error_of(e) from None

    async def run(self, request: Request, job: Job):
        """Admit `job`, then wait for its result until its deadline or its client leaves (the job is
        abandoned then: dropped if queued, cancelled at the next LM batch if running)."""
        if self.service.load_error:
            raise APIError(503, f"the service could not load its LM or indexes: {self.service.load_error}")
        try:
            future = self.scheduler.submit(job)
        except Overloaded as e:
            raise APIError(503, str(e), **{"Retry-After": str(int(e.retry_after))}) from None
        left = asyncio.ensure_future(_client_left(request))
        try:
            done, _ = await asyncio.wait({future, left}, timeout=max(0.0, job.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if future in done:
                try:
                    return future.result()
                except cancel.Cancelled:
                    raise APIError(504, f"no answer within {self.config.timeout_s:g} s") from None
                except Exception as e:
                    raise _api_error_of(e) from None
            self.scheduler.abandon(job)
            if left in done:
                raise APIError(499, "the client closed the connection")
            raise APIError(504, f"no answer within {self.config.timeout_s:g} s")
        finally:
            left.cancel()

    def check_texts(self, texts: Sequence[str], what: str = "text") -> None:
        """Refused before any model time: too many texts or a too long one (413), an empty one (400)."""
        most, longest = self.config.max_batch_size, self.config.max_text_chars
        if len(texts) > most:
            raise APIError(413, f"{len(texts)} texts in one request; at most {most}")
        if not texts:
            raise APIError(400, "texts is empty")
        for i, t in enumerate(texts):
            name = what if len(texts) == 1 else f"{what} {i}"
            if len(t) > longest:
                raise APIError(413, f"{name} has {len(t)} characters; at most {longest}")
            if is_blank(t):
                raise APIError(400, f"{name} is empty")

    async def load(self, on_fatal: Callable[[BaseException], None] | None,
                   on_ready: Callable[[], None] | None = None) -> None:
        try:
            await self.scheduler.call(self.service.load_sync)
        except Exception as e:
            self.service.load_error = one_line(e)
            log.error("could not load: %s", self.service.load_error)
            if on_fatal is not None:
                on_fatal(e)
            return
        if on_ready is not None:  # before /readyz says ready: no request waits on it
            on_ready()
        self.service.ready = True
        self.metrics.ready.set(1)
        log.info("ready: LM %s, indexes %s", self.config.lm, ", ".join(self.config.indexes) or "(loaded when named)")


def _api_error_of(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, NotFound):
        return APIError(404, one_line(e))
    if isinstance(e, Unavailable):
        return APIError(503, one_line(e))
    if isinstance(e, (ValueError, KeyError)):
        return APIError(400, one_line(e))
    log.error("request failed", exc_info=e)
    return APIError(500, one_line(e))


async def _client_left(request: Request) -> None:
    """Returns when the client has closed its connection (the body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(config: ServeConfig, *, on_fatal: Callable[[BaseException], None] | None = None,
               on_ready: Callable[[], None] | None = None):
    """The service's ASGI app. `on_fatal` is told when the LM or an index named at start fails to
    load (`serve` then stops the server); without it the app stays up and /readyz says why.
    `on_ready` is called once they have loaded, just before /readyz says ready (`serve` freezes
    the heap)."""
    service, metrics = Service(config), Metrics()
    scheduler = Scheduler(metrics, max_batch_texts=config.max_batch_size, max_wait_s=config.max_wait_ms / 1000,
                          max_queue_s=config.max_queue_s, max_queue=config.max_queue)
    ctx = Context(config, service, metrics, scheduler, started=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        loading = asyncio.create_task(ctx.load(on_fatal, on_ready))  # /healthz and /readyz answer meanwhile
        yield
        # uvicorn has finished the requests in flight (SIGTERM: graceful shutdown) by now
        await asyncio.gather(loading, return_exceptions=True)
        await scheduler.stop()

    app = FastAPI(title="icl_engine", version="1", lifespan=lifespan,
                  description="Retrieval-augmented in-context learning over a frozen LM.")
    app.state.ctx, app.state.service, app.state.metrics, app.state.scheduler = ctx, service, metrics, scheduler
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
    app.add_middleware(BodyGuard, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s,
                       on_refused=error)
    app.add_middleware(Gate, ctx=ctx)  # outermost: every answer is counted, a refused body too
    return app


# ----------------------------------------------------------------------------- errors, key, metrics


async def _api_error(request: Request, exc: APIError):
    return error(exc.status, exc.message, code=exc.code, **exc.headers)


async def _invalid(request: Request, exc: RequestValidationError):
    return error(*_validation_message(exc))


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail), **(exc.headers or {}))


class Gate:
    """The API key (all but OPEN_PATHS), then the request, counted and timed by its route (a
    plain ASGI middleware: the body and the client's disconnect reach the routes as they are)."""

    def __init__(self, app, ctx: Context):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        key = self.ctx.config.api_key
        if key and scope["path"] not in OPEN_PATHS and not _authorized(Request(scope), key):
            response = error(401, "a valid API key is needed: send the header Authorization: Bearer <key>",
                             **{"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            status[0] = 401
        else:
            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, receive, send_status)
        route = scope.get("route")
        self.ctx.metrics.observe(getattr(route, "path", "unmatched"), status[0], time.perf_counter() - t0)


def _authorized(request: Request, key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _value(enum):
    return None if enum is None else enum.value


# ----------------------------------------------------------------------------- routes

router = APIRouter()


@router.get("/healthz")
async def healthz():
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """200 once the LM and the indexes named at start are loaded; 503 before (or if they failed)."""
    ctx: Context = request.app.state.ctx
    service = ctx.service
    if service.ready:
        return {"ready": True, "lm": ctx.config.lm, "indexes": sorted(service.indexes)}
    body = {"ready": False, **({"error": service.load_error} if service.load_error else {"loading": True})}
    return JSONResponse(body, status_code=503)


@router.get("/metrics")
async def prometheus(request: Request):
    """Prometheus text exposition."""
    ctx: Context = request.app.state.ctx
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


def _classify_group(service: Service) -> Callable[[Sequence[Job]], list]:
    """The model-thread work of a group of classify jobs: one engine call over all their texts,
    each text with its own request's options (one LM pass for the whole group)."""
    def run(jobs: Sequence[Job]) -> list:
        spec, version = jobs[0].payload[:2]
        texts = [t for j in jobs for t in j.payload[2]]
        options = [j.payload[3] for j in jobs for _ in j.payload[2]]
        preds = service.engine_sync(spec, version).classify(texts, options)
        out, start = [], 0
        for j in jobs:
            out.append(preds[start: start + j.units])
            start += j.units
        return out
    return run


@router.post("/v1/classify")
async def classify(req: ClassifyRequest, request: Request):
    """Label, per-label probabilities, demonstrations and prompt tokens, as `icl classify --json`."""
    ctx: Context = request.app.state.ctx
    texts = [req.text] if req.text is not None else req.texts
    ctx.check_texts(texts)
    spec, version = await ctx.checked(ctx.service.spec, req.index, req.soft_prompt)
    options = QueryOptions(**{k: v for k, v in (("k", req.k), ("method", _value(req.method)),
                                                 ("calibration", _value(req.calibration)),
                                                 ("scoring", _value(req.scoring))) if v is not None},
                           batch_size=ctx.config.batch_size)
    # Cached and exact requests batch apart: they never share an LM pass anyway (the engine scores
    # them in two), and a cached request the index's KV cache cannot serve (none built, or stale)
    # then fails alone instead of with every request that shared its engine call.
    key = f"{spec.key()}@{version}" + ("#cached" if options.scoring is Scoring.CACHED else "")
    job = Job("classify", len(texts), _classify_group(ctx.service), ctx.deadline(), key=key,
              payload=(spec, version, texts, options))
    preds = await ctx.run(request, job)
    if req.labels is not None and set(req.labels) != set(preds[0].probs):
        raise APIError(400, f"labels {sorted(req.labels)} are not index {req.index!r}'s labels "
                            f"{sorted(preds[0].probs)}")
    rows = [asdict(p) for p in preds]
    return rows[0] if req.text is not None else {"predictions": rows}


def _single(fn: Callable) -> Callable[[Sequence[Job]], list]:
    return lambda jobs: [fn()]


@router.post("/v1/generate")
async def generate(req: GenerateRequest, request: Request):
    """A generation as `icl generate --json`; with "stream": true, server-sent events."""
    ctx: Context = request.app.state.ctx
    service = ctx.service
    ctx.check_texts([req.input], "input")
    spec, version = await ctx.checked(service.spec, req.index, req.soft_prompt)
    options = QueryOptions(**{k: v for k, v in (("k", req.k), ("method", _value(req.method)),
                                                 ("max_new_tokens", req.max_new_tokens)) if v is not None},
                           batch_size=ctx.config.batch_size)
    if not req.stream:
        run = _single(lambda: service.engine_sync(spec, version).generate([req.input], options)[0])
        gen = await ctx.run(request, Job("generate", options.max_new_tokens, run, ctx.deadline()))
        return asdict(gen)
    return StreamingResponse(_events(ctx, spec, version, req.input, options), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.post("/v1/search")
async def search(req: SearchRequest, request: Request):
    """The demonstrations an index holds for a text, most similar first (`icl index search --json`)."""
    ctx: Context = request.app.state.ctx
    text = req.text if req.text is not None else req.query
    ctx.check_texts([text])
    spec, version = await ctx.checked(ctx.service.spec, req.index)

    def run():
        engine = ctx.service.engine_sync(spec, version)
        return index_ops.search_loaded(engine.index, engine.embedder, text, k=req.k, mmr_lambda=req.mmr)

    hits = await ctx.run(request, Job("search", 1, _single(run), ctx.deadline()))
    headers = {"Deprecation": "true", "Warning": '299 - "query is deprecated: send text"'} if req.query else None
    return JSONResponse({"index": req.index, "hits": hits}, headers=headers)


@router.get("/v1/indexes")
async def indexes(request: Request):
    """Every index under the indexes dir, and whether this service holds it loaded."""
    ctx: Context = request.app.state.ctx
    rows = await asyncio.to_thread(index_ops.list_index_infos, indexes_dir=ctx.config.indexes_dir)
    return {"indexes": [{**r, "loaded": r["name"] in ctx.service.indexes} for r in rows]}


@router.get("/v1/indexes/{name}")
async def index_info(name: str, request: Request):
    """One index's manifest (`icl index info --json`)."""
    ctx: Context = request.app.state.ctx
    await ctx.checked(ctx.service.spec, name)
    info = await asyncio.to_thread(index_ops.index_info, name, indexes_dir=ctx.config.indexes_dir)
    return {**info, "loaded": name in ctx.service.indexes}


def _model_ids(ctx: Context) -> list[str]:
    """The names the served LM answers to: as `--lm` gave it, and its folder's name."""
    return list(dict.fromkeys([ctx.config.lm, Path(ctx.config.lm).name]))


@router.get("/v1/models")
async def models(request: Request):
    """OpenAI's model list: the one LM this service holds (every index is served with it)."""
    ctx: Context = request.app.state.ctx
    return {"object": "list", "data": [{"id": ctx.config.lm, "object": "model", "created": ctx.started,
                                         "owned_by": "icl_engine", "ready": ctx.service.ready}]}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    """OpenAI-compatible completions over the served LM (no retrieval), with `echo` and
    `logprobs` for scoring: see completions.py. `model`, when given, must name the served LM."""
    ctx: Context = request.app.state.ctx
    if req.model is not None and req.model not in _model_ids(ctx):
        raise APIError(404, f"the model {req.model!r} does not exist here; this service serves {ctx.config.lm!r} "
                            "(GET /v1/models)", code="model_not_found")
    if req.stream:
        raise APIError(400, "stream is not supported on /v1/completions; use /v1/generate (server-sent events)",
                       code="unsupported_parameter")
    prompts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
    if prompts:
        ctx.check_texts(prompts, "prompt")
    if ctx.service.lm is None:
        raise APIError(503, "the LM is still loading" if not ctx.service.load_error else
                       f"the service could not load its LM or indexes: {ctx.service.load_error}")
    from .completions import complete, prompt_ids  # (torch: loaded with the LM by now)

    rows = await ctx.checked(prompt_ids, ctx.service.lm, req.prompt)  # too long for the context: 400 now
    body = req.model_dump()
    units = len(rows) * (req.max_tokens + 1)
    return await ctx.run(request, Job("complete", units, _single(lambda: complete(ctx.service.lm, body, rows)),
                                      ctx.deadline()))


# ----------------------------------------------------------------------------- streams


async def _events(ctx: Context, spec: EngineSpec, version: str, text: str, options: QueryOptions):
    """Server-sent events of one generation: each piece as it is decoded, then the whole
    generation (`event: done`), or `event: error` with one sentence. The generation is an
    admitted job like any other: refused when overloaded, stopped at its deadline or when the
    client leaves (the stream is then closed and its job abandoned)."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def on_text(piece: str) -> None:  # on the model thread
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    def run():
        return ctx.service.engine_sync(spec, version).generate_stream(text, on_text, options)

    job = Job("generate", options.max_new_tokens, _single(run), ctx.deadline())
    try:
        future = ctx.scheduler.submit(job)
    except Overloaded as e:
        yield f"event: error\ndata: {json.dumps({'error': str(e), 'retry_after': e.retry_after})}\n\n"
        return
    future.add_done_callback(lambda _: pieces.put_nowait(None))
    try:
        while True:
            left = job.deadline - time.monotonic()
            piece = await asyncio.wait_for(pieces.get(), max(left, 0.001))
            if piece is None:
                break
            yield f"data: {json.dumps({'output': piece}, ensure_ascii=False)}\n\n"
        gen = future.result()
        yield f"event: done\ndata: {json.dumps(asdict(gen), ensure_ascii=False)}\n\n"
    except (asyncio.TimeoutError, cancel.Cancelled):
        yield f"event: error\ndata: {json.dumps({'error': f'no answer within {ctx.config.timeout_s:g} s'})}\n\n"
    except Exception as e:
        if not isinstance(e, ValueError):
            log.exception("stream failed")
        yield f"event: error\ndata: {json.dumps({'error': one_line(e)}, ensure_ascii=False)}\n\n"
    finally:
        ctx.scheduler.abandon(job)  # done, timed out, or the client left (the generator is closed)
