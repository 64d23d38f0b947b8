"""The local API as a Starlette app: OpenAI-compatible endpoints, the swarm map, health, and a
native msgpack endpoint that runs a span of remote blocks on the caller's hidden states.

    GET  /health                 {"status": "ok", ...}
    GET  /v1/models              the model this daemon serves
    POST /v1/completions         OpenAI completions (``stream: true``: server-sent events)
    POST /v1/chat/completions    OpenAI chat completions (likewise)
    GET  /v1/swarm               the swarm map as JSON (what ``petald swarm --json`` prints)
    GET  /                       the dashboard, one HTML page (``dashboard.py``)
    GET  /petald/v1/node         this node's figures as JSON (what the dashboard polls)
    GET  /metrics                the node's metrics, Prometheus' text format (``metrics_endpoint.py``)
    POST /petald/v1/run_blocks   msgpack {start, end, hidden: tensor} -> {hidden: tensor}

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx
status. Starlette runs on anyio, so on the daemon's own trio loop.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from petald.cli.api.backend import GenerationEnd, GenerationRequest, ModelBackend, TextPiece
from petald.cli.api.dashboard import dashboard_endpoints
from petald.cli.api.errors import ApiError, as_api_error, bad_request
from petald.cli.api.metrics_endpoint import metrics_endpoint
from petald.cli.api.request_body import json_body, read_body
from petald.cli.api.request_log import RequestLog
from petald.kernels.models.features import served_positions
from petald.p2pnode.swarm.swarm_map import ModelMap
from petald.p2pnode.transport.node_metrics import NodeMetrics
from petald.protocol.limits import MAX_BATCH, MAX_FRAME_BYTES, WIRE_DTYPES
from petald.protocol.tensors import decode_tensor, encode_tensor

log = logging.getLogger(__name__)

MAX_NATIVE_BODY = MAX_FRAME_BYTES  # one tensor at the wire's own limit, plus a few fields
MAX_STOP_STRINGS = 4  # as OpenAI
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_SEED = 2**63 - 1


@dataclass
class ApiContext:
    """What the app serves: the backend, a way to read the swarm, and facts for /health."""
    backend: ModelBackend
    read_swarm: Callable[[], Awaitable[list[ModelMap]]]
    role: str  # "server" or "client"
    details: Callable[[], dict[str, Any]] = field(default=lambda: {})
    metrics: NodeMetrics = field(default_factory=NodeMetrics)  # the node's: its server's and its client's
    started_at: float = field(default_factory=time.time)


def make_app(context: ApiContext) -> Starlette:
    backend = context.backend
    model_id = backend.identity.model_id

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "role": context.role, "model": model_id,
                             "model_loaded": backend.model_loaded, "head_quant": backend.head_quant,
                             "generations": backend.generations_running,
                             "generations_total": backend.generations_total,
                             "tokens_generated": backend.tokens_generated,
                             "tokens_per_s": round(backend.token_rate.per_second(), 2),
                             "uptime_s": round(time.time() - context.started_at, 1), **context.details()})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(model_id, context.started_at)]})

    async def swarm(request: Request) -> Response:
        maps = await context.read_swarm()
        return JSONResponse({"models": [m.to_json() for m in maps]})

    async def completions(request: Request) -> Response:
        body = await json_body(request)
        _check_model(body, model_id)
        params = _sampling(body, default_max_tokens=DEFAULT_MAX_TOKENS)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt is empty", "prompt")
            ids = await backend.encode_text(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            vocab = backend.source.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise bad_request(f"token ids must be in [0, {vocab})", "prompt")
            ids = list(prompt)
        else:
            raise bad_request("prompt must be a non-empty string (or one list of token ids); "
                              "several prompts in one request are not supported", "prompt")
        if not ids:
            raise bad_request("the prompt encodes to no tokens", "prompt")
        _check_length(ids, params, backend)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        return await _respond(backend, GenerationRequest(ids, **params), body, model_id, request_id, chat=False)

    async def chat_completions(request: Request) -> Response:
        body = await json_body(request)
        _check_model(body, model_id)
        params = _sampling(body, default_max_tokens=None)
        messages = _messages(body.get("messages"))
        ids = await backend.encode_chat(messages)
        _check_length(ids, params, backend)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        return await _respond(backend, GenerationRequest(ids, **params), body, model_id, request_id, chat=True)

    async def run_blocks(request: Request) -> Response:
        raw = await read_body(request, MAX_NATIVE_BODY)
        # Unpacking, decoding and encoding tens of MiB is torch and copying: off the event loop.
        hidden, start, end, reply_dtype = await trio.to_thread.run_sync(_span_request, raw, backend)
        out = await backend.run_blocks(hidden, start, end)

        def pack() -> bytes:
            return msgpack.packb({"model_id": model_id, "start": start, "end": end,
                                  "hidden": encode_tensor(out, reply_dtype)}, use_bin_type=True)

        return Response(await trio.to_thread.run_sync(pack), media_type="application/msgpack")

    async def api_error(request: Request, exc: Exception) -> Response:
        error = as_api_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = (f"no endpoint {request.method} {request.url.path}" if exc.status_code in (404, 405)
                   else str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, message, type=kind).body(), status_code=exc.status_code)

    async def one_model(request: Request) -> Response:
        return await _one_model(request, model_id, context.started_at)

    endpoints = [("/health", "GET", health), ("/v1/models", "GET", models),
                 ("/v1/models/{name:path}", "GET", one_model), ("/v1/swarm", "GET", swarm),
                 ("/v1/completions", "POST", completions), ("/v1/chat/completions", "POST", chat_completions),
                 ("/petald/v1/run_blocks", "POST", run_blocks), ("/metrics", "GET", metrics_endpoint(context.metrics)),
                 *dashboard_endpoints(context)]
    routes = [Route(path, _answering_errors(endpoint), methods=[method]) for path, method, endpoint in endpoints]
    # The Exception handler is a last resort: Starlette re-raises after it, so the server logs
    # the traceback; every expected error is answered by _answering_errors without one.
    return Starlette(routes=routes, exception_handlers={Exception: api_error, HTTPException: http_error},
                     middleware=[Middleware(RequestLog)])


def _answering_errors(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            error = as_api_error(exc)
            return JSONResponse(error.body(), status_code=error.status)

    return answer


def _model_card(model_id: str, created: float) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": "petald-swarm"}


async def _one_model(request: Request, model_id: str, created: float) -> Response:
    name = request.path_params["name"]
    if not _same_model(name, model_id):
        raise ApiError(404, f"model {name!r} is not served here; this daemon serves {model_id}",
                       param="model", code="model_not_found")
    return JSONResponse(_model_card(model_id, created))


# --- requests --------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_model(name: str, model_id: str) -> bool:
    """The full id (``name@fingerprint``) or just its name part."""
    return name == model_id or name == model_id.partition("@")[0]


def _check_model(body: dict[str, Any], model_id: str) -> None:
    name = body.get("model")
    if name is None:
        return  # curl users may leave it out: this daemon serves one model
    if not isinstance(name, str):
        raise bad_request("model must be a string", "model")
    if not _same_model(name, model_id):
        raise ApiError(404, f"the model {name!r} does not exist here; this daemon serves {model_id} "
                            "(GET /v1/models)", param="model", code="model_not_found")


def _sampling(body: dict[str, Any], default_max_tokens: int | None) -> dict[str, Any]:
    """Sampling parameters, checked; unsupported OpenAI features are refused, not ignored."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens if default_max_tokens is not None else 256
    if not _is_int(max_tokens) or max_tokens < 1:
        raise bad_request("max_tokens must be a positive integer", "max_tokens")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise bad_request("temperature must be a number in [0, 2]", "temperature")
    top_p = body.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise bad_request("top_p must be a number in (0, 1]", "top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise bad_request("seed must be a non-negative integer", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise bad_request(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    n = body.get("n", 1)
    if n not in (1, None):
        raise bad_request("only n=1 is supported", "n")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, False, [], {}):
            raise bad_request(f"{name} is not supported by petald", name)
    if body.get("best_of") not in (None, 1):
        raise bad_request("best_of is not supported by petald", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported by petald", name)
    if not isinstance(body.get("stream", False), bool):
        raise bad_request("stream must be true or false", "stream")
    return {"max_new_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
            "seed": seed, "stop": stop}


def _check_length(ids: list[int], params: dict[str, Any], backend: ModelBackend) -> None:
    limit = served_positions(backend.source.config)
    if limit and len(ids) + params["max_new_tokens"] > limit:
        raise bad_request(f"the prompt ({len(ids)} tokens) and max_tokens ({params['max_new_tokens']}) exceed "
                          f"the model's context of {limit} tokens", "max_tokens", "context_length_exceeded")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string", "messages")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


def _span_request(raw: bytes, backend: ModelBackend) -> tuple[Any, int, int, str]:
    """The checked fields of a native run_blocks request: hidden [batch, tokens, hidden_size]."""
    try:
        message = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_NATIVE_BODY, max_str_len=4096,
                                  max_array_len=16, max_map_len=16)
    except Exception:
        raise bad_request("the body is not a msgpack map (content-type application/msgpack)") from None
    if not isinstance(message, dict):
        raise bad_request("the body must be a msgpack map with start, end and hidden")
    num_blocks = backend.identity.num_blocks
    hidden_size = backend.source.config.hidden_size
    start, end = message.get("start"), message.get("end")
    if not _is_int(start) or not _is_int(end) or not 0 <= start < end <= num_blocks:
        raise bad_request(f"start and end must be integers with 0 <= start < end <= {num_blocks}", "start")
    try:
        hidden = decode_tensor(message.get("hidden"), "hidden")
    except Exception as exc:  # ProtocolError: its message names the field and the problem
        raise bad_request(str(exc), "hidden", "bad_tensor") from None
    if hidden.dim() != 3 or hidden.shape[2] != hidden_size:
        raise bad_request(f"hidden must have shape [batch, tokens, {hidden_size}], got {list(hidden.shape)}",
                          "hidden", "bad_tensor")
    if not 1 <= hidden.shape[0] <= MAX_BATCH or hidden.shape[1] < 1:
        raise bad_request(f"hidden needs 1 to {MAX_BATCH} rows and at least one token", "hidden", "bad_tensor")
    reply_dtype = message.get("reply_dtype", message["hidden"]["dtype"])
    if reply_dtype not in WIRE_DTYPES:
        raise bad_request("reply_dtype must be float32, float16 or bfloat16", "reply_dtype")
    return hidden.float(), start, end, reply_dtype


