"""Framing of V2 requests and results on every transport: JSON, or the binary tensor extension.

The binary form is the Open Inference Protocol's binary tensor data extension, as Triton and KServe speak
it over HTTP: a JSON header of `inference-header-content-length` bytes, followed by the raw little-endian
bytes of each tensor that declares `parameters.binary_data_size`. The same bytes travel as a Kafka record
value, an S3 object or an HTTP body; the length rides in a record header, object metadata or HTTP header,
and the `content-type` says which form it is. JSON stays the default and stays accepted everywhere.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import orjson
import simdjson

from models.datatypes import datatype_of
from pipeline.errors import ErrorCode, InferenceError
from pipeline.protocol import (
    InferenceRequest,
    InferenceResponse,
    parse_request,
    tensor_from_bytes,
    tensor_to_bytes,
)

JSON = "application/json"
BINARY = "application/octet-stream"
HEADER_LENGTH = "inference-header-content-length"
CONTENT_TYPE = "content-type"
ACCEPT = "accept"
#: A dead letter's request id, when the request named itself (here, not in sinks, for clients that read dead letters).
REQUEST_ID = "maas-request-id"


@dataclass(frozen=True)
class Framed:
    """An encoded message: its bytes and the transport headers that say how to read them."""

    body: bytes
    headers: Mapping[str, str]

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        if self.headers is _JSON_HEADERS:  # most answers: no need to encode the same header again
            return [(CONTENT_TYPE, _JSON_BYTES)]
        return [(k, v.encode()) for k, v in self.headers.items()]


# The headers of every JSON result and error: one read-only mapping shared by all of them.
_JSON_HEADERS: Mapping[str, str] = MappingProxyType({CONTENT_TYPE: JSON})
_JSON_BYTES = JSON.encode()


def header_map(headers: Iterable[tuple[str, bytes | str]] | Mapping[str, Any] | None) -> dict[str, str]:
    """Transport headers (Kafka list of pairs, HTTP or S3 metadata mapping) as lower-case str -> str."""
    if not headers:
        return {}
    items = headers if isinstance(headers, (tuple, list)) or not isinstance(headers, Mapping) else headers.items()
    return {k.lower(): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in items}


def _media_type(content_type: str | None) -> str:
    return (content_type or JSON).split(";")[0].strip().lower()


def decode_request(payload: bytes, headers: Mapping[str, str] | None = None, *, max_bytes: int,
                   defaults: dict[str, Any] | None = None, fallbacks: dict[str, Any] | None = None
                   ) -> InferenceRequest:
    """Decode a request from its bytes and transport headers (see `header_map`)."""
    headers = headers or {}
    if len(payload) > max_bytes:
        raise InferenceError(ErrorCode.PAYLOAD_TOO_LARGE, f"request is {len(payload)} bytes; the limit is {max_bytes}")
    unsupported = unsupported_media_type(headers.get(CONTENT_TYPE))
    if unsupported is not None:
        raise InferenceError(ErrorCode.INVALID_REQUEST, unsupported)
    header_length = _header_length(headers.get(HEADER_LENGTH), len(payload))
    if header_length is None:
        json_part, binary = payload, None
    else:
        view = memoryview(payload)
        json_part, binary = view[:header_length], view[header_length:]
    try:
        body = orjson.loads(json_part) if len(json_part) < _TENSOR_JSON_BYTES else _load_tensor_json(json_part)
    except (orjson.JSONDecodeError, ValueError, RuntimeError):  # simdjson: ValueError, RuntimeError
        try:  # orjson says where the problem is (simdjson: "STRING_ERROR"), or reads what simdjson would not
            body = orjson.loads(json_part)
        except orjson.JSONDecodeError as exc:
            raise InferenceError(ErrorCode.INVALID_JSON, f"request is not valid UTF-8 JSON: {exc}") from None
    request = parse_request(body, max_elements=max_bytes, defaults=defaults, fallbacks=fallbacks, binary=binary)
    if ACCEPT in headers and _prefers_binary(headers[ACCEPT]):
        request.parameters = {**request.parameters, "binary_data_output": True}
    return request


def _prefers_binary(accept: str) -> bool:
    """Whether an `accept` header ranks the binary extension above JSON: listed with the higher q (1 unless said),
    or first of the two at equal q. Only the first type counted: `application/octet-stream, application/json`
    (binary, JSON as a fallback) got JSON."""
    best: tuple[float, str] | None = None
    for part in accept.split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        if media not in (JSON, BINARY):
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0  # a preference that cannot be read is none
        if q > 0 and (best is None or q > best[0]):
            best = (q, media)
    return best is not None and best[1] == BINARY


_PLAIN_MEDIA_TYPES = frozenset((JSON, BINARY))  # as every client here sends them: no parameters, lower case


def unsupported_media_type(content_type: str | None) -> str | None:
    """Why a request of this content-type cannot be read, naming the ones that can; None when it can (no
    content-type reads as JSON). Messages get INVALID_REQUEST, HTTP callers 415 with the same words."""
    if content_type in _PLAIN_MEDIA_TYPES or _media_type(content_type) in _PLAIN_MEDIA_TYPES:
        return None
    return (f"content-type {_media_type(content_type)!r:.60} is not supported: send {JSON}, or {BINARY} with an "
            f"{HEADER_LENGTH} header (binary tensor extension)")

# From this size on, a JSON request is read with simdjson: the floating-point `data` of its inputs goes
# from the text straight into a float64 buffer, without a Python float per number (for an MNIST-sized
# request 15.5 us instead of 32.7 us with orjson and array.array). Smaller requests are faster with orjson.
_TENSOR_JSON_BYTES = 2048
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})


def _load_tensor_json(text: bytes | memoryview) -> Any:
    """The request as Python objects, except that the `data` of floating-point inputs is a flat float64
    array (nested lists flattened; `parse_request` checks the count against the shape).

    simdjson's `as_buffer` flattens any nesting, ragged (`[[1, 2, 3, 4], [5, 6]]`) or mixed (`[1, [2]]`) too,
    which the orjson path refuses: it is used only on rows of one length at each level, and the text must hold
    no `[` beyond the arrays seen, or the body is read by orjson after all (as it is when a string holds one).
    """
    doc = simdjson.Parser().parse(text)  # a parser per document: its views must not outlive the next parse
    if not isinstance(doc, simdjson.Object) or _duplicate_keys(doc):
        return _plain(doc)  # duplicate keys: the last one wins, as orjson (the small-body path) decides
    body, flattened = {}, 0  # flattened: the arrays that as_buffer read, which `body` no longer shows
    for key in doc:
        value = doc[key]
        if key == "inputs" and isinstance(value, simdjson.Array):
            tensors = [_tensor(t) for t in value]
            body[key] = [tensor for tensor, _ in tensors]
            flattened += sum(arrays for _, arrays in tensors)
        else:
            body[key] = _plain(value)
    if flattened and bytes(text).count(b"[") != flattened + _lists(body):
        return orjson.loads(text)
    return body


def _duplicate_keys(obj: Any) -> bool:
    """simdjson's ``obj[key]`` finds a key's first value, orjson keeps its last: such a body goes the slow way."""
    keys = list(obj.keys())
    return len(set(keys)) != len(keys)


def _tensor(tensor: Any) -> tuple[Any, int]:
    """One input, and how many arrays its `data` held if as_buffer read it (0 if not)."""
    if not isinstance(tensor, simdjson.Object) or _duplicate_keys(tensor):
        return _plain(tensor), 0
    out, flattened = {}, 0
    for key in tensor:
        value = tensor[key]
        if key == "data" and isinstance(value, simdjson.Array) and tensor.get("datatype") in _FLOAT_DATATYPES:
            read = _float_data(value)
            if read is not None:
                out[key], flattened = read
                continue
        out[key] = _plain(value)
    return out, flattened


def _float_data(data: simdjson.Array) -> tuple[np.ndarray, int] | None:
    """Numbers in rows of one length at each level of nesting, as a flat float64 array, and how many arrays
    held them; None for ragged rows or anything but numbers: the validating path explains what is wrong."""
    rows, arrays = [data], 1
    while len(rows[0]) and isinstance(rows[0][0], simdjson.Array):
        width = len(rows[0][0])
        rows = [row for outer in rows for row in outer]
        if not all(isinstance(row, simdjson.Array) and len(row) == width for row in rows):
            return None
        arrays += len(rows)
    try:
        return np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64), arrays
    except (TypeError, ValueError):  # not all numbers
        return None


def _lists(value: dict[str, Any] | list[Any]) -> int:
    """How many lists `value` holds, at any depth (a plain loop: this runs on every large request)."""
    count = 0
    for item in value.values() if type(value) is dict else value:
        if type(item) is list:
            count += 1 + _lists(item)
        elif type(item) is dict:
            count += _lists(item)
    return count


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _header_length(raw: str | None, size: int) -> int | None:
    if raw is None or raw == "":
        return None  # as the extension says: no length header means the whole body is JSON
    if not (raw.isascii() and raw.isdigit()):  # int() would take " 12", "+12", "1_2" and non-ASCII digits
        raise InferenceError(ErrorCode.INVALID_REQUEST, f"{HEADER_LENGTH}: {raw!r:.40} is not a whole number of "
                             "bytes")
    # More digits than the payload's size has cannot fit it; int() would refuse over 4,300 of them (ValueError)
    digits = raw.lstrip("0")
    length = int(digits) if digits and len(digits) <= len(str(size)) else 0
    if not 0 < length <= size:
        raise InferenceError(ErrorCode.INVALID_REQUEST, f"{HEADER_LENGTH}: {raw:.40} is outside the payload's "
                             f"{size} bytes")
    return length


def encode_response(response: InferenceResponse, request: InferenceRequest | None = None) -> Framed:
    """A result in the form its request asked for: outputs it wanted binary go as raw bytes."""
    binary = () if request is None else request.binary(response.outputs.keys())
    if not binary:
        return _frame(response.to_json(), [])
    body = response.to_json(without_data=binary)
    binary_parts: list[bytes] = []
    for out in body["outputs"]:
        if out["name"] in binary:
            raw = tensor_to_bytes(response.outputs[out["name"]], out["datatype"])
            out["parameters"] = {"binary_data_size": len(raw)}
            binary_parts.append(raw)
    return _frame(body, binary_parts)


def _frame(body: dict[str, Any], binary_parts: list[bytes]) -> Framed:
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary_parts:
        return Framed(header, _JSON_HEADERS)
    return Framed(b"".join([header, *binary_parts]), {CONTENT_TYPE: BINARY, HEADER_LENGTH: str(len(header))})


def encode_error(error: InferenceError, model_name: str | None = None) -> Framed:
    return Framed(orjson.dumps(error.to_json(model_name)), _JSON_HEADERS)


def encode_request(request_id: str, model_name: str, inputs: Mapping[str, np.ndarray], *, binary: bool = False,
                   model_version: str | None = None, parameters: dict[str, Any] | None = None,
                   outputs: Iterable[str] | None = None, binary_outputs: bool = False,
                   datatypes: Mapping[str, str] | None = None) -> Framed:
    """Client side: a request from numpy arrays, as JSON or with binary tensors."""
    body: dict[str, Any] = {"id": request_id, "model_name": model_name}
    if model_version is not None:
        body["model_version"] = str(model_version)
    params = dict(parameters or {})
    if binary_outputs and outputs is None:
        params["binary_data_output"] = True
    if params:
        body["parameters"] = params
    if outputs is not None:
        body["outputs"] = [{"name": n, **({"parameters": {"binary_data": True}} if binary_outputs else {})}
                           for n in outputs]
    tensors, parts = [], []
    for name, array in inputs.items():
        datatype = (datatypes or {}).get(name) or datatype_of(array)
        tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary:
            raw = tensor_to_bytes(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        elif datatype == "BYTES":
            tensor["data"] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        else:
            tensor["data"] = array.reshape(-1)
        tensors.append(tensor)
    body["inputs"] = tensors
    return _frame(body, parts)


def decode_response(payload: bytes, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Client side: a result or error body; binary outputs become numpy arrays under "data"."""
    headers = headers or {}
    length = _header_length(headers.get(HEADER_LENGTH), len(payload))
    view = memoryview(payload)
    body = orjson.loads(view if length is None else view[:length])
    offset = length or 0
    for out in body.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out["data"] = tensor_from_bytes(view[offset:offset + size], out["datatype"], out["shape"])
            offset += size
    return body


