"""The gateway's ASGI app: routes, auth, error handlers, middleware and lifespan. Handlers only delegate.

    app = create_app(load_config("fleet.toml"))   # or: pipefleet gateway --config fleet.toml
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, AsyncIterator

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse

from config.models import FleetConfig
from gateway import (serving_batches, serving_chat, serving_completion, serving_embedding, serving_files, serving_jobs,
                     serving_models)
from gateway.batch_protocol import BatchCreateRequest
from gateway.batch_runner import BatchRunner
from gateway.batch_store import BatchStore
from gateway.files import FileStore
from gateway.bodylimit import BodyLimitMiddleware
from gateway.errors import ApiError, describe, error_response_parts, is_openai_path
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                              EmbeddingRequest, EmbeddingResponse)
from gateway.security import KeyCheck
from gateway.state import GatewayState
from producers.backlog import BacklogCollector
from producers.client import FleetClient
from producers.errors import PipefleetError
from producers.webhook_delivery import WebhookCollector, start_dispatcher

logger = logging.getLogger(__name__)

EXECUTOR_THREADS = 64
"""Threads for the client's short blocking calls (submit, status); waits hold none (producers.results)."""


UPLOAD_ENVELOPE_BYTES = 64 * 1024
"""Room for a multipart upload's headers and boundaries on top of the file itself."""


def get_state(request: Request) -> GatewayState:
    """The app's :class:`GatewayState` (a FastAPI dependency)."""
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]


def _error_response(request: Request, error: Exception) -> JSONResponse:
    status, error_type, message, param = describe(error)
    if status >= 500 and not isinstance(error, PipefleetError):
        logger.exception("unexpected error on %s", request.url.path, exc_info=error)
    status, body = error_response_parts(request.url.path, status, error_type, message, param)
    return JSONResponse(body, status_code=status)


def _validation_response(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = list(error.errors())
    unsupported = [str(p["loc"][-1]) for p in problems if p.get("type") == "extra_forbidden"]
    if unsupported:
        message = f"unsupported field(s): {', '.join(unsupported)}"
        error_type, param = "UnsupportedField", unsupported[0]
    else:
        message = "; ".join(f"{'.'.join(str(part) for part in p['loc'] if part != 'body') or 'body'}: {p['msg']}"
                            for p in problems[:5])
        error_type, param = "InvalidInput", None
    status = 400 if is_openai_path(request.url.path) else 422
    status, body = error_response_parts(request.url.path, status, error_type, message, param)
    return JSONResponse(body, status_code=status)


async def _counted(state: GatewayState, route: str, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    gauge = state.metrics.open_streams.labels(route)
    gauge.inc()
    try:
        async for event in events:
            yield event
    finally:
        gauge.dec()


def _sse(state: GatewayState, route: str, events: AsyncIterator[Any]) -> EventSourceResponse:
    return EventSourceResponse(_counted(state, route, events), sep="\n")


def _add_routes(app: FastAPI, keys: KeyCheck) -> None:
    guarded: dict[str, Any] = {"dependencies": [Depends(keys)]}

    @app.post("/v1/jobs", status_code=202, **guarded)
    async def submit_job(body: serving_jobs.JobRequest, request: Request, state: State) -> dict:
        return await serving_jobs.submit(state, body, str(request.base_url))

    @app.get("/v1/jobs/{job_id}", **guarded)
    async def job_status(job_id: str, state: State) -> dict:
        return await serving_jobs.status(state, job_id)

    @app.get("/v1/jobs/{job_id}/result", **guarded)
    async def job_result(job_id: str, state: State, wait: Annotated[float, Query(ge=0)] = 0.0) -> JSONResponse:
        status, body = await serving_jobs.result(state, job_id, wait)
        return JSONResponse(body, status_code=status)

    @app.get("/v1/jobs/{job_id}/events", **guarded)
    async def job_events(job_id: str, state: State,
                         last_event_id: Annotated[str | None, Header()] = None) -> EventSourceResponse:
        return _sse(state, "/v1/jobs/{job_id}/events", await serving_jobs.events(state, job_id, last_event_id))

    @app.delete("/v1/jobs/{job_id}", **guarded)
    async def cancel_job(job_id: str, state: State) -> dict:
        return await serving_jobs.cancel(state, job_id)

    @app.post("/v1/files", **guarded)
    async def upload_file(state: State, file: Annotated[UploadFile, File()],
                          purpose: Annotated[str, Form()]) -> Any:
        return await serving_files.upload(state, file, purpose)

    @app.get("/v1/files", **guarded)
    async def list_files(state: State, purpose: str | None = None, after: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, order: str = "desc") -> Any:
        return await serving_files.list_files(state, purpose, after, limit, order)

    @app.get("/v1/files/{file_id}", **guarded)
    async def retrieve_file(file_id: str, state: State) -> Any:
        return await serving_files.retrieve(state, file_id)

    @app.get("/v1/files/{file_id}/content", **guarded)
    async def file_content(file_id: str, state: State) -> Response:
        return Response(await serving_files.content(state, file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", **guarded)
    async def delete_file(file_id: str, state: State) -> Any:
        return await serving_files.delete(state, file_id)

    @app.post("/v1/batches", **guarded)
    async def create_batch(body: BatchCreateRequest, state: State) -> Any:
        return await serving_batches.create(state, body)

    @app.get("/v1/batches", **guarded)
    async def list_batches(state: State, after: str | None = None, limit: int = 20) -> Any:
        return await serving_batches.list_batches(state, after, limit)

    @app.get("/v1/batches/{batch_id}", **guarded)
    async def retrieve_batch(batch_id: str, state: State) -> Any:
        return await serving_batches.retrieve(state, batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", **guarded)
    async def cancel_batch(batch_id: str, state: State) -> Any:
        return await serving_batches.cancel(state, batch_id)

    @app.get("/v1/deployments", **guarded)
    async def deployments(state: State) -> list:
        return await serving_jobs.deployments(state)

    @app.get("/v1/models", **guarded)
    async def models(state: State) -> Any:
        return await serving_models.list_models(state)

    @app.post("/v1/embeddings", responses={200: {"model": EmbeddingResponse}}, **guarded)
    async def embeddings(body: EmbeddingRequest, state: State) -> Any:
        return await serving_embedding.create_embedding(state, body)

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}}, **guarded)
    async def completions(body: CompletionRequest, state: State) -> Any:
        if body.stream:
            return _sse(state, "/v1/completions", await serving_completion.stream_completion(state, body))
        return await serving_completion.create_completion(state, body)

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}}, **guarded)
    async def chat_completions(body: ChatCompletionRequest, state: State) -> Any:
        if body.stream:
            return _sse(state, "/v1/chat/completions", await serving_chat.stream_chat_completion(state, body))
        return await serving_chat.create_chat_completion(state, body)

    # The schema and its Swagger UI sit behind the key like every route they describe.
    @app.get("/openapi.json", include_in_schema=False, **guarded)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, **guarded)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")


