"""Open Inference Protocol (KServe V2) requests and results, as JSON.

Decoding validates everything a caller controls and raises `InferenceError` with the field at fault,
before any large allocation: element counts are checked against the declared shape first.
"""

from __future__ import annotations

import math
from array import array as typed_array
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.artifact import VERSION_EXPECTED, short_repr, validate_model_name, version_number
from models.datatypes import DATATYPES, NUMPY_DTYPES, datatype_of
from pipeline.errors import ErrorCode, InferenceError
from pipeline.settings import valid_topic_name

MAX_ID_LENGTH = 256
# A tensor's rank and each dimension: numpy refuses more than 64 dimensions or one of 2**63 (a zero-size
# shape passes every element-count check), with a ValueError that would name no field.
MAX_DIMS, MAX_DIM = 16, 1 << 31
_INT_KINDS = {"i", "u"}


@dataclass(slots=True)
class InferenceRequest:
    id: str
    model_name: str
    model_version: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_data: dict[str, bool] = field(default_factory=dict)  # outputs[i].parameters.binary_data, where given
    inputs_uri: str | None = None

    def binary(self, outputs: Collection[str]) -> Collection[str]:
        """Which of `outputs` travel as raw bytes (the binary tensor extension): an output's own `binary_data`
        decides for it, as the extension says ("it overrides this setting"); the others follow
        `binary_data_output` (set by `accept: application/octet-stream` too)."""
        default = bool(self.parameters.get("binary_data_output"))
        return [name for name in outputs if self.binary_data.get(name, default)]

    @property
    def batch_rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def deadline_ms(self) -> float | None:
        return self.parameters.get("deadline_ms")


