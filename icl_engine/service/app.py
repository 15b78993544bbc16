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
from dataclasses import asdict
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
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

__all__ = ["create_app", "APIError", "OPEN_PATHS"]

log = logging.getLogger("icl_engine.service")
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


def create_app(config: ServeConfig, *, on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The service's app. `on_fatal` is told when the LM or an index named at start fails to load
    (`serve` then stops the server); without it the app stays up and /readyz says why."""
    service, metrics = Service(config), Metrics()
    batcher = MicroBatcher(lambda cfg, texts: service.engine_sync(_ready(service, cfg)).classify(texts),
                           service.call, metrics, max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms)

    async def load() -> None:
        try:
            await service.call(service.load_sync)
        except Exception as e:
            service.load_error = one_line(e)
            log.error("could not load: %s", service.load_error)
            if on_fatal is not None:
                on_fatal(e)
            return
        service.ready = True
        metrics.ready.set(1)
        log.info("ready: LM %s, indexes %s", config.lm, ", ".join(config.indexes) or "(loaded when named)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loading = asyncio.create_task(load())  # the server answers /healthz and /readyz meanwhile
        yield
        # uvicorn has finished the requests in flight (SIGTERM: graceful shutdown) by now
        await batcher.stop()
        await asyncio.gather(loading, return_exceptions=True)
        service.close()

    app = FastAPI(title="icl_engine", version="1", lifespan=lifespan,
                  description="Retrieval-augmented in-context learning over a frozen LM.")
    app.state.service, app.state.metrics, app.state.batcher = service, metrics, batcher

    async def answer(work: Callable[[], Awaitable]):
        """Await the request's work within the timeout, turning each failure into its status."""
        try:
            return await asyncio.wait_for(work(), config.timeout_s)
        except TimeoutError:
            raise APIError(504, f"no answer within {config.timeout_s:g} s") from None
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

    def check_texts(texts: list[str]) -> None:
        if len(texts) > config.max_batch_size:
            raise APIError(413, f"{len(texts)} texts in one request; at most {config.max_batch_size}")
        if not texts:
            raise APIError(400, "texts is empty")
        for i, t in enumerate(texts):
            if not t.strip():
                raise APIError(400, f"text {i} is empty")
            if len(t) > config.max_text_chars:
                raise APIError(413, f"text {i} has {len(t)} characters; at most {config.max_text_chars}")

    # ------------------------------------------------------------------ errors, key, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error(*_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def gate(request: Request, call_next):
        t0 = time.perf_counter()
        if config.api_key and request.url.path not in OPEN_PATHS and not _authorized(request, config.api_key):
            response = error(401, "a valid API key is needed: send the header Authorization: Bearer <key>",
                             **{"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - t0)
        return response

    # ------------------------------------------------------------------ health

    @app.get("/healthz")
    async def healthz():
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """200 once the LM and the indexes named at start are loaded; 503 before (or if they failed)."""
        if service.ready:
            return {"ready": True, "lm": config.lm, "indexes": sorted(service.indexes)}
        body = {"ready": False, **({"error": service.load_error} if service.load_error else {"loading": True})}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        """Prometheus text exposition."""
        metrics.queue_texts.set(batcher.depth)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ the engine

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        """Label, per-label probabilities, demonstrations and prompt tokens, as `icl classify --json`."""
        texts = [req.text] if req.text is not None else req.texts
        check_texts(texts)

        async def work():
            cfg = service.pipeline_config(Options(req.index, req.k, _value(req.method), _value(req.calibration),
                                                  req.soft_prompt))
            return await batcher.submit(cfg, texts)

        preds = await answer(work)
        if req.labels is not None and set(req.labels) != set(preds[0].probs):
            raise APIError(400, f"labels {sorted(req.labels)} are not index {req.index!r}'s labels "
                                f"{sorted(preds[0].probs)}")
        rows = [asdict(p) for p in preds]
        return rows[0] if req.text is not None else {"predictions": rows}

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest):
        """A generation as `icl generate --json`; with "stream": true, server-sent events."""
        check_texts([req.input])
        opts = Options(req.index, req.k, _value(req.method), None, req.soft_prompt, req.max_new_tokens)
        cfg = await answer(lambda: _now(service.pipeline_config, opts))
        if not req.stream:
            gen = await answer(lambda: service.call(lambda: _engine(service, cfg).generate([req.input])[0]))
            return asdict(gen)
        return StreamingResponse(_events(service, cfg, req.input, config.timeout_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/search")
    async def search(req: SearchRequest):
        """The demonstrations an index holds for a query, most similar first (`icl index search --json`)."""
        cfg = await answer(lambda: _now(service.pipeline_config, Options(req.index)))

        def run():
            engine = _engine(service, cfg)
            return api.search_loaded(engine.index, engine.embedder, req.query, k=req.k, mmr_lambda=req.mmr)

        return {"index": req.index, "hits": await answer(lambda: service.call(run))}

    @app.get("/v1/indexes")
    async def indexes():
        """Every index under the indexes dir, and whether this service holds it loaded."""
        rows = await answer(lambda: asyncio.to_thread(api.list_index_infos, indexes_dir=config.indexes_dir))
        return {"indexes": [{**r, "loaded": r["name"] in service.indexes} for r in rows]}

    @app.get("/v1/indexes/{name}")
    async def index_info(name: str):
        """One index's manifest (`icl index info --json`)."""
        await answer(lambda: _now(service.folder, name))
        info = await answer(lambda: asyncio.to_thread(api.index_info, name, indexes_dir=config.indexes_dir))
        return {**info, "loaded": name in service.indexes}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        """OpenAI-compatible completions over the served LM (no retrieval), with `echo` and
        `logprobs` for scoring: see completions.py."""
        if req.stream:
            raise APIError(400, "stream is not supported on /v1/completions; use /v1/generate")
        body = req.model_dump()
        return await answer(lambda: service.call(lambda: complete(_lm(service), body)))

    return app


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
    except TimeoutError:
        yield f"event: error\ndata: {json.dumps({'error': f'no new text within {timeout:g} s'})}\n\n"
    except Exception as e:
        if not isinstance(e, ValueError):
            log.exception("stream failed")
        yield f"event: error\ndata: {json.dumps({'error': one_line(e)}, ensure_ascii=False)}\n\n"
