"""The FastAPI app: routes, errors as `{"error": "one sentence"}`, the API key, metrics.

Every model call runs on the service's one worker thread (state.py); classify requests go
through the micro-batcher first. A request's failure is answered with its status and never
reaches the server: user mistakes 400/404/413/422, an API key missing 401, a timeout 504, a
bug 500 (logged with its traceback).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import api
from ..errors import one_line
from .batcher import MicroBatcher
from .completions import complete
from .config import ServeConfig
from .metrics import CONTENT_TYPE, Metrics
from .schemas import ClassifyRequest, CompletionRequest, GenerateRequest, SearchRequest
from .state import NotFound, Options, Service

__all__ = ["create_app", "APIError", "Context", "OPEN_PATHS", "router"]

log = logging.getLogger("uvicorn.error")  # the server's own log: shown with its start-up lines
OPEN_PATHS = ("/healthz", "/readyz")  # never behind the API key: probes carry none


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Unavailable(RuntimeError):
    """The LM did not load (503)."""


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


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
    batcher: MicroBatcher

    async def answer(self, work: Callable[[], Awaitable]):
        """Await the request's work within the timeout, turning each failure into its status."""
        try:
            return await asyncio.wait_for(work(), self.config.timeout_s)
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
            raise APIError(504, f"no answer within {self.config.timeout_s:g} s") from None
        except APIError:
            raise
        except NotFound as e:
            raise APIError(404, one_line(e)) from None
        except Unavailable as e:
            raise APIError(503, one_line(e)) from None
        except (ValueError, KeyError) as e:
            raise APIError(400, one_line(e)) from None
        except Exception as e:
            log.exception("request failed")
            raise APIError(500, one_line(e)) from None

    def check_texts(self, texts: list[str]) -> None:
        """Refused before any model time: too many texts or a too long one (413), an empty one (400)."""
        most, longest = self.config.max_batch_size, self.config.max_text_chars
        if len(texts) > most:
            raise APIError(413, f"{len(texts)} texts in one request; at most {most}")
        if not texts:
            raise APIError(400, "texts is empty")
        for i, t in enumerate(texts):
            if not t.strip():
                raise APIError(400, f"text {i} is empty")
            if len(t) > longest:
                raise APIError(413, f"text {i} has {len(t)} characters; at most {longest}")

    async def load(self, on_fatal: Callable[[BaseException], None] | None,
                   on_ready: Callable[[], None] | None = None) -> None:
        try:
            await self.service.call(self.service.load_sync)
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