@dataclass(slots=True)
class InferenceResponse:
    id: str
    model_name: str
    model_version: int
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self, without_data: Collection[str] = frozenset()) -> dict[str, Any]:
        """The V2 result body; outputs named in `without_data` get no "data" (they travel as binary)."""
        outputs = []
        for name, array in self.outputs.items():
            tensor = {"name": name, "shape": list(array.shape),
                      "datatype": self.datatypes.get(name) or datatype_of(array)}
            if name not in without_data:
                tensor["data"] = _to_json_data(array)
            outputs.append(tensor)
        body = {"id": self.id, "model_name": self.model_name, "model_version": str(self.model_version),
                "outputs": outputs}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def _to_json_data(array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def _fail(code: ErrorCode, message: str, request_id: str | None = None) -> InferenceError:
    return InferenceError(code, message, request_id)


def parse_request(body: Any, *, max_elements: int, defaults: dict[str, Any] | None = None,
                  fallbacks: dict[str, Any] | None = None, binary: memoryview | None = None) -> InferenceRequest:
    """Validate a decoded V2 request body. `defaults` override the body (model_name/model_version from an
    HTTP path); `fallbacks` fill only what the body lacks (an id for HTTP callers, where it is optional).

    `binary` holds the tensor bytes that followed the JSON header (binary tensor extension): inputs with
    `parameters.binary_data_size` take their bytes from it, in order, without copying.
    """
    if not isinstance(body, dict):
        raise _fail(ErrorCode.INVALID_REQUEST, "request must be a JSON object")
    if fallbacks:
        body = {**fallbacks, **{k: v for k, v in body.items() if v is not None}}
    if defaults:
        body = {**body, **defaults}
    request_id = body.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_ID_LENGTH:
        raise _fail(ErrorCode.INVALID_REQUEST, f"id: expected a non-empty string of at most {MAX_ID_LENGTH} "
                    f"characters, got {short_repr(request_id)}")
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters: expected an object", request_id)
    reply_to = parameters.get("reply_to")
    if reply_to is not None and not valid_topic_name(reply_to):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters.reply_to: expected a Kafka topic name (letters, digits, "
                    "'.', '_', '-'; not '.', '..' or an internal '__' topic)", request_id)
    try:
        return _parse_named(body, request_id, parameters, max_elements, binary)
    except InferenceError as exc:  # its answer goes where the request asked, as a model's or a lookup's error does
        exc.reply_to = reply_to
        raise


def _parse_named(body: dict[str, Any], request_id: str, parameters: dict[str, Any], max_elements: int,
                 binary: memoryview | None) -> InferenceRequest:
    """`parse_request` past the request's id and reply_to (checked: its errors are answered there)."""
    model_name = body.get("model_name")
    if type(model_name) is not str or model_name not in _VALID_MODEL_NAMES:
        try:
            _remember_model_name(validate_model_name(model_name))
        except ValueError as exc:
            raise _fail(ErrorCode.INVALID_REQUEST, f"model_name: {exc}", request_id) from None
    version = body.get("model_version")
    if version is not None and version not in ("", "latest") and (
            type(version) not in (str, int) or version_number(str(version)) is None):
        raise _fail(ErrorCode.INVALID_REQUEST, f"model_version: expected {VERSION_EXPECTED}, got {short_repr(version)}",
                    request_id)
    if parameters:
        _check_parameters(parameters, request_id)
    outputs, binary_data = _parse_outputs(body.get("outputs"), request_id)
    raw_inputs = body.get("inputs")
    inputs_uri = body.get("inputs_uri")
    if inputs_uri is not None:
        if raw_inputs is not None:
            raise _fail(ErrorCode.INVALID_REQUEST, "give either inputs or inputs_uri, not both", request_id)
        if not isinstance(inputs_uri, str):
            raise _fail(ErrorCode.INVALID_REQUEST, "inputs_uri: expected an s3:// URI string", request_id)
        return InferenceRequest(
            id=request_id, model_name=model_name, model_version=None if version is None else str(version),
            inputs={}, datatypes={}, outputs=outputs, parameters=parameters, binary_data=binary_data,
            inputs_uri=inputs_uri,
        )
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail(ErrorCode.INVALID_REQUEST, "inputs: expected a non-empty list of tensors", request_id)
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    budget = max_elements
    cursor = None if binary is None else _BinaryCursor(binary, request_id)
    rows = None
    for i, raw in enumerate(raw_inputs):
        name, datatype, array = _parse_tensor(raw, i, request_id, budget, cursor)
        if name in inputs:
            raise _fail(ErrorCode.INVALID_REQUEST, f"inputs[{i}].name: {short_repr(name)} is given twice", request_id)
        if not array.ndim:
            raise _fail(ErrorCode.INVALID_INPUT, f"inputs[{i}].shape: expected a first (batch) dimension, got []",
                        request_id)
        if rows is not None and array.shape[0] != rows:
            raise _fail(ErrorCode.INVALID_INPUT, "inputs: every input needs the same first (batch) dimension",
                        request_id)
        rows = array.shape[0]
        budget -= array.size
        inputs[name] = array
        datatypes[name] = datatype
    if cursor is not None:
        cursor.finish()
    return InferenceRequest(request_id, model_name, None if version is None else str(version), inputs, datatypes,
                            outputs, parameters, binary_data)


def refuse_claim_checks(inputs_uri: Any, parameters: Any, request_id: str | None, where: str, inputs_instead: str,
                        output_instead: str) -> None:
    """Claim checks are read and written by the `Responder` of Kafka and SQS messages. Where nothing reads
    `inputs_uri` (the request failed as if its input were missing) or writes `parameters.output_uri` (silently
    not written), a request naming either is refused, naming the field, rather than answered with something it
    did not ask for."""
    if inputs_uri is not None:
        raise _fail(ErrorCode.INVALID_REQUEST, f"inputs_uri: not supported {where}: {inputs_instead}", request_id)
    if isinstance(parameters, dict) and parameters.get("output_uri") is not None:
        raise _fail(ErrorCode.INVALID_REQUEST, f"parameters.output_uri: not supported {where}: {output_instead}",
                    request_id)


# Names that passed `validate_model_name`: a fetch names the same few models thousands of times. Bounded,
# since names come from callers.
_VALID_MODEL_NAMES: set[str] = set()
_MAX_VALID_MODEL_NAMES = 4096


def _remember_model_name(name: str) -> None:
    if len(_VALID_MODEL_NAMES) >= _MAX_VALID_MODEL_NAMES:
        _VALID_MODEL_NAMES.clear()
    _VALID_MODEL_NAMES.add(name)


def _check_parameters(parameters: dict[str, Any], request_id: str) -> None:
    deadline = parameters.get("deadline_ms")
    if deadline is not None and (
        isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline)
    ):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters.deadline_ms: expected a number (Unix time in ms)",
                    request_id)
    output_uri = parameters.get("output_uri")
    if output_uri is not None and not isinstance(output_uri, str):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters.output_uri: expected an s3:// URI string", request_id)
    priority = parameters.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters.priority: expected an integer", request_id)
    binary = parameters.get("binary_data_output")
    if binary is not None and not isinstance(binary, bool):
        raise _fail(ErrorCode.INVALID_REQUEST, "parameters.binary_data_output: expected true or false", request_id)


