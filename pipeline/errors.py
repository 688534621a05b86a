"""Error codes of the inference contract. Caller errors say what to fix; transient ones are retried."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_JSON = "INVALID_JSON"
    INVALID_REQUEST = "INVALID_REQUEST"
    INVALID_INPUT = "INVALID_INPUT"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"

    @property
    def status(self) -> int:
        """The HTTP status the same error gets on the HTTP API."""
        return _STATUS[self]

    @property
    def transient(self) -> bool:
        """Retrying may succeed: such failures are retried, then dead-lettered, never blamed on the caller."""
        return self in (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL)


_STATUS = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class InferenceError(Exception):
    """One request failed. `request_id` is None when the request was too broken to name itself.

    `reply_to`: the topic a request that failed while it was read named, valid, in `parameters.reply_to` (set by
    `pipeline.protocol.parse_request`): its error answer goes there, as the answer to a request that was read does."""

    reply_to: str | None = None

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"InferenceError({self.code}, {self.message!r}, request_id={self.request_id!r})"

    def addressed_to(self, request_id: str) -> InferenceError:
        """This error as one request's own: a single failure (a lookup, a batch) is often shared by many."""
        return InferenceError(self.code, self.message, self.request_id or request_id)

    def to_json(self, model_name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.request_id}
        if model_name:
            body["model_name"] = model_name
        body["error"] = {"code": str(self.code), "status": self.code.status, "message": self.message}
        return body