def create_app(config: ServeConfig, *, on_fatal: Callable[[BaseException], None] | None = None,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The service's app. `on_fatal` is told when the LM or an index named at start fails to load
    (`serve` then stops the server); without it the app stays up and /readyz says why. `on_ready`
    is called once they have loaded, just before /readyz says ready (`serve` freezes the heap)."""
    service, metrics = Service(config), Metrics()
    batcher = MicroBatcher(lambda cfg, texts: _engine(service, cfg).classify(texts), service.call, metrics,
                           max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms)
    ctx = Context(config, service, metrics, batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loading = asyncio.create_task(ctx.load(on_fatal, on_ready))  # /healthz and /readyz answer meanwhile
        yield
        # uvicorn has finished the requests in flight (SIGTERM: graceful shutdown) by now
        await batcher.stop()
        await asyncio.gather(loading, return_exceptions=True)
        service.close()

    app = FastAPI(title="icl_engine", version="1", lifespan=lifespan,
                  description="Retrieval-augmented in-context learning over a frozen LM.")
    app.state.ctx, app.state.service, app.state.metrics, app.state.batcher = ctx, service, metrics, batcher
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_gate)
    app.include_router(router)
    return app


# ----------------------------------------------------------------------------- errors, key, metrics


async def _api_error(request: Request, exc: APIError):
    return error(exc.status, exc.message)


async def _invalid(request: Request, exc: RequestValidationError):
    return error(*_validation_message(exc))


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail))


async def _gate(request: Request, call_next):
    """The API key (all but OPEN_PATHS), then the request, counted and timed by its route."""
    ctx: Context = request.app.state.ctx
    t0 = time.perf_counter()
    key = ctx.config.api_key
    if key and request.url.path not in OPEN_PATHS and not _authorized(request, key):
        response = error(401, "a valid API key is needed: send the header Authorization: Bearer <key>",
                         **{"WWW-Authenticate": "Bearer"})
    else:
        response = await call_next(request)
    route = request.scope.get("route")
    ctx.metrics.observe(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - t0)
    return response


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
    ctx.metrics.queue_texts.set(ctx.batcher.depth)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


@router.post("/v1/classify")
async def classify(req: ClassifyRequest, request: Request):
    """Label, per-label probabilities, demonstrations and prompt tokens, as `icl classify --json`."""
    ctx: Context = request.app.state.ctx
    texts = [req.text] if req.text is not None else req.texts
    ctx.check_texts(texts)

    async def work():
        opts = Options(req.index, req.k, _value(req.method), _value(req.calibration), req.soft_prompt)
        return await ctx.batcher.submit(ctx.service.pipeline_config(opts), texts)

    preds = await ctx.answer(work)
    if req.labels is not None and set(req.labels) != set(preds[0].probs):
        raise APIError(400, f"labels {sorted(req.labels)} are not index {req.index!r}'s labels "
                            f"{sorted(preds[0].probs)}")
    rows = [asdict(p) for p in preds]
    return rows[0] if req.text is not None else {"predictions": rows}


@router.post("/v1/generate")
async def generate(req: GenerateRequest, request: Request):
    """A generation as `icl generate --json`; with "stream": true, server-sent events."""
    ctx: Context = request.app.state.ctx
    service = ctx.service
    ctx.check_texts([req.input])
    opts = Options(req.index, req.k, _value(req.method), None, req.soft_prompt, req.max_new_tokens)
    cfg = await ctx.answer(lambda: _now(service.pipeline_config, opts))
    if not req.stream:
        gen = await ctx.answer(lambda: service.call(lambda: _engine(service, cfg).generate([req.input])[0]))
        return asdict(gen)
    return StreamingResponse(_events(service, cfg, req.input, ctx.config.timeout_s), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.post("/v1/search")
async def search(req: SearchRequest, request: Request):
    """The demonstrations an index holds for a query, most similar first (`icl index search --json`)."""
    ctx: Context = request.app.state.ctx
    service = ctx.service
    cfg = await ctx.answer(lambda: _now(service.pipeline_config, Options(req.index)))

    def run():
        engine = _engine(service, cfg)
        return api.search_loaded(engine.index, engine.embedder, req.query, k=req.k, mmr_lambda=req.mmr)

    return {"index": req.index, "hits": await ctx.answer(lambda: service.call(run))}


@router.get("/v1/indexes")
async def indexes(request: Request):
    """Every index under the indexes dir, and whether this service holds it loaded."""
    ctx: Context = request.app.state.ctx
    rows = await ctx.answer(lambda: asyncio.to_thread(api.list_index_infos, indexes_dir=ctx.config.indexes_dir))
    return {"indexes": [{**r, "loaded": r["name"] in ctx.service.indexes} for r in rows]}


@router.get("/v1/indexes/{name}")
async def index_info(name: str, request: Request):
    """One index's manifest (`icl index info --json`)."""
    ctx: Context = request.app.state.ctx
    await ctx.answer(lambda: _now(ctx.service.folder, name))
    info = await ctx.answer(lambda: asyncio.to_thread(api.index_info, name, indexes_dir=ctx.config.indexes_dir))
    return {**info, "loaded": name in ctx.service.indexes}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    """OpenAI-compatible completions over the served LM (no retrieval), with `echo` and
    `logprobs` for scoring: see completions.py."""
    ctx: Context = request.app.state.ctx
    if req.stream:
        raise APIError(400, "stream is not supported on /v1/completions; use /v1/generate")
    body = req.model_dump()
    return await ctx.answer(lambda: ctx.service.call(lambda: complete(_lm(ctx.service), body)))


# ----------------------------------------------------------------------------- helpers


def _authorized(request: Request, key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _value(enum):
    return None if enum is None else enum.value


async def _now(fn, *args):
    """A cheap check run on the event loop, awaitable like the rest (so `answer` maps its errors)."""
    return fn(*args)


def _ready(service: Service, cfg):
    if service.load_error:
        raise Unavailable(f"the service could not load its LM or indexes: {service.load_error}")
    return cfg


def _engine(service: Service, cfg):
    return service.engine_sync(_ready(service, cfg))


def _lm(service: Service):
    _ready(service, None)
    return service.lm


async def _events(service: Service, cfg, text: str, timeout: float):
    """Server-sent events of one generation: each piece as it is decoded, then the whole
    generation (`event: done`), or `event: error` with one sentence."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def on_text(piece: str) -> None:  # on the worker thread
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    job = asyncio.ensure_future(service.call(lambda: _engine(service, cfg).generate_stream(text, on_text)))
    job.add_done_callback(lambda _: pieces.put_nowait(None))
    try:
        while (piece := await asyncio.wait_for(pieces.get(), timeout)) is not None:
            yield f"data: {json.dumps({'text': piece}, ensure_ascii=False)}\n\n"
        yield f"event: done\ndata: {json.dumps(asdict(job.result()), ensure_ascii=False)}\n\n"
    except asyncio.TimeoutError:
        yield f"event: error\ndata: {json.dumps({'error': f'no new text within {timeout:g} s'})}\n\n"
    except Exception as e:
        if not isinstance(e, ValueError):
            log.exception("stream failed")
        yield f"event: error\ndata: {json.dumps({'error': one_line(e)}, ensure_ascii=False)}\n\n"
