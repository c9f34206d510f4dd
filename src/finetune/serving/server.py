"""`finetune serve`: one model behind HTTP (FastAPI + uvicorn), V1 and open inference protocol v2 routes.

The server listens at once and loads the model in the background: liveness answers from the start, readiness
only after the verified load and one warm-up inference. A model that fails to load (tampered, missing) stops
the server with that one line. SIGTERM: no new connections, in-flight requests finish (up to
serve.graceful_timeout_s), the batcher drains, the request log is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from finetune.common.serve_config import ServeConfig
from finetune.registry.request import RegistryError
from finetune.serving import protocol
from finetune.serving.batching import Batcher
from finetune.serving.metrics import ServeMetrics
from finetune.serving.model import ServedModel, ServeError, init_torch_threads, load_served
from finetune.serving.protocol import Limits, Refusal
from finetune.serving.request_log import RequestLog, RequestLogError

log = logging.getLogger("finetune")

VERSION_HEADER = "X-Model-Version"


@dataclass
class ServerState:
    cfg: ServeConfig
    spec: str  # models:/<name>@<alias> or a local folder
    tracking_uri: str | None
    token: str | None = None
    model: ServedModel | None = None  # set once loaded and warmed up: the server is then ready
    error: str | None = None  # why loading failed: the server stops and says so
    batcher: Batcher | None = None
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    request_log: RequestLog | None = None
    on_fatal: Callable[[], None] = lambda: None  # stops the HTTP server (set by serve())
    tasks: set = field(default_factory=set)

    @property
    def limits(self) -> Limits:
        return Limits(self.cfg.max_texts_per_request, self.cfg.max_chars_per_text)


def open_request_log(cfg: ServeConfig) -> RequestLog:
    try:
        return RequestLog(cfg.log_folder, cfg.log_sample_rate, cfg.log_text, cfg.log_flush_records)
    except RequestLogError as exc:
        raise ServeError(str(exc)) from None


def _load_in_background(state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
    try:
        model = load_served(state.spec, state.tracking_uri)
        model.warm_up()
    except (RegistryError, ServeError) as exc:
        state.error = str(exc)
    except Exception as exc:  # any other load failure: one line too, never a server that is up but never ready
        state.error = f"cannot load {state.spec}: {type(exc).__name__}: {exc}"
    else:
        loop.call_soon_threadsafe(_ready, state, model)
        return
    loop.call_soon_threadsafe(state.on_fatal)


def _ready(state: ServerState, model: ServedModel) -> None:
    state.model = model
    state.metrics.served(model.name, model.version, model.variant)
    log.info("ready: %s version %s (%s), %d labels", model.name, model.version, model.variant, len(model.labels))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.serve
    cfg = state.cfg
    if state.request_log is None:  # serve() made it (and checked its location) before the server started
        state.request_log = open_request_log(cfg)
    state.batcher = Batcher(lambda texts: state.model.predict_batch(texts), cfg.max_batch_size,
                            cfg.batch_window_ms, state.metrics.batch_size.observe, cfg.model_workers)
    await state.batcher.start()
    threading.Thread(target=_load_in_background, args=(state, asyncio.get_running_loop()), daemon=True,
                     name="finetune-load").start()
    try:
        yield
    finally:  # uvicorn has let in-flight requests finish: drain the batcher, write what the log holds
        await state.batcher.stop()
        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)
        written = state.request_log.flush()
        if written:
            log.info("request log: wrote %s", written)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes, whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refusal(413, "body_too_large", f"the request body has {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refusal(413, "body_too_large", f"the request body passes {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _authorize(state: ServerState, request: Request) -> None:
    if state.token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.token.encode()):
        raise Refusal(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer <token>)")


def _model_for(state: ServerState, name: str) -> ServedModel:
    if state.model is None:
        raise Refusal(503, "not_ready", "the model is still loading")
    if name != state.model.name:
        raise Refusal(404, "unknown_model", f"no model {name!r} here; this server serves {state.model.name!r}")
    return state.model


async def _predict(state: ServerState, model: ServedModel, texts: list[str]):
    out = await state.batcher.submit(texts)  # this request's slice of the batch: rows or records, in order
    records = model.records(out)
    state.metrics.predicted(model.predicted_labels(records))
    rlog = state.request_log
    if rlog.sampled() and rlog.add(model.name, model.version, texts, records):
        task = asyncio.get_running_loop().run_in_executor(None, rlog.flush)
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
    return out


async def _infer(state: ServerState, request: Request, name: str, proto: str) -> Response:
    started = time.perf_counter()
    headers: dict[str, str] = {}
    try:
        _authorize(state, request)
        model = _model_for(state, name)
        headers[VERSION_HEADER] = model.version_tag
        payload = protocol.parse_json(await _read_body(request, state.limits.max_body_bytes))
        if proto == "v1":
            texts = protocol.v1_texts(payload, state.limits)
            body = {"predictions": model.records(await _predict(state, model, texts))}
        else:
            texts, req_id = protocol.v2_texts(payload, state.limits)
            body = model.v2_response(await _predict(state, model, texts), req_id)
        status = 200
    except Refusal as exc:
        status, body = exc.status, {"error": exc.message}
        state.metrics.errors.labels(reason=exc.reason).inc()
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
    except Exception as exc:  # the model failed on this batch: the server keeps serving
        log.error("inference failed: %s: %s", type(exc).__name__, exc)
        status, body = 500, {"error": f"inference failed: {type(exc).__name__}"}
        state.metrics.errors.labels(reason="model_failure").inc()
    state.metrics.requests.labels(protocol=proto, code=str(status)).inc()
    state.metrics.latency.labels(protocol=proto).observe(time.perf_counter() - started)
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="finetune serve", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request) -> Response:
        return await _infer(state, request, name, "v1")

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request) -> Response:
        return await _infer(state, request, name, "v2")

    @app.get("/v2/models/{name}")
    async def v2_metadata(name: str) -> Response:
        return _metadata(state, name)

    _add_health_routes(app, state)
    return app


def _metadata(state: ServerState, name: str) -> Response:
    try:
        model = _model_for(state, name)
    except Refusal as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return JSONResponse({"name": model.name, "versions": [model.version], "platform": f"finetune-{model.variant}",
                         "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                         "outputs": model.v2_outputs()},
                        headers={VERSION_HEADER: model.version_tag})


def _add_health_routes(app: FastAPI, state: ServerState) -> None:
    """Health and metrics: open (no token), as probes and Prometheus scrape them."""

    def ready() -> JSONResponse:
        return JSONResponse({"ready": state.model is not None}, status_code=200 if state.model else 503)

    app.get("/v2/health/live")(lambda: JSONResponse({"live": True}))
    app.get("/v2/health/ready")(ready)
    app.get("/v2/models/{name}/ready")(lambda name: ready() if state.model is None or name == state.model.name
                                       else JSONResponse({"error": f"no model {name!r}"}, status_code=404))
    app.get("/v1/models/{name}")(lambda name: JSONResponse({"name": name, "ready": state.model is not None},
                                                           status_code=200 if state.model else 503))
    app.get("/metrics")(lambda: Response(state.metrics.render(), media_type=state.metrics.content_type))


def serve(state: ServerState, host: str, port: int) -> None:
    """Run until SIGTERM/SIGINT; raise ServeError when the model could not be loaded."""
    import uvicorn

    config = uvicorn.Config(create_app(state), host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=state.cfg.graceful_timeout_s, lifespan="on")
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop chatter; ours says what matters

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
    state.request_log = open_request_log(state.cfg)  # an unreachable S3 log location: one line, before loading
    init_torch_threads(state.cfg.torch_threads)
    log.info("listening on http://%s:%d; loading %s", host, port, state.spec)
    # uvicorn handles SIGTERM/SIGINT (graceful shutdown), then raises the signal again with the handler it found:
    # a no-op one here, so a graceful stop exits 0 instead of dying of the signal it already handled
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
    server.run()
    if state.error:
        raise ServeError(state.error)
