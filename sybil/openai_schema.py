"""The OpenAI completion API's shapes, as /openapi.json publishes them, and the rules
that turn a request into validated prompts (sybil.api serves them).

Types are read as JSON Schema reads them (false is not token 0, "7" is not an
integer), and every rule a schema cannot say (the vocabulary, the context, what
is not supported) is checked in plan(), so that bad input is a 400 before
anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sybil.sampling import SamplingParams
from sybil.tokenizer import encode

INT64 = 2**63


class StreamOptions(BaseModel):
    include_usage: Bool = False


def _json_integer(v: Any) -> Any:
    """An integer as JSON Schema has it (3 or 3.0), never a boolean or a string."""
    if isinstance(v, (bool, str)):
        raise ValueError("Input should be a valid integer")
    return v


Int = Annotated[int, BeforeValidator(_json_integer)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(BaseModel):
    """OpenAI's completion request, with vLLM's top_k, ignore_eos and return_token_ids.
    Types as JSON Schema reads them: false is not token 0, and "1.5" is not a number."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model name (default: the one served)")
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Int | None = Field(16, ge=1, description="null: up to the context")
    temperature: Float = Field(1.0, ge=0)
    top_p: Float = Field(1.0, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1, description="-1, 0 or null: no top-k")
    seed: Int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: Bool = False
    return_token_ids: Bool = False
    n: Int = Field(1, ge=1)
    logprobs: Int | None = None
    echo: Bool = False
    best_of: Int | None = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    logit_bias: dict[str, Float] | None = None
    suffix: str | None = None
    user: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sybil"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, ErrorBody(message=message, type=type_, param=param, code=code), headers

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.body).model_dump(), self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


SSE_EVENT = {  # one server-sent event (OpenAPI 3.1 reads an event-stream schema per event)
    "type": "object",
    "required": ["data"],
    "properties": {"data": {
        "type": "string",
        "description": "a CompletionResponse chunk as JSON (choices with the text committed since the last "
                       "chunk; the last chunk of a choice has its finish_reason), a usage-only chunk when "
                       "stream_options.include_usage is set, an {\"error\": ...} object if the server ended "
                       "the stream, and finally [DONE]",
    }},
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (malformed JSON included)"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    429: {"model": ErrorResponse, "description": "Too many requests in flight; see Retry-After"},
    503: {"model": ErrorResponse, "description": "The server is shutting down"},
}


@dataclass
class Plan:
    """A validated request: the prompts as ids and what to do with them."""

    prompts: list[list[int]]
    max_tokens: list[int]
    params: SamplingParams
    stops: list[str]


def plan(req: CompletionRequest, served: str, context: int, vocab: int) -> Plan:
    if req.model is not None and req.model != served:
        raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{served}`",
                       "invalid_request_error", "model", "model_not_found")
    for name, bad, why in (
        ("n", req.n != 1, "n > 1 is not supported; send the request n times with different seeds"),
        ("best_of", req.best_of not in (None, 1), "best_of is not supported"),
        ("logprobs", req.logprobs is not None, "logprobs are not supported"),
        ("echo", req.echo, "echo is not supported"),
        ("suffix", bool(req.suffix), "suffix is not supported"),
        ("presence_penalty", req.presence_penalty != 0, "presence_penalty is not supported"),
        ("frequency_penalty", req.frequency_penalty != 0, "frequency_penalty is not supported"),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
    ):
        if bad:
            raise bad_request(why, name)
    p = req.prompt
    if isinstance(p, str):
        prompts = [encode(p)]
    elif p and all(isinstance(t, int) for t in p):
        prompts = [list(p)]
    elif p and all(isinstance(t, str) for t in p):
        prompts = [encode(t) for t in p]
    else:
        prompts = [list(t) for t in p]
    if not prompts:
        raise bad_request("prompt is empty; give a string, a list of strings, or token ids", "prompt")
    max_tokens = []
    for i, ids in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not ids:
            raise bad_request(f"{where} is empty; give at least one token", "prompt")
        out = [t for t in ids if not 0 <= t < vocab]
        if out:
            raise bad_request(f"{where} has token id {out[0]}, outside the vocabulary 0..{vocab - 1}", "prompt")
        room = context - len(ids)
        want = req.max_tokens if req.max_tokens is not None else room
        if room < 1 or want > room:
            raise bad_request(
                f"This model's maximum context length is {context} tokens; {where} has {len(ids)} and "
                f"max_tokens asks for {want} more: shorten the prompt or lower max_tokens", "max_tokens")
        max_tokens.append(want)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise bad_request(f"stop takes up to 4 strings, got {len(stops)}", "stop")
    top_k = req.top_k if req.top_k not in (None, -1, 0) else None
    try:
        params = SamplingParams(req.temperature, top_k, req.top_p if req.top_p < 1 else None)
    except ValueError as e:
        raise bad_request(str(e)) from None
    return Plan(prompts, max_tokens, params, stops)