async def _health(state: GatewayState) -> JSONResponse:
    try:
        await asyncio.to_thread(state.client.redis.ping)
        infos = await state.client.adeployments()
    except Exception as error:  # any failure here means "not healthy", and says why
        return JSONResponse({"status": "unavailable", "redis": f"{type(error).__name__}: {error}",
                             "deployments": []}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok", "deployments": [
        {"name": info.name, "task": info.task, "model": info.model, "workers": info.workers} for info in infos]})


def create_app(config: FleetConfig, *, client: FleetClient | None = None) -> FastAPI:
    """The gateway for ``config`` (its broker, ``[limits]`` and ``[gateway]`` table)."""
    metrics = GatewayMetrics()
    keys = KeyCheck(config.gateway.api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fleet = client or FleetClient(config.broker_url, config.result_backend, result_ttl_s=config.result_ttl_s,
                                      visibility_timeout_s=config.visibility_timeout_s,
                                      redis_options=config.redis_options())
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=EXECUTOR_THREADS, thread_name_prefix="gateway"))
        ttl_s = config.batches.file_ttl_s
        state = GatewayState(client=fleet, config=config, metrics=metrics, files=FileStore(fleet.redis, ttl_s),
                             batches=BatchStore(fleet.redis, ttl_s))
        app.state.gateway = state
        runner = asyncio.create_task(BatchRunner(state, state.batches, state.files, config.batches,
                                                 config.webhooks).run(), name="batch-runner")
        webhooks = start_dispatcher(config.webhooks, fleet.redis, backend=fleet.celery.backend,
                                    result_ttl_s=config.result_ttl_s, name="gateway-webhooks")
        collector = WebhookCollector(webhooks) if webhooks else None
        if collector is not None:
            metrics.registry.register(collector)
        backlog = BacklogCollector(fleet.redis, lambda: [info.name for info in fleet.deployments()])
        metrics.registry.register(backlog)
        try:
            yield
        finally:
            metrics.registry.unregister(backlog)
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            if webhooks is not None:
                metrics.registry.unregister(collector)
                await asyncio.to_thread(webhooks.stop)
            await fleet.aclose()

    app = FastAPI(title="pipefleet gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_exception_handler(ApiError, _error_response)
    app.add_exception_handler(PipefleetError, _error_response)
    app.add_exception_handler(RequestValidationError, _validation_response)
    app.add_exception_handler(Exception, _error_response)

    @app.get("/healthz")
    async def healthz(state: State) -> JSONResponse:
        return await _health(state)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        # The backlog gauge reads Redis: off the event loop.
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE_LATEST)

    _add_routes(app, keys)
    # Added innermost first: metrics see every response, CORS answers preflights, the cap runs before routes.
    # Uploads have their own cap (OpenAI's 200 MB by default), plus room for the multipart envelope.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.gateway.max_body_bytes or config.limits.max_payload_bytes,
                       overrides={"/v1/files": config.batches.max_file_bytes + UPLOAD_ENVELOPE_BYTES})
    if config.gateway.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.gateway.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
