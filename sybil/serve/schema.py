"""The OpenAI completion API's shapes, as /openapi.json publishes them, and the rules
that turn a request into validated prompts (sybil.serve.api serves them).

Types are read as JSON Schema reads them (false is not token 0, "7" is not an
integer), and every rule a schema cannot say (the vocabulary, the context, what
is not supported) is checked in plan(), so that bad input is a 400 before
anything is queued.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from sybil.sample.logprobs import MAX_TOP, TokenLogprob
from sybil.sample.params import SamplingParams
from sybil.weights.tokenizer import EOT, EOT_ID, decode, encode

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
    Types as JSON Schema reads them: false is not token 0, and "1.5" is not a number.
    Neutral values (n 1, zero penalties, an empty logit_bias, logprobs null, best_of 1)
    mean "not set", as clients such as langchain-openai always send them."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model name (default: the one served)")
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Int | None = Field(16, ge=0, description="null: up to the context; 0 only with echo (score the prompt)")
    temperature: Float = Field(1.0, ge=0)
    top_p: Float = Field(1.0, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1, description="-1, 0 or null: no top-k")
    seed: Int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: Bool = False
    return_token_ids: Bool = False
    n: Int = Field(1, ge=1, description="choices per prompt, each its own row; index = prompt_index * n + i")
    logprobs: Int | None = Field(None, ge=0, le=MAX_TOP, description="log-probabilities with this many alternatives")
    echo: Bool = False
    best_of: Int | None = None
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Float] | None = Field(None, description="token id (as a string) -> value in [-100, 100]")
    suffix: str | None = None
    user: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose cache entries a slot already held (the prompt cache)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token, its string, log-probability, the most likely
    alternatives (decoded string -> logprob, the chosen token included) and where it
    starts in the returned text. The first prompt token of an echo has null ones."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: Bool = Field(True, description="GPT-2 adds no special tokens either way")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[Int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """vLLM's GET /tokenizer_info: what lm-evaluation-harness's remote tokenizer reads."""

    tokenizer_class: str = "GPT2TokenizerFast"
    eos_token: str = EOT
    eos_token_id: int = EOT_ID
    bos_token: str = EOT
    bos_token_id: int = EOT_ID
    pad_token: str | None = None
    model_max_length: int
    vocab_size: int


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
    n: int = 1
    logprobs: int | None = None
    echo: bool = False

    @property
    def prompt_logprobs(self) -> int | None:
        """Alternatives for each prompt token: an echo with logprobs scores the prompt."""
        return self.logprobs if self.echo else None


def choice_seed(seed: int | None, i: int) -> int | None:
    """Choice i's seed, derived from (seed, i): choice 0 keeps the request's seed (so
    n=1 is what a plain seeded request gives) and the others get seeds that do not
    collide with another request's seed + i."""
    if seed is None or i == 0:
        return seed
    digest = hashlib.sha256(f"sybil-choice:{seed}:{i}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys are token ids as strings, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab:
            raise bad_request(f"logit_bias names token {token}, outside the vocabulary 0..{vocab - 1}", "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias for token {token} is {value}; values must be in [-100, 100]", "logit_bias")
        out.append((token, float(value)))
    return tuple(sorted(out))


def prompt_ids(p: str | list) -> list[list[int]]:
    """The prompt field (a string, token ids, a list of strings or of id lists) as id lists."""
    if isinstance(p, str):
        return [encode(p)]
    if p and all(isinstance(t, int) for t in p):
        return [list(p)]
    if p and all(isinstance(t, str) for t in p):
        return [encode(t) for t in p]
    return [list(t) for t in p]


def check_model(model: str | None, served: str) -> None:
    """A 404 for a model name other than the served one (None: the served one)."""
    if model is not None and model != served:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{served}`",
                       "invalid_request_error", "model", "model_not_found")


def plan(req: CompletionRequest, served: str, context: int, vocab: int) -> Plan:
    check_model(req.model, served)
    for name, bad, why in (
        ("best_of", req.best_of not in (None, 1), "best_of is not supported (vLLM dropped it too); use n"),
        ("suffix", bool(req.suffix), "suffix is not supported: GPT-2 has no fill-in-the-middle"),
        ("max_tokens", req.max_tokens == 0 and not req.echo,
         "max_tokens must be at least 1; 0 is only for echo (to score the prompt)"),
    ):
        if bad:
            raise bad_request(why, name)
    prompts = prompt_ids(req.prompt)
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
        max_tokens.append(_room(req, where, len(ids), context))
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    top_k = req.top_k if req.top_k not in (None, -1, 0) else None
    try:
        params = SamplingParams(req.temperature, top_k, req.top_p if req.top_p < 1 else None,
                                _logit_bias(req.logit_bias, vocab), req.presence_penalty, req.frequency_penalty)
    except ValueError as e:
        raise bad_request(str(e)) from None
    return Plan(prompts, max_tokens, params, stops, req.n, req.logprobs, req.echo)


def _room(req: CompletionRequest, where: str, n: int, context: int) -> int:
    """max_tokens for a prompt of n tokens, or a 400 that says what to shorten."""
    if req.max_tokens == 0:  # echo, scoring only: the whole context may be prompt
        if n > context:
            raise bad_request(f"{where} has {n} tokens; this model's context is {context}: "
                              f"shorten it to at most {context} tokens", "prompt")
        return 0
    if n >= context:
        raise bad_request(f"{where} has {n} tokens; this model's context is {context} tokens for prompt and "
                          f"completion together: shorten the prompt to at most {context - 1} tokens", "prompt")
    room = context - n
    if req.max_tokens is None:
        return room
    if req.max_tokens > room:
        given = "max_tokens is" if "max_tokens" in req.model_fields_set else "max_tokens defaults to"
        raise bad_request(f"{where} has {n} tokens and {given} {req.max_tokens}, more than this model's context of "
                          f"{context} tokens allows: lower max_tokens to at most {room} or shorten the prompt",
                          "max_tokens")
    return req.max_tokens


def logprobs_json(entries: list[TokenLogprob | None], tokens: list[int], offset: int) -> dict:
    """OpenAI's legacy logprobs object for tokens (entries[i] is tokens[i]'s, None for
    an echo's first token); text offsets count from offset, as vLLM's do."""
    strs = [decode([t]) for t in tokens]
    offsets = []
    for t in strs:
        offsets.append(offset)
        offset += len(t)
    tops = []
    for e in entries:
        if e is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, lp in e.top:
            top.setdefault(decode([t]), lp)  # two ids may decode alike (a split character): keep the likelier
        top.setdefault(decode([e.token]), e.logprob)
        tops.append(top)
    return CompletionLogprobs(tokens=strs, token_logprobs=[None if e is None else e.logprob for e in entries],
                              top_logprobs=tops, text_offset=offsets).model_dump()
