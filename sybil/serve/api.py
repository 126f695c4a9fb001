"""The OpenAI-compatible HTTP layer: routes, errors, streaming, metrics (the shapes
and validation rules are in sybil.serve.schema).

It never touches a model. Each route is a small function on one APIRouter, reading
what it shares from app.state.served. A completion request becomes one scheduler
Job per choice (n per prompt); the scheduler thread sends back Events, which arrive here on the event
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
from typing import Any, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sybil.sample.logprobs import TokenLogprob
from sybil.serve.metrics import Metrics
from sybil.serve.scheduler import Event, Job, QueueFull, Scheduler, ShuttingDown
from sybil.serve.schema import (
    ERROR_RESPONSES,
    SSE_EVENT,
    ApiError,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    Health,
    ModelCard,
    ModelList,
    Plan,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    Usage,
    bad_request,
    check_model,
    choice_seed,
    logprobs_json,
    plan,
)
from sybil.serve.text_stream import TextStream
from sybil.weights.tokenizer import decode, encode

log = logging.getLogger("sybil.serve")

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


@dataclass
class Choice:
    """One choice's job and what its client has been sent so far."""

    index: int
    job: Job
    text: TextStream
    echo: str | None = None  # the prompt's text, sent before the first generated text
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    last_time: float | None = None
    sent_chars: int = 0  # text sent so far (echo included): where the next token's text_offset starts

    def take(self, ev: Event, metrics: Metrics, scheduler: Scheduler) -> tuple[str, list[int]]:
        """Apply one event: (text released, tokens consumed). A stop string ends the
        row here and cancels its job; later events for it are ignored."""
        if self.finish_reason is not None:
            return "", []
        if ev.error:
            raise RuntimeError(ev.error)
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        pieces, used = [], []
        for t in ev.tokens:
            used.append(t)
            pieces.append(self.text.push(t))
            if self.text.stopped:
                self.finish_reason = "stop"
                scheduler.cancel(self.job)
                break
        self.tokens += used
        if ev.logprobs is not None:
            self.logprobs += ev.logprobs[: len(used)]
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

    def body(self, text: str, used: list[int], first: bool, token_ids: bool) -> dict:
        """The JSON of this choice for text and the tokens used since the last body; the
        first body carries the echoed prompt (and its log-probabilities)."""
        lp_tokens, entries = list(used), self.logprobs[len(self.tokens) - len(used):] if used else []
        if first and self.echo is not None:
            text = self.echo + text
            lp_tokens = self.job.prompt + lp_tokens
            entries = (self.prompt_logprobs or [None] * len(self.job.prompt)) + entries
        d = {"index": self.index, "text": text, "logprobs": None, "finish_reason": self.finish_reason}
        if self.job.logprobs is not None:
            d["logprobs"] = logprobs_json(entries, lp_tokens, self.sent_chars)
        self.sent_chars += len(text)
        if token_ids:
            d["token_ids"] = used
            if first:
                d["prompt_token_ids"] = self.job.prompt
        return d


@dataclass
class Served:
    """What every route reads: the scheduler (the only way to the models), the served
    name and the metrics."""

    scheduler: Scheduler
    name: str
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> int:
        return self.scheduler.model.config.n_positions

    @property
    def vocab(self) -> int:
        return self.scheduler.model.config.vocab_size



def served(request: Request) -> Served:
    return request.app.state.served


router = APIRouter()


