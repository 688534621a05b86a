"""Open Inference Protocol (KServe V2) requests and results, as JSON.

Decoding validates everything a caller controls and raises `InferenceError` with the field at fault,
before any large allocation: element counts are checked against the declared shape first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from models.artifact import validate_model_name
from models.datatypes import DATATYPES, NUMPY_DTYPES, datatype_of
from pipeline.errors import ErrorCode, InferenceError

MAX_ID_LENGTH = 256
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_INT_KINDS = {"i", "u"}


@dataclass
class InferenceRequest:
    id: str
    model_name: str
    model_version: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def deadline_ms(self) -> float | None:
        return self.parameters.get("deadline_ms")


@dataclass
class InferenceResponse:
    id: str
    model_name: str
    model_version: int
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_name": self.model_name,
            "model_version": str(self.model_version),
            "outputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": self.datatypes.get(name) or datatype_of(array),
                    "data": _to_json_data(array),
                }
                for name, array in self.outputs.items()
            ],
            **({"parameters": self.parameters} if self.parameters else {}),
        }


def _to_json_data(array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def encode_json(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _fail(code: ErrorCode, message: str, request_id: str | None = None) -> InferenceError:
    return InferenceError(code, message, request_id)


def decode_request(payload: bytes, *, max_bytes: int) -> InferenceRequest:
    """Parse and validate one V2 inference request (the JSON body of a record, message or HTTP call)."""
    if len(payload) > max_bytes:
        raise _fail(ErrorCode.PAYLOAD_TOO_LARGE, f"request is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise _fail(ErrorCode.INVALID_JSON, f"request is not valid UTF-8 JSON: {exc}") from None
    return parse_request(body, max_elements=max_bytes)


def parse_request(body: Any, *, max_elements: int, defaults: dict[str, Any] | None = None) -> InferenceRequest:
    """Validate a decoded V2 request body. `defaults` fills model_name/model_version from an HTTP path."""
    if not isinstance(body, dict):
        raise _fail(ErrorCode.INVALID_REQUEST, "request must be a JSON object")
    if defaults:
        body = {**defaults, **{k: v for k, v in body.items() if k not in defaults}}
    request_id = body.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_LENGTH:
        raise _fail(ErrorCode.INVALID_REQUEST, f"id: expected a non-empty string of at most {MAX_ID_LENGTH} "
                    f"characters, got {_short(request_id)}")
    try:
        model_name = validate_model_name(body.get("model_name"))
    except ValueError as exc:
        raise _fail(ErrorCode.INVALID_REQUEST, f"model_name: {exc}", request_id) from None
    version = body.get("model_version")
    if version is not None and not isinstance(version, str | int):
        raise _fail(ErrorCode.INVALID_REQUEST, "model_version: expected a string or integer", request_id)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters: expected an object", request_id)
    _check_parameters(parameters, request_id)
    outputs = _parse_outputs(body.get("outputs"), request_id)
    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail(ErrorCode.INVALID_REQUEST, "inputs: expected a non-empty list of tensors", request_id)
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    budget = max_elements
    for i, raw in enumerate(raw_inputs):
        name, datatype, array = _parse_tensor(raw, f"inputs[{i}]", request_id, budget)
        if name in inputs:
            raise _fail(ErrorCode.INVALID_REQUEST, f"inputs[{i}].name: {name!r} is given twice", request_id)
        budget -= array.size
        inputs[name] = array
        datatypes[name] = datatype
    rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(rows) != 1 or None in rows:
        raise _fail(ErrorCode.INVALID_INPUT, "inputs: every input needs the same first (batch) dimension",
                    request_id)
    return InferenceRequest(
        id=request_id,
        model_name=model_name,
        model_version=None if version is None else str(version),
        inputs=inputs,
        datatypes=datatypes,
        outputs=outputs,
        parameters=parameters,
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_parameters(parameters: dict[str, Any], request_id: str) -> None:
    deadline = parameters.get("deadline_ms")
    if deadline is not None and (
        isinstance(deadline, bool) or not isinstance(deadline, int | float) or not math.isfinite(deadline)
    ):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters.deadline_ms: expected a number (Unix time in ms)",
                    request_id)
    reply_to = parameters.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not _TOPIC_RE.match(reply_to)):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters.reply_to: expected a Kafka topic name "
                    "(letters, digits, '.', '_', '-')", request_id)
    priority = parameters.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters.priority: expected an integer", request_id)


def _parse_outputs(raw: Any, request_id: str) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw):
        raise _fail(ErrorCode.INVALID_REQUEST, "outputs: expected a list of objects with a name", request_id)
    return [o["name"] for o in raw]


def _parse_tensor(raw: Any, where: str, request_id: str, budget: int) -> tuple[str, str, np.ndarray]:
    if not isinstance(raw, dict):
        raise _fail(ErrorCode.INVALID_REQUEST, f"{where}: expected an object with name, shape, datatype, data",
                    request_id)
    name, shape, datatype = raw.get("name"), raw.get("shape"), raw.get("datatype")
    if not isinstance(name, str) or not name:
        raise _fail(ErrorCode.INVALID_REQUEST, f"{where}.name: expected a non-empty string", request_id)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _fail(ErrorCode.INVALID_REQUEST, f"{where}.shape: expected a list of non-negative integers",
                    request_id)
    if datatype not in DATATYPES:
        raise _fail(ErrorCode.INVALID_REQUEST, f"{where}.datatype: {_short(datatype)} is not one of "
                    f"{sorted(DATATYPES)}", request_id)
    count = math.prod(shape)
    if count > budget:
        raise _fail(ErrorCode.PAYLOAD_TOO_LARGE, f"{where}.shape {shape} declares {count} elements; the "
                    f"request may hold at most {budget}", request_id)
    if "data" not in raw:
        raise _fail(ErrorCode.INVALID_REQUEST, f"{where}.data: missing", request_id)
    array = _to_array(raw["data"], datatype, shape, f"{where}.data", request_id)
    return name, datatype, array


def _to_array(data: Any, datatype: str, shape: list[int], where: str, request_id: str) -> np.ndarray:
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(v, str) for v in flat):
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: BYTES data must be strings", request_id)
        array = np.array([v.encode("utf-8") for v in flat], dtype=object)
    else:
        try:
            parsed = np.asarray(data)
        except ValueError:
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: ragged nested lists", request_id) from None
        kind = parsed.dtype.kind
        ok = (
            (datatype == "BOOL" and kind == "b")
            or (dtype.kind in _INT_KINDS and kind in _INT_KINDS)
            or (dtype.kind == "f" and kind in {"f", "i", "u"})
            or parsed.size == 0
        )
        if not ok:
            got = {"U": "strings", "O": "mixed values", "b": "booleans", "f": "fractional numbers"}.get(kind, kind)
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: {datatype} tensor holds {got}", request_id)
        try:
            with np.errstate(over="raise", invalid="raise"):
                array = parsed.astype(dtype, casting="unsafe")
        except (OverflowError, FloatingPointError):
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: values out of range for {datatype}", request_id) \
                from None
        if dtype.kind in _INT_KINDS and kind in _INT_KINDS and not np.array_equal(array, parsed):
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: values out of range for {datatype}", request_id)
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: NaN or infinite values are not allowed", request_id)
    if array.size != math.prod(shape):
        raise _fail(ErrorCode.INVALID_INPUT, f"{where}: {array.size} values given, shape {shape} needs "
                    f"{math.prod(shape)}", request_id)
    return array.reshape(shape)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out