def _parse_outputs(raw: Any, request_id: str) -> tuple[list[str] | None, dict[str, bool]]:
    """The outputs asked for (None, as for an empty list: all of them) and the `binary_data` each one sets."""
    if raw is None or raw == []:
        return None, {}
    if not isinstance(raw, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw):
        raise _fail(ErrorCode.INVALID_REQUEST, "outputs: expected a list of objects with a name", request_id)
    binary = {}
    for index, output in enumerate(raw):
        parameters = output.get("parameters")
        if parameters is None:
            continue
        where = f"outputs[{index}].parameters"
        if not isinstance(parameters, dict):
            raise _fail(ErrorCode.INVALID_REQUEST, f"{where}: expected an object", request_id)
        unknown = sorted(set(parameters) - {"binary_data"})
        if unknown:  # Triton's classification, for one, would change what comes back: not silently ignored
            raise _fail(ErrorCode.INVALID_REQUEST, f"{where}.{unknown[0]:.60}: not supported (an output takes "
                        "binary_data only)", request_id)
        if "binary_data" in parameters:
            if not isinstance(parameters["binary_data"], bool):
                raise _fail(ErrorCode.INVALID_REQUEST, f"{where}.binary_data: expected true or false", request_id)
            binary[output["name"]] = parameters["binary_data"]
    return [o["name"] for o in raw], binary


class _BinaryCursor:
    """Hands out consecutive slices of the binary part of a request, and checks it is used up exactly."""

    def __init__(self, view: memoryview, request_id: str) -> None:
        self.view = view
        self.offset = 0
        self.request_id = request_id

    def take(self, size: Any, where: str) -> memoryview:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _fail(ErrorCode.INVALID_REQUEST, f"{where}.parameters.binary_data_size: expected a non-negative "
                        "integer", self.request_id)
        end = self.offset + size
        if end > len(self.view):
            raise _fail(ErrorCode.INVALID_REQUEST, f"{where}: binary_data_size {size} runs past the end of the "
                        f"payload ({len(self.view) - self.offset} bytes left): truncated request?", self.request_id)
        chunk = self.view[self.offset:end]
        self.offset = end
        return chunk

    def finish(self) -> None:
        if self.offset != len(self.view):
            raise _fail(ErrorCode.INVALID_REQUEST, f"{len(self.view) - self.offset} bytes follow the last binary "
                        "tensor: binary_data_size values do not add up to the payload", self.request_id)


