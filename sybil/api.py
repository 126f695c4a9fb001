"""The OpenAI-compatible HTTP layer: routes, errors, streaming, metrics (the shapes
and validation rules are in sybil.openai_schema).

It never touches a model. A completion request becomes one scheduler Job per
prompt; the scheduler thread sends back Events, which arrive here on the event
loop and become a JSON body or server-sent events. Every invalid request is a
400 with OpenAI's error body, checked before anything is queued, so bad input
never reaches the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sybil.metrics import Metrics
from sybil.openai_schema import (
    ERROR_RESPONSES, SSE_EVENT, ApiError, CompletionRequest, CompletionResponse, ErrorBody, Health, ModelCard,
    ModelList, Usage, bad_request, plan,
)
from sybil.scheduler import Event, Job, QueueFull, Scheduler, ShuttingDown
from sybil.text_stream import TextStream

log = logging.getLogger("sybil.serve")

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


@dataclass
class Choice:
    """One prompt's job and what its client has been sent so far."""

    index: int
    job: Job
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    last_time: float | None = None

    def take(self, ev: Event, metrics: Metrics, scheduler: Scheduler) -> tuple[str, list[int]]:
        """Apply one event: (text released, tokens consumed). A stop string ends the
        row here and cancels its job; later events for it are ignored."""
        if self.finish_reason is not None:
            return "", []
        if ev.error:
            raise RuntimeError(ev.error)
        pieces, used = [], []
        for t in ev.tokens:
            used.append(t)
            pieces.append(self.text.push(t))
            if self.text.stopped:
                self.finish_reason = "stop"
                scheduler.cancel(self.job)
                break
        self.tokens += used
        if used:
            metrics.round(len(used), ev.drafted, min(ev.accepted, len(used)))
            gap = ev.time - (self.last_time if self.last_time is not None else self.job.submitted)
            metrics.latency(self.last_time is None, gap, len(used))
            self.last_time = ev.time
        if self.finish_reason is None and ev.finish_reason is not None:
            pieces.append(self.text.flush())
            self.finish_reason = {"eos": "stop", "length": "length", "context": "length"}.get(ev.finish_reason)
            if self.finish_reason is None:  # cancelled by the server
                raise ConnectionAbortedError("the server is shutting down and cancelled this request")
        return "".join(pieces), used


def build_app(scheduler: Scheduler, served: str, shutdown_grace_s: float = 5.0) -> FastAPI:
    """The FastAPI app around a started-or-not scheduler; its lifespan starts the
    scheduler and stops it (after up to shutdown_grace_s) on shutdown."""
    context, vocab = scheduler.model.config.n_positions, scheduler.model.config.vocab_size
    metrics = Metrics(lambda: scheduler.running, lambda: scheduler.queued)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not scheduler.thread.is_alive():
            scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, shutdown_grace_s)

    app = FastAPI(title="Sybil", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible GPT-2 server with lossless speculative decoding")
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return bad_request(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}").response()
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return bad_request(f"{where}: {err['msg']}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), "invalid_request_error", headers=e.headers).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return ApiError(500, f"internal error: {type(e).__name__}", "server_error").response()

    @app.get("/health", response_model=Health, responses={503: ERROR_RESPONSES[503]})
    async def health() -> Any:
        if not scheduler.alive:
            raise ApiError(503, "the server is not running", "server_error")
        return Health(status="ok")

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> Any:
        return ModelList(data=[ModelCard(id=served, created=created, max_model_len=context)])

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={
            200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                  "description": "A completion, or with stream=true server-sent events"},
            **ERROR_RESPONSES,
        },
    )
    async def completions(req: CompletionRequest, request: Request) -> Any:
        p = plan(req, served, context, vocab)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def emitter(i: int):
            def emit(ev: Event) -> None:  # on the scheduler thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))
                except RuntimeError:  # the loop is gone (shutdown)
                    pass
            return emit

        choices = [
            Choice(i, Job(ids, m, p.params, req.seed, not req.ignore_eos, emitter(i)), TextStream(p.stops))
            for i, (ids, m) in enumerate(zip(p.prompts, p.max_tokens))
        ]
        try:
            scheduler.submit([c.job for c in choices])
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), "server_error") from None
        n_prompt = sum(map(len, p.prompts))
        metrics.prompt_tokens.inc(n_prompt)
        request.state.prompt_tokens = n_prompt
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = dict(id=rid, object="text_completion", created=int(time.time()), model=served)

        def cancel_all() -> None:
            for c in choices:
                if c.finish_reason is None:
                    scheduler.cancel(c.job)

        def usage() -> dict:
            done = sum(len(c.tokens) for c in choices)
            request.state.completion_tokens = done
            return Usage(prompt_tokens=n_prompt, completion_tokens=done, total_tokens=n_prompt + done).model_dump()

        def choice_json(c: Choice, text: str, used: list[int], first: bool) -> dict:
            d = {"index": c.index, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
            if req.return_token_ids:
                d["token_ids"] = used
                if first:
                    d["prompt_token_ids"] = c.job.prompt
            return d

        if req.stream:
            async def sse():
                started = set()
                try:
                    while any(c.finish_reason is None for c in choices):
                        i, ev = await events.get()
                        c = choices[i]
                        text, used = c.take(ev, metrics, scheduler)
                        if not text and not used and c.finish_reason is None:
                            continue
                        body = {**head, "choices": [choice_json(c, text, used, i not in started)]}
                        started.add(i)
                        yield f"data: {json.dumps(body)}\n\n"
                    if req.stream_options is not None and req.stream_options.include_usage:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage()})}\n\n"
                    else:
                        usage()
                    yield "data: [DONE]\n\n"
                except (ConnectionAbortedError, RuntimeError) as e:
                    # the server cancelled the rows (shutdown) or a bug: end the stream with an error event
                    err = ErrorBody(message=str(e), type="server_error")
                    yield f"data: {json.dumps({'error': err.model_dump()})}\n\n"
                finally:
                    cancel_all()  # a client that went away frees its slots by the next round

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [""] * len(choices)  # each choice's tokens are in Choice.tokens
        try:
            while any(c.finish_reason is None for c in choices):
                try:
                    i, ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                texts[i] += choices[i].take(ev, metrics, scheduler)[0]
        except ConnectionAbortedError as e:
            raise ApiError(503, str(e), "server_error") from None
        finally:
            cancel_all()
        out = [choice_json(c, texts[c.index], c.tokens, True) for c in choices]
        return JSONResponse({**head, "choices": out, "usage": usage()})

    def openapi() -> dict:
        """FastAPI's schema, less the 422 it documents by default: invalid input is a 400 here."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(RequestLog, metrics=metrics)
    return app


class RequestLog:
    """Pure ASGI middleware: one log line per request once its body is fully sent
    (streams included), and the request counter by status for completions."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = scope.get("state", {})
            path = scope.get("path", "")
            extra = ""
            if "prompt_tokens" in state:
                extra = f" prompt={state['prompt_tokens']} completion={state.get('completion_tokens', '?')}"
            log.info("%s %s %d%s %.0f ms", scope.get("method"), path, status[0] or 499, extra,
                     1000 * (time.perf_counter() - t0))
            if path == "/v1/completions":
                self.metrics.requests.labels(status=str(status[0] or 499)).inc()