@router.get("/health", response_model=Health, responses={503: ERROR_RESPONSES[503]})
async def health(request: Request) -> Any:
    if not served(request).scheduler.alive:
        raise ApiError(503, "the server is not running", "server_error")
    return Health(status="ok")


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> Any:
    s = served(request)
    return ModelList(data=[ModelCard(id=s.name, created=s.created, max_model_len=s.context)])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus(request: Request) -> Response:
    m = served(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.post("/tokenize", response_model=TokenizeResponse, responses={k: ERROR_RESPONSES[k] for k in (400, 404)})
async def tokenize(req: TokenizeRequest, request: Request) -> Any:
    s = served(request)
    check_model(req.model, s.name)
    ids = encode(req.prompt)  # GPT-2 adds no BOS or EOS: add_special_tokens changes nothing
    return TokenizeResponse(count=len(ids), max_model_len=s.context, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses={k: ERROR_RESPONSES[k] for k in (400, 404)})
async def detokenize(req: DetokenizeRequest, request: Request) -> Any:
    s = served(request)
    check_model(req.model, s.name)
    bad = [t for t in req.tokens if t >= s.vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary 0..{s.vocab - 1}", "tokens")
    return DetokenizeResponse(prompt=decode(req.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(request: Request) -> Any:
    s = served(request)
    return TokenizerInfo(model_max_length=s.context, vocab_size=s.vocab)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
              "description": "A completion, or with stream=true server-sent events"},
        **ERROR_RESPONSES,
    },
)
async def completions(req: CompletionRequest, request: Request) -> Any:
    s = served(request)
    p = plan(req, s.name, s.context, s.vocab)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    choices = _choices(req, p, lambda i, ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))
    _submit(s.scheduler, choices)
    n_prompt = sum(map(len, p.prompts))
    s.metrics.prompt_tokens.inc(n_prompt)
    request.state.prompt_tokens = n_prompt
    head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=s.name)

    def usage() -> dict:
        done = sum(len(c.tokens) for c in choices)
        request.state.completion_tokens = done
        cached = PromptTokensDetails(cached_tokens=sum(c.job.cached for c in choices))
        return Usage(prompt_tokens=n_prompt, completion_tokens=done, total_tokens=n_prompt + done,
                     prompt_tokens_details=cached).model_dump()

    if req.stream:
        return StreamingResponse(_sse(req, choices, events, s, head, usage), media_type="text/event-stream",
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
            texts[i] += choices[i].take(ev, s.metrics, s.scheduler)[0]
    except ConnectionAbortedError as e:
        raise ApiError(503, str(e), "server_error") from None
    finally:
        _cancel(s.scheduler, choices)
    out = [c.body(texts[c.index], c.tokens, True, req.return_token_ids) for c in choices]
    return JSONResponse({**head, "choices": out, "usage": usage()})


def _choices(req: CompletionRequest, p: Plan, put: Callable[[int, Event], None]) -> list[Choice]:
    """n choices per prompt, prompt-major (index = prompt_index * n + i), each its own job."""
    def emitter(index: int) -> Callable[[Event], None]:
        def emit(ev: Event) -> None:  # on the scheduler thread
            try:
                put(index, ev)
            except RuntimeError:  # the loop is gone (shutdown)
                pass
        return emit

    choices = []
    for ids, m in zip(p.prompts, p.max_tokens):
        for i in range(p.n):
            index = len(choices)
            job = Job(ids, m, p.params, choice_seed(req.seed, i), not req.ignore_eos, emitter(index),
                      logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs)
            choices.append(Choice(index, job, TextStream(p.stops), echo=decode(ids) if p.echo else None))
    return choices


def _submit(scheduler: Scheduler, choices: list[Choice]) -> None:
    capacity = scheduler.max_batch + scheduler.max_queue
    if len(choices) > capacity:
        raise bad_request(f"this request has {len(choices)} choices (prompts x n); this server holds at most "
                          f"{capacity} (--max-batch + --max-queue): send fewer at a time", "n")
    try:
        scheduler.submit([c.job for c in choices])
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", code="server_busy",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), "server_error") from None


def _cancel(scheduler: Scheduler, choices: list[Choice]) -> None:
    for c in choices:
        if c.finish_reason is None:
            scheduler.cancel(c.job)


async def _sse(req: CompletionRequest, choices: list[Choice], events: asyncio.Queue, s: Served, head: dict,
               usage: Callable[[], dict]):
    """Server-sent events: a chunk per round that commits text for a choice."""
    started = set()
    try:
        while any(c.finish_reason is None for c in choices):
            i, ev = await events.get()
            c = choices[i]
            text, used = c.take(ev, s.metrics, s.scheduler)
            if not text and not used and c.finish_reason is None:
                continue
            body = {**head, "choices": [c.body(text, used, i not in started, req.return_token_ids)]}
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
        _cancel(s.scheduler, choices)  # a client that went away frees its slots by the next round


def build_app(scheduler: Scheduler, name: str, shutdown_grace_s: float = 5.0) -> FastAPI:
    """The FastAPI app around a started-or-not scheduler; its lifespan starts the
    scheduler and stops it (after up to shutdown_grace_s) on shutdown."""
    metrics = Metrics(lambda: scheduler.running, lambda: scheduler.queued, lambda: scheduler.cached_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, shutdown_grace_s)

    app = FastAPI(title="Sybil", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible GPT-2 server with lossless speculative decoding")
    app.state.metrics = metrics
    app.state.served = Served(scheduler, name, metrics)
    app.include_router(router)
    for exc, handler in _HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.openapi = lambda: _openapi(app)
    app.add_middleware(RequestLog, metrics=metrics)
    return app


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return e.response()


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400."""
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}").response()
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return bad_request(f"{where}: {err['msg']}", param).response()


async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return ApiError(e.status_code, str(e.detail), "invalid_request_error", headers=e.headers).response()


async def _bug(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error")
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error").response()


_HANDLERS = {ApiError: _api_error, RequestValidationError: _invalid, StarletteHTTPException: _http, Exception: _bug}


def _openapi(app: FastAPI) -> dict:
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