def _parse_tensor(raw: Any, index: int, request_id: str, budget: int, cursor: _BinaryCursor | None
                  ) -> tuple[str, str, np.ndarray]:
    if not isinstance(raw, dict):
        raise _fail(ErrorCode.INVALID_REQUEST, f"inputs[{index}]: expected an object with name, shape, datatype, "
                    "data", request_id)
    name, shape, datatype = raw.get("name"), raw.get("shape"), raw.get("datatype")
    if not isinstance(name, str) or not name:
        raise _fail(ErrorCode.INVALID_REQUEST, f"inputs[{index}].name: expected a non-empty string", request_id)
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise _shape_error(index, request_id)
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:  # bool is not int here; numpy takes dims below 2**63
            raise _shape_error(index, request_id)
    if datatype not in DATATYPES:
        raise _fail(ErrorCode.INVALID_REQUEST, f"inputs[{index}].datatype: {short_repr(datatype)} is not one of "
                    f"{sorted(DATATYPES)}", request_id)
    count = math.prod(shape)
    if count > budget:
        raise _fail(ErrorCode.PAYLOAD_TOO_LARGE, f"inputs[{index}].shape {short_repr(shape)} declares {count} "
                    f"elements; the request may hold at most {budget}", request_id)
    params = raw.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise _fail(ErrorCode.INVALID_REQUEST, f"inputs[{index}].parameters: expected an object", request_id)
    if params and "binary_data_size" in params:
        where = f"inputs[{index}]"
        if "data" in raw:  # one of the two would be dropped without a word
            raise _fail(ErrorCode.INVALID_REQUEST, f"{where}: give data or parameters.binary_data_size, not both",
                        request_id)
        if cursor is None:
            raise _fail(ErrorCode.INVALID_REQUEST, f"{where}.parameters.binary_data_size is set but the request "
                        "carries no binary part (send it with an inference-header-content-length)", request_id)
        chunk = cursor.take(params["binary_data_size"], where)
        try:
            array = tensor_from_bytes(chunk, datatype, shape)
        except ValueError as exc:
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: {exc}", request_id) from None
        return name, datatype, array
    data = raw.get("data", _MISSING)
    if data is _MISSING:
        raise _fail(ErrorCode.INVALID_REQUEST, f"inputs[{index}].data: missing (or give "
                    "parameters.binary_data_size)", request_id)
    array = _flat_numbers(data, datatype, shape, count)
    if array is None:  # the slow path validates and explains
        array = _to_array(data, datatype, shape, f"inputs[{index}].data", request_id)
    return name, datatype, array


_MISSING = object()


def _shape_error(index: int, request_id: str) -> InferenceError:
    return _fail(ErrorCode.INVALID_REQUEST, f"inputs[{index}].shape: expected a list of at most {MAX_DIMS} "
                 f"integers in 0..{MAX_DIM:,}", request_id)


def _to_array(data: Any, datatype: str, shape: list[int], where: str, request_id: str) -> np.ndarray:
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(v, str) for v in flat):
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: BYTES data must be strings", request_id)
        if not _regular(data):  # as numbers' are refused: flattened, rows of other lengths passed as one
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: ragged nested lists", request_id)
        array = np.array([v.encode("utf-8") for v in flat], dtype=object)
    else:
        try:
            parsed = np.asarray(data)
        except ValueError:
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: ragged nested lists", request_id) from None
        kind = parsed.dtype.kind
        if datatype != "BOOL" and kind != "b" and any(type(v) is bool for v in _flatten(data)):
            kind = "O"  # numbers and booleans mixed: numpy would read the booleans as 1 and 0
        ok = (
            (datatype == "BOOL" and kind == "b")
            or (dtype.kind in _INT_KINDS and kind in _INT_KINDS)
            or (dtype.kind == "f" and kind in {"f", "i", "u"})
            or parsed.size == 0
        )
        if not ok and kind == "f" and dtype.kind in _INT_KINDS and all(type(v) is int for v in _flatten(data)):
            # integers below 0 and past INT64 together: no integer dtype holds both, so numpy made them floats
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: values out of range for {datatype}", request_id)
        if not ok:
            got = {"U": "strings", "O": "mixed values", "b": "booleans", "f": "fractional numbers", "i": "integers",
                   "u": "integers"}.get(kind, kind)
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: {datatype} tensor holds {got}", request_id)
        try:
            with np.errstate(over="raise", invalid="raise"):
                array = parsed.astype(dtype, casting="unsafe")
        except (OverflowError, FloatingPointError):
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: values out of range for {datatype}", request_id) \
                from None
        if dtype.kind in _INT_KINDS and kind in _INT_KINDS and not np.array_equal(array, parsed):
            raise _fail(ErrorCode.INVALID_INPUT, f"{where}: values out of range for {datatype}", request_id)
    if array.size != math.prod(shape):
        raise _fail(ErrorCode.INVALID_INPUT, f"{where}: {array.size} values given, shape {short_repr(shape)} needs "
                    f"{math.prod(shape)}", request_id)
    return array.reshape(shape)


# array.array parses a flat list of Python numbers straight into a typed buffer, about twice as fast as
# np.asarray on a list, and refuses what does not fit (fractions for integers, out-of-range values).
_ARRAY_CODES = {"FP32": "f", "FP64": "d", "INT8": "b", "UINT8": "B", "INT16": "h", "UINT16": "H",
                "INT32": "i", "UINT32": "I", "INT64": "q", "UINT64": "Q"}