TRANSFER_ENCODING = "content-transfer-encoding"
# What SQS takes in a message body (XML 1.0's characters); a text with any other must travel base64.
_NOT_SQS_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def sqs_text(payload: bytes) -> str | None:
    """`payload` as an SQS body as it is, or None when it must travel base64 (not UTF-8, or characters SQS
    refuses). Text kept as text is spared base64's third more, which can take it past the queue's size limit."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text and not _NOT_SQS_TEXT.search(text) else None


def to_sqs_message(framed: Framed) -> dict[str, Any]:
    """SQS bodies must be text: binary messages travel base64-encoded, the framing in message attributes."""
    attributes = {k: {"DataType": "String", "StringValue": v} for k, v in framed.headers.items()}
    if framed.headers.get(CONTENT_TYPE) == BINARY:
        attributes[TRANSFER_ENCODING] = {"DataType": "String", "StringValue": "base64"}
        return {"MessageBody": base64.b64encode(framed.body).decode(), "MessageAttributes": attributes}
    return {"MessageBody": framed.body.decode("utf-8"), "MessageAttributes": attributes}


def from_sqs_message(body: str, attributes: Mapping[str, Any] | None) -> tuple[bytes, dict[str, str]]:
    """The payload and headers of an SQS message, from boto3's or Lambda's attribute shape."""
    headers = {}
    for name, value in (attributes or {}).items():
        text = value.get("StringValue", value.get("stringValue")) if isinstance(value, Mapping) else value
        if text is not None:
            headers[name.lower()] = str(text)
    if headers.get(TRANSFER_ENCODING) == "base64":
        try:
            return base64.b64decode(body, validate=True), headers
        except ValueError:
            raise InferenceError(ErrorCode.INVALID_REQUEST, "message body is not valid base64 although "
                                 f"{TRANSFER_ENCODING} says so") from None
    return body.encode("utf-8"), headers
