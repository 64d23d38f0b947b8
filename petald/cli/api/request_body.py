"""Reading a request's body: bounded in size, and for JSON, valid JSON of valid Unicode within a
nesting depth, so that whatever a caller sends is a 400 or 413 with a sentence, never a 500.

Python's ``json`` takes two things that break later code: strings holding a lone UTF-16
surrogate (``"\\ud800"``, which no UTF-8 encoder accepts: the tokenizer and the error's own JSON
reply failed on it), and nesting deep enough to exhaust the recursion limit (100,000 ``[``).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from petald.cli.api.errors import ApiError, bad_request

MAX_JSON_BODY = 4 * 1024 * 1024  # a chat of a few hundred thousand characters; prompts, not files
# OpenAI requests nest a handful of levels (a message's content parts, a tool's JSON schema).
MAX_JSON_DEPTH = 64


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, or a 400 (413: too large) saying what is wrong with it."""
    raw = await read_body(request, MAX_JSON_BODY)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request(f"the body nests JSON arrays or objects deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    _check_values(body)
    return body


def _check_values(body: Any) -> None:
    """Refuse nesting beyond MAX_JSON_DEPTH and strings (values or keys) that are not valid Unicode.
    Iterative: the body may nest as deep as the parser's own recursion allowed."""
    pending = [(body, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            _check_string(value)
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise bad_request(f"the body nests JSON arrays or objects deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, dict):
                for key in value:
                    _check_string(key)
            pending.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"the body holds a lone UTF-16 surrogate ({text[exc.start]!a}) in a JSON string: "
                          "text must be valid Unicode") from None
