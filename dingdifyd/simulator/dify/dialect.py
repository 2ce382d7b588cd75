"""How the fake Dify writes its bytes, per Dify version: 0.15.3 or 1.16.1, as the recorded transcripts show.

Only the writing differs here (separators, escapes, trailing newlines, headers, validation messages); what an
app does is the rest of the fake's business. The differences, from tests/fixtures/dify-1.16.1/README.md:

- streams: 0.15.3 writes `json.dumps` chunks (`", "` separators, ASCII escapes) and pings only when idle;
  1.16.1 writes compact UTF-8 chunks (orjson) and starts chatflow and workflow streams with `event: ping`;
- flask error and plain JSON bodies: 0.15.3 `json.dumps` plus a newline; 1.16.1 compact, ASCII escapes, `/`
  escaped as `\\/`, plus a newline;
- request validation: 0.15.3 flask-restful reqparse (`params` names the field); 1.16.1 pydantic's text;
- headers: 1.16.1 adds `Access-Control-Expose-Headers` and `Vary`, and `WWW-Authenticate` on a 401.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

DIFY_0_15 = "0.15.3"
DIFY_1_16 = "1.16.1"
VERSIONS = (DIFY_0_15, DIFY_1_16)

# The captures' fake models end every echo with this (0.15.3: a fake OpenAI server; 1.16.1: a model plugin stub).
ANSWER_TAILS = {
    DIFY_0_15: "This is a fake streamed answer from the local fake OpenAI server.",
    DIFY_1_16: "This is a fake streamed answer from the local fake model.",
}
PYDANTIC_DOCS = "https://errors.pydantic.dev/2.12/v/"


def check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"the fake Dify speaks {' or '.join(VERSIONS)}, not {version!r}")
    return version


class ValidationFailure(Exception):
    """A request body Dify refuses before running anything: `field` and what is wrong, in both dialects' words."""

    def __init__(self, field: str, kind: str, *, value: Any = None, body: Any = None):
        super().__init__(f"{field}: {kind}")
        self.field = field
        self.kind = kind  # missing | not_uuid | bad_choice
        self.value = value
        self.body = body


@dataclass(frozen=True)
class Dialect:
    version: str

    @property
    def is_1x(self) -> bool:
        return self.version != DIFY_0_15

    @property
    def answer_tail(self) -> str:
        return ANSWER_TAILS[self.version]

    # --- streams ------------------------------------------------------------------------------------------

    def chunk(self, obj: dict[str, Any]) -> bytes:
        if self.is_1x:
            return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()
        return f"data: {json.dumps(obj)}\n\n".encode()

    def leading_ping(self, mode: str) -> bool:
        """1.16.1 starts workflow-based streams (chatflow, workflow) with a ping; classic apps start with data."""
        return self.is_1x and mode in ("advanced-chat", "workflow")

    def stream_headers(self, *, events_route: bool = False) -> dict[str, str]:
        headers = {"Content-Type": "text/event-stream; charset=utf-8"}
        if events_route:  # the resume route's own Response sets these (72, 62)
            headers = {"Cache-Control": "no-cache", "Connection": "keep-alive", **headers}
        return headers

    # --- JSON bodies --------------------------------------------------------------------------------------

    def restx_body(self, obj: Any, status: int = 200) -> web.Response:
        """What flask-restful (0.15.3) / flask-restx (1.16.1) write: errors, /info, /parameters, stop, upload."""
        if self.is_1x:
            text = json.dumps(obj, separators=(",", ":")).replace("/", "\\/") + "\n"
        else:
            text = json.dumps(obj) + "\n"
        return web.Response(status=status, body=text.encode(), content_type="application/json")

    def blocking_body(self, obj: Any) -> web.Response:
        """A blocking answer: Dify's own `json.dumps`, no newline; 1.16.1 names the charset."""
        response = web.Response(status=200, body=json.dumps(obj).encode(), content_type="application/json")
        if self.is_1x:
            response.headers["Content-Type"] = "application/json; charset=utf-8"
        return response

    def form_body(self, obj: Any) -> web.Response:
        """`GET /form/human_input/:token`: a Response of `json.dumps(..., ensure_ascii=False)`, no newline (61)."""
        return web.Response(
            status=200, body=json.dumps(obj, ensure_ascii=False).encode(), content_type="application/json"
        )

    def no_content(self) -> web.Response:
        """1.16.1 deletes a conversation with 204 and no body (99); 0.15.3 said `{"result": "success"}`."""
        if self.is_1x:
            response = web.Response(status=204)
            response.headers["Content-Type"] = "application/json"
            return response
        return self.restx_body({"result": "success"})

    def add_headers(self, response: web.StreamResponse) -> None:
        response.headers["Access-Control-Allow-Origin"] = "*"
        if self.is_1x:
            response.headers["Access-Control-Expose-Headers"] = "X-Env, X-Trace-Id, X-Version"
        response.headers["X-Version"] = self.version
        response.headers["X-Env"] = "PRODUCTION"
        if self.is_1x:
            response.headers["Vary"] = "Cookie"
            if response.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="api"'

    # --- errors -------------------------------------------------------------------------------------------

    def with_route_hint(self, message: str, path: str, hint: str) -> str:
        """flask-restx's route hint that 1.16.1 appends to a 404 message (23, 61b)."""
        if not self.is_1x:
            return message
        return f"{message.rstrip('.')}. You have requested this URI [{path}] but did you mean {hint} ?"

    def validation_payload(self, failure: ValidationFailure, model: str) -> dict[str, Any]:
        """The 400 `invalid_param` body of a malformed generation request."""
        if not self.is_1x:
            message = {
                "missing": "Missing required parameter in the JSON body",
                "not_uuid": f"{failure.value} is not a valid uuid.",
                "bad_choice": f"{failure.value} is not a valid choice",
            }[failure.kind]
            return {"code": "invalid_param", "message": message, "params": failure.field}
        if failure.kind == "missing":
            detail = f"Field required [type=missing, input_value={_pydantic_repr(failure.body)}, input_type=dict]"
            doc = "missing"
        elif failure.kind == "not_uuid":
            detail = (
                f"Value error, {failure.field} must be a valid UUID "
                f"[type=value_error, input_value={_pydantic_repr(failure.value)}, input_type=str]"
            )
            doc = "value_error"
        else:
            detail = (
                "Input should be 'blocking' or 'streaming' "
                f"[type=literal_error, input_value={_pydantic_repr(failure.value)}, input_type=str]"
            )
            doc = "literal_error"
        message = f"1 validation error for {model}\n{failure.field}\n  {detail}\n    For further information visit "
        return {"code": "invalid_param", "message": message + PYDANTIC_DOCS + doc, "status": 400}


def _pydantic_repr(value: Any) -> str:
    """pydantic-core shortens an input's repr to its first 25 and last 24 characters (31, 35b)."""
    text = repr(value)
    return text if len(text) <= 50 else f"{text[:25]}...{text[-24:]}"