# --- responses -------------------------------------------------------------------------------

async def _respond(backend: ModelBackend, request: GenerationRequest, body: dict[str, Any], model_id: str,
                   request_id: str, chat: bool) -> Response:
    created = int(time.time())
    events = backend.generate(request)
    if not body.get("stream"):
        text, end = [], None
        async for event in events:
            if isinstance(event, TextPiece):
                text.append(event.text)
            else:
                end = event
                text.append(event.text_tail)
        if end is None:
            raise _interrupted()
        return JSONResponse(_whole(chat, request_id, created, model_id, "".join(text), end))
    # The first event comes before any byte is sent, so a swarm that cannot serve the request
    # gets a proper error status instead of a stream that breaks at once.
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        raise _interrupted() from None
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(_sse(chat, request_id, created, model_id, first, events, include_usage),
                             media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _interrupted() -> ApiError:
    return ApiError(503, "the generation was interrupted: the daemon is shutting down", type="server_error",
                    code="shutting_down")


def _usage(end: GenerationEnd) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


def _whole(chat: bool, request_id: str, created: int, model_id: str, text: str, end: GenerationEnd) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": end.finish_reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end.finish_reason}
        kind = "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model_id, "choices": [choice],
            "usage": _usage(end)}


def _chunk(chat: bool, request_id: str, created: int, model_id: str, text: str | None,
           finish_reason: str | None, role: bool = False) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model_id, "choices": [choice]}


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _sse(chat: bool, request_id: str, created: int, model_id: str, first: TextPiece | GenerationEnd,
               events: AsyncIterator[TextPiece | GenerationEnd], include_usage: bool) -> AsyncIterator[bytes]:
    async def all_events() -> AsyncIterator[TextPiece | GenerationEnd]:
        yield first
        async for event in events:
            yield event

    if chat:
        yield _event(_chunk(chat, request_id, created, model_id, "", None, role=True))
    try:
        async for event in all_events():
            if isinstance(event, TextPiece):
                if event.text:
                    yield _event(_chunk(chat, request_id, created, model_id, event.text, None))
                continue
            if event.text_tail:
                yield _event(_chunk(chat, request_id, created, model_id, event.text_tail, None))
            yield _event(_chunk(chat, request_id, created, model_id, None if chat else "", event.finish_reason))
            if include_usage:
                usage = _chunk(chat, request_id, created, model_id, None, None)
                usage["choices"], usage["usage"] = [], _usage(event)
                yield _event(usage)
    except Exception as exc:  # mid-stream: the status is sent already, so the error is an event
        yield _event(as_api_error(exc).body())
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    yield b"data: [DONE]\n\n"