def _flat_numbers(data: Any, datatype: str, shape: list[int], count: int) -> np.ndarray | None:
    """The fast path for the common cases: a flat list of `count` numbers, or the flat float64 array that the
    codec reads large JSON requests into. None sends the data down the validating slow path."""
    if type(data) is np.ndarray:
        if data.size != count or not count:
            return None
        try:
            with np.errstate(over="raise"):
                return data.astype(NUMPY_DTYPES[datatype], copy=False).reshape(shape)
        except FloatingPointError:  # out of range for FP16
            return None
    code = _ARRAY_CODES.get(datatype)
    if code is None or type(data) is not list or len(data) != count or not data or bool in map(type, data):
        return None  # array.array would take true and false for 1 and 0
    try:
        array = np.ndarray(shape, NUMPY_DTYPES[datatype], typed_array(code, data))
    except (TypeError, OverflowError):  # nested lists, strings, fractions for integers, out-of-range values
        return None
    if code == "f" and not np.isfinite(array).all():  # JSON has no NaN or inf: a number past FP32's range
        return None
    return array


_LITTLE_ENDIAN = {name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"}


def tensor_from_bytes(chunk: memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """Raw little-endian tensor bytes -> array, without copying where the dtype allows (read-only view)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(chunk, count).reshape(shape)
    itemsize = 2 if datatype == "BF16" else NUMPY_DTYPES[datatype].itemsize
    if len(chunk) != count * itemsize:
        raise ValueError(f"{len(chunk)} bytes given, shape {short_repr(shape)} of {datatype} needs {count * itemsize}")
    if datatype == "BF16":
        raw = np.frombuffer(chunk, dtype="<u2")
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    array = np.ndarray(shape, _LITTLE_ENDIAN[datatype], chunk)  # a read-only view of the payload
    # The extension's BOOL is one byte, 0 or 1: numpy keeps any other byte as a True that sums, casts and goes
    # back out in binary as itself (2 is True in JSON, 2 in bytes).
    if datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        raise ValueError("BOOL bytes must be 0 (false) or 1 (true)")
    return array


def tensor_to_bytes(array: np.ndarray, datatype: str) -> bytes:
    """The binary tensor extension's layout: raw little-endian; BYTES as 4-byte length + bytes per element."""
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1):
            item = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts += [len(item).to_bytes(4, "little"), item]
        return b"".join(parts)
    if datatype == "BF16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        return rounded.astype("<u2").tobytes()
    layout = _LITTLE_ENDIAN[datatype]
    return (array if array.dtype == layout else array.astype(layout)).tobytes()  # tobytes: C order, always


def _bytes_elements(chunk: memoryview, count: int) -> np.ndarray:
    offset, size = 0, len(chunk)
    # Each element takes at least its 4-byte length: a shape that declares more elements than the bytes can hold is
    # refused before its array is made. A 100-byte claim-checked object declaring 64 Mi elements (within the element
    # budget, which is the payload limit) made an array of 512 MiB of pointers before the first length was read.
    if count * 4 > size:
        raise ValueError(f"BYTES data of {size} bytes cannot hold {count} elements (each has a 4-byte length)")
    out = np.empty(count, dtype=object)
    for i in range(count):
        if offset + 4 > size:
            raise ValueError(f"BYTES data ends after {i} of {count} elements")
        length = int.from_bytes(chunk[offset:offset + 4], "little")
        offset += 4
        if offset + length > size:
            raise ValueError(f"BYTES element {i} claims {length} bytes, only {size - offset} remain")
        out[i] = bytes(chunk[offset:offset + length])
        offset += length
    if offset != size:
        raise ValueError(f"{size - offset} bytes follow the last of {count} BYTES elements")
    return out


def _regular(data: Any) -> bool:
    """Whether nested lists are a regular array: at each depth lists of one length, or values alone (numpy's
    check, without the fixed-width string array numpy would make of BYTES data: a long string times every
    element)."""
    level = [data]
    while True:
        lists = [item for item in level if isinstance(item, list)]
        if not lists:
            return True
        if len(lists) != len(level) or any(len(item) != len(lists[0]) for item in lists):
            return False
        level = [item for nested in lists for item in nested]


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
