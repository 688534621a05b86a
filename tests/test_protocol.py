"""V2 request decoding: valid requests become numpy tensors; every malformed field is named in the error."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from pipeline import codec
from pipeline.codec import decode_request
from pipeline.errors import ErrorCode, InferenceError
from pipeline.protocol import InferenceResponse

LIMIT = 1 << 20


def _request(**overrides) -> dict:
    body = {
        "id": "r1",
        "model_name": "mnist_mlp",
        "inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6.5]}],
    }
    body.update(overrides)
    return body


def _decode(body) -> object:
    return decode_request(body if isinstance(body, bytes) else orjson.dumps(body), max_bytes=LIMIT)


def test_valid_request_becomes_typed_arrays():
    request = _decode(_request(model_version="2", parameters={"priority": 3}))
    assert request.id == "r1" and request.model_version == "2" and request.batch_rows == 2
    array = request.inputs["input"]
    assert array.dtype == np.float32 and array.shape == (2, 3)
    np.testing.assert_array_equal(array, np.array([[1, 2, 3], [4, 5, 6.5]], dtype=np.float32))


def test_nested_data_and_bytes_and_ints():
    request = _decode(_request(inputs=[
        {"name": "a", "shape": [1, 2], "datatype": "INT32", "data": [[7, -8]]},
        {"name": "t", "shape": [1], "datatype": "BYTES", "data": ["héllo"]},
    ]))
    assert request.inputs["a"].dtype == np.int32 and request.inputs["a"].tolist() == [[7, -8]]
    assert request.inputs["t"].tolist() == ["héllo".encode()]


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        (b"{not json", ErrorCode.INVALID_JSON, "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", ErrorCode.INVALID_JSON, "not valid UTF-8 JSON"),
        (b"[1, 2]", ErrorCode.INVALID_REQUEST, "must be a JSON object"),
        (_request(id=None), ErrorCode.INVALID_REQUEST, "id: expected a non-empty string"),
        (_request(id="x" * 300), ErrorCode.INVALID_REQUEST, "id: expected"),
        (_request(model_name="../etc"), ErrorCode.INVALID_REQUEST, "model_name"),
        (_request(model_name=["mnist_mlp"]), ErrorCode.INVALID_REQUEST, "model_name"),
        (_request(model_name=None), ErrorCode.INVALID_REQUEST, "model_name"),
        (_request(model_version=[1]), ErrorCode.INVALID_REQUEST, "model_version"),
        # One spelling per version: no sign, fraction, leading zero or non-ASCII digit ("²".isdigit() is True).
        *[(_request(model_version=v), ErrorCode.INVALID_REQUEST, "model_version: expected a positive integer")
          for v in ("²", "٣", "01", "-1", "1.0", " 1", "1\n", "0", 0, -2, True, 10**18)],
        (_request(model_name="mnist_mlp\n"), ErrorCode.INVALID_REQUEST, "model_name"),
        (_request(parameters={"reply_to": "maas.results\n"}), ErrorCode.INVALID_REQUEST, "parameters.reply_to"),
        (_request(inputs=[]), ErrorCode.INVALID_REQUEST, "inputs: expected a non-empty list"),
        (_request(inputs=[{"name": "input", "shape": [3], "datatype": "FP99", "data": [1, 2, 3]}]),
         ErrorCode.INVALID_REQUEST, "inputs[0].datatype"),
        (_request(inputs=[{"name": "input", "shape": [-1], "datatype": "FP32", "data": [1]}]),
         ErrorCode.INVALID_REQUEST, "inputs[0].shape"),
        # numpy refuses these with a ValueError that names nothing: 65 dimensions, a zero-size shape of 2**63
        (_request(inputs=[{"name": "input", "shape": [1] * 65, "datatype": "FP32", "data": [1]}]),
         ErrorCode.INVALID_REQUEST, "inputs[0].shape: expected a list of at most 16 integers"),
        (_request(inputs=[{"name": "input", "shape": [0, 2**63], "datatype": "FP32", "data": []}]),
         ErrorCode.INVALID_REQUEST, "inputs[0].shape"),
        (_request(parameters={"reply_to": ".."}), ErrorCode.INVALID_REQUEST, "parameters.reply_to"),
        (_request(parameters={"reply_to": "__consumer_offsets"}), ErrorCode.INVALID_REQUEST, "parameters.reply_to"),
        (_request(inputs=[{"name": "input", "shape": [2], "datatype": "FP32"}]),
         ErrorCode.INVALID_REQUEST, "inputs[0].data: missing"),
        (_request(inputs=[{"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]),
         ErrorCode.INVALID_INPUT, "3 values given, shape [2, 2] needs 4"),
        (_request(inputs=[{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2, 3]}]),
         ErrorCode.INVALID_INPUT, "3 values given, shape [1, 2] needs 2"),
        (_request(inputs=[{"name": "input", "shape": [2], "datatype": "FP32",
                           "parameters": {"binary_data_size": 8}}]),
         ErrorCode.INVALID_REQUEST, "carries no binary part"),
        # it said "every input needs the same first (batch) dimension", of a request with one input
        (_request(inputs=[{"name": "input", "shape": [], "datatype": "FP32", "data": [1]}]),
         ErrorCode.INVALID_INPUT, "inputs[0].shape: expected a first (batch) dimension, got []"),
        (_request(inputs=[{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                          {"name": "b", "shape": [], "datatype": "BYTES", "data": ["y"]}]),
         ErrorCode.INVALID_INPUT, "inputs[1].shape: expected a first (batch) dimension"),
        (_request(inputs=[{"name": "a", "shape": [2, 1], "datatype": "FP32", "data": [1, 2]},
                          {"name": "b", "shape": [3, 1], "datatype": "FP32", "data": [1, 2, 3]}]),
         ErrorCode.INVALID_INPUT, "same first (batch) dimension"),
        (_request(inputs=[{"name": "input", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]),
         ErrorCode.INVALID_INPUT, "FP32 tensor holds strings"),
        (_request(inputs=[{"name": "input", "shape": [2], "datatype": "INT8", "data": [1.5, 2]}]),
         ErrorCode.INVALID_INPUT, "INT8 tensor holds fractional numbers"),
        (_request(inputs=[{"name": "t", "shape": [6], "datatype": "BYTES", "data": [["a", "b", "c", "d"], ["e", "f"]]}
                          ]),
         ErrorCode.INVALID_INPUT, "inputs[0].data: ragged nested lists"),  # flattened, it passed as 6 strings
        (_request(inputs=[{"name": "t", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], "b"]}]),
         ErrorCode.INVALID_INPUT, "inputs[0].data: ragged nested lists"),
        (_request(inputs=[{"name": "input", "shape": [2], "datatype": "BOOL", "data": [0, 1]}]),
         ErrorCode.INVALID_INPUT, "BOOL tensor holds integers"),  # it said "holds i" (numpy's kind letter)
        (_request(inputs=[{"name": "input", "shape": [1], "datatype": "BOOL", "data": [2**63]}]),
         ErrorCode.INVALID_INPUT, "BOOL tensor holds integers"),
        (_request(inputs=[{"name": "input", "shape": [1], "datatype": "INT8", "data": [300]}]),
         ErrorCode.INVALID_INPUT, "out of range for INT8"),
        # numpy reads these as floats: the message said "holds fractional numbers"
        (_request(inputs=[{"name": "input", "shape": [2], "datatype": "INT64", "data": [-1, 2**63]}]),
         ErrorCode.INVALID_INPUT, "values out of range for INT64"),
        (_request(inputs=[{"name": "input", "shape": [1, 2], "datatype": "UINT64", "data": [[-1, 2**64 - 1]]}]),
         ErrorCode.INVALID_INPUT, "values out of range for UINT64"),
        (_request(inputs=[{"name": "input", "shape": [1], "datatype": "FP16", "data": [1e300]}]),
         ErrorCode.INVALID_INPUT, "out of range for FP16"),
        (_request(inputs=[{"name": "input", "shape": [1000000, 1000000], "datatype": "FP32", "data": [1]}]),
         ErrorCode.PAYLOAD_TOO_LARGE, "declares 1000000000000 elements"),
        (_request(parameters={"deadline_ms": "soon"}), ErrorCode.INVALID_REQUEST, "parameters.deadline_ms"),
        (_request(parameters=0), ErrorCode.INVALID_REQUEST, "parameters: expected an object"),
        (_request(parameters=[]), ErrorCode.INVALID_REQUEST, "parameters: expected an object"),
        (_request(parameters={"binary_data_output": "false"}), ErrorCode.INVALID_REQUEST,
         "parameters.binary_data_output: expected true or false"),
        (_request(outputs=[{"name": "class", "parameters": {"classification": 3}}]), ErrorCode.INVALID_REQUEST,
         "outputs[0].parameters.classification: not supported"),
        (_request(outputs=[{"name": "class", "parameters": {"binary_data": 1}}]), ErrorCode.INVALID_REQUEST,
         "outputs[0].parameters.binary_data: expected true or false"),
        (_request(outputs=[{"name": "class", "parameters": "binary"}]), ErrorCode.INVALID_REQUEST,
         "outputs[0].parameters: expected an object"),
        (_request(inputs=[{"name": "input", "shape": [1], "datatype": "FP32", "data": [1], "parameters": 5}]),
         ErrorCode.INVALID_REQUEST, "inputs[0].parameters: expected an object"),
        (_request(parameters={"reply_to": "bad topic!"}), ErrorCode.INVALID_REQUEST, "parameters.reply_to"),
        (_request(outputs=[{"nom": "x"}]), ErrorCode.INVALID_REQUEST, "outputs: expected"),
    ],
)
def test_malformed_requests_name_the_field(payload, code, fragment):
    with pytest.raises(InferenceError) as caught:
        _decode(payload)
    assert caught.value.code == code
    assert fragment in caught.value.message


def test_an_empty_outputs_list_asks_for_every_output_as_a_missing_one_does():
    assert _decode(_request(outputs=[])).outputs is None
    request = _decode(_request(outputs=[{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}]))
    assert request.outputs == ["a", "b"] and request.binary(["a", "b"]) == ["a"]


@pytest.mark.parametrize("version", [None, "", "latest", "1", "42", 7])
def test_version_spellings_that_name_a_version_or_the_newest(version):
    request = _decode(_request(model_version=version))
    assert request.model_version == (None if version is None else str(version))


def test_errors_keep_the_request_id_once_known():
    with pytest.raises(InferenceError) as caught:
        _decode(_request(inputs=[{"name": "input", "shape": [1], "datatype": "FP32", "data": ["x"]}]))
    assert caught.value.request_id == "r1"
    with pytest.raises(InferenceError) as caught:
        _decode(b"{oops")
    assert caught.value.request_id is None


def test_oversized_payload_is_refused_before_parsing():
    with pytest.raises(InferenceError) as caught:
        decode_request(b" " * 2048, max_bytes=1024)
    assert caught.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_response_json_round_trip():
    response = InferenceResponse("r1", "m", 3, {"p": np.array([[0.25, 0.75]], dtype=np.float32),
                                                "class": np.array([1])}, {"p": "FP32", "class": "INT64"})
    body = orjson.loads(orjson.dumps(response.to_json()))
    assert body["model_version"] == "3"
    assert body["outputs"][0] == {"name": "p", "shape": [1, 2], "datatype": "FP32", "data": [0.25, 0.75]}
    assert body["outputs"][1]["datatype"] == "INT64"


def test_settings_survive_the_environment_round_trip():
    from dataclasses import replace

    from pipeline.settings import Settings, Topics

    settings = replace(Settings(), kafka_bootstrap_servers="k:9092", aws_endpoint_url="http://s3",
                       topics=Topics("a", "b", "c", "d"), max_in_flight=7, max_running_batches=3,
                       kafka_idempotence=True, kafka_sasl_password="secret", claim_check_prefix="team/claims/")
    again = Settings.from_env(settings.to_env())
    assert replace(again, worker_id=settings.worker_id) == settings
    on_aws = replace(settings, aws_credentials_configured=True)
    assert Settings.from_env(on_aws.to_env()).aws_credentials_configured
    assert "secret" not in repr(settings) and "kafka_sasl_password" not in settings.describe()


# Past `_TENSOR_JSON_BYTES` the codec reads JSON with simdjson, floating-point data straight into numpy.
LARGE = 600


def _large(datatype: str, data, shape=(2, LARGE)) -> bytes:
    body = orjson.dumps(_request(inputs=[{"name": "input", "shape": list(shape), "datatype": datatype,
                                          "data": data}], parameters={"priority": 2}))
    assert len(body) >= codec._TENSOR_JSON_BYTES
    return body


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64", "BF16", "INT32", "UINT8"])
@pytest.mark.parametrize("nested", [False, True])
def test_large_json_requests_decode_exactly_as_small_ones(datatype, nested, monkeypatch):
    values = np.random.default_rng(3).uniform(0, 100, size=(2, LARGE))
    data = (values.round().astype(int) if datatype.startswith(("INT", "UINT")) else values).tolist()
    body = _large(datatype, data if nested else [v for row in data for v in row])
    fast = _decode(body)
    monkeypatch.setattr(codec, "_TENSOR_JSON_BYTES", 1 << 30)  # the orjson path, for comparison
    plain = _decode(body)
    assert fast.inputs["input"].dtype == plain.inputs["input"].dtype
    assert fast.inputs["input"].shape == plain.inputs["input"].shape == (2, LARGE)
    np.testing.assert_array_equal(fast.inputs["input"], plain.inputs["input"])
    assert (fast.id, fast.model_name, fast.parameters) == (plain.id, plain.model_name, plain.parameters)


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        (_large("FP32", ["a"] * (2 * LARGE)), ErrorCode.INVALID_INPUT, "FP32 tensor holds strings"),
        (_large("FP32", [True] * (2 * LARGE)), ErrorCode.INVALID_INPUT, "FP32 tensor holds booleans"),
        (_large("FP32", [0.5, True] + [0.5] * (2 * LARGE - 2)), ErrorCode.INVALID_INPUT, "FP32 tensor holds mixed"),
        (_large("FP32", [1e39] + [0.5] * (2 * LARGE - 1)), ErrorCode.INVALID_INPUT, "out of range for FP32"),
        (_large("FP16", [1e300] * (2 * LARGE)), ErrorCode.INVALID_INPUT, "out of range for FP16"),
        (_large("FP32", [[1.0] * LARGE, [1.0] * (LARGE - 1)]), ErrorCode.INVALID_INPUT, "ragged nested lists"),
        (_large("FP32", [[1.0] * LARGE, [[1.0], *[1.0] * (LARGE - 1)]]), ErrorCode.INVALID_INPUT,
         "ragged nested lists"),
        (_large("FP32", [0.5] * (2 * LARGE))[:-40], ErrorCode.INVALID_JSON, "not valid UTF-8 JSON"),
        (_large("FP32", [0.5] * (2 * LARGE)).replace(b'"r1"', b'"\\ud800"'), ErrorCode.INVALID_JSON,
         "not valid UTF-8 JSON: no low surrogate in string: line 1 column 8"),
        (_large("FP32", [0.5] * (2 * LARGE)).replace(b'"r1"', b'"\xff\xfe"'), ErrorCode.INVALID_JSON,
         "not valid UTF-8 JSON"),
    ],
)
def test_large_malformed_json_requests_name_the_problem(payload, code, fragment):
    with pytest.raises(InferenceError) as caught:
        _decode(payload)
    assert caught.value.code == code and fragment in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([0.5, True, False, 0.25], "FP32 tensor holds mixed values"),  # the fast path's array.array took these
        ([True, 0.5, False, 0.25], "FP32 tensor holds mixed values"),  # numpy read them as 1.0 and 0.0
        ([[0.5, 1.0], [False, 0.25]], "FP32 tensor holds mixed values"),
        ([1e39, 0.5, 0.5, 0.5], "values out of range for FP32"),
    ],
)
def test_small_requests_refuse_booleans_among_numbers_and_numbers_past_fp32(data, fragment):
    payload = orjson.dumps(_request(inputs=[{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": data}]))
    assert len(payload) < codec._TENSOR_JSON_BYTES
    with pytest.raises(InferenceError) as caught:
        _decode(payload)
    assert caught.value.code == ErrorCode.INVALID_INPUT and fragment in caught.value.message, caught.value.message


@pytest.mark.parametrize("size", [1, 900])  # under and over the size where decoding moves from orjson to simdjson
def test_duplicate_keys_mean_the_same_whichever_parser_reads_the_body(size):
    body = orjson.dumps(_request(inputs=[{"name": "input", "shape": [1, size], "datatype": "FP32",
                                          "data": [0.5] * size}]))
    body = body[:-1] + b',"outputs":[{"name":"a"}],"outputs":[{"name":"b"}],"id":"second"}'
    request = _decode(body)
    assert request.outputs == ["b"] and request.id == "second"  # the last one, as orjson decides


@pytest.mark.parametrize("length", [" 12", "+12", "1_2", "\u0661\u0662", "12.0", "-12"])
def test_binary_header_length_must_be_ascii_digits(length):
    with pytest.raises(InferenceError, match="inference-header-content-length") as caught:
        decode_request(b"{}" + b"\0" * 20, {"content-type": "application/octet-stream",
                                            "inference-header-content-length": length}, max_bytes=LIMIT)
    assert caught.value.code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("length", ["9" * 5000, "0" * 5000 + "99", "0" * 5000])
def test_a_binary_header_length_of_thousands_of_digits_is_refused_naming_the_header(length):
    """int() refuses a string of over 4,300 digits with a ValueError, which named no field (a header is not
    bounded by the body's size limit); the message quotes at most 40 of them."""
    with pytest.raises(InferenceError, match=r"inference-header-content-length: .* is outside") as caught:
        decode_request(b"{}" + b"\0" * 20, {"content-type": "application/octet-stream",
                                            "inference-header-content-length": length}, max_bytes=LIMIT)
    assert caught.value.code == ErrorCode.INVALID_REQUEST and len(caught.value.message) < 200


LONG_SHAPE = [0] + [2**31] * 15  # no elements, in 183 characters


@pytest.mark.parametrize(
    ("tensor", "binary_part"),
    [
        ({"shape": [2**31] * 16, "datatype": "FP32", "data": [1]}, None),  # more elements than the request may hold
        ({"shape": LONG_SHAPE, "datatype": "FP32", "data": [1]}, None),  # values that do not fill it exactly
        ({"shape": LONG_SHAPE, "datatype": "BYTES", "data": ["a"]}, None),
        ({"shape": LONG_SHAPE, "datatype": "FP32", "parameters": {"binary_data_size": 4}}, b"\0" * 4),  # bytes too
    ],
)
def test_a_shape_in_an_error_message_is_cut_to_60_characters(tensor, binary_part):
    """The message echoed every dimension of the shape (up to 16 of ten digits each)."""
    payload, headers = orjson.dumps(_request(inputs=[{"name": "x", **tensor}])), {}
    if binary_part is not None:
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(payload))}
        payload += binary_part
    with pytest.raises(InferenceError) as caught:
        decode_request(payload, headers, max_bytes=LIMIT)
    shape = repr(tensor["shape"])
    assert "inputs[0]" in caught.value.message, caught.value.message
    assert shape not in caught.value.message and shape[:57] + "..." in caught.value.message, caught.value.message


def test_an_input_given_both_as_data_and_as_binary_is_refused():
    """The binary part was read and `data` dropped without a word: one of the two the caller sent was ignored."""
    tensor = {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [9, 9],
              "parameters": {"binary_data_size": 8}}
    header = orjson.dumps(_request(inputs=[tensor]))
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}
    with pytest.raises(InferenceError, match=r"inputs\[0\]: give data or parameters.binary_data_size, not both"):
        decode_request(header + np.ones(2, "<f4").tobytes(), headers, max_bytes=LIMIT)
    del tensor["data"]
    header = orjson.dumps(_request(inputs=[tensor]))
    headers["inference-header-content-length"] = str(len(header))
    assert decode_request(header + np.ones(2, "<f4").tobytes(), headers, max_bytes=LIMIT).inputs["input"].tolist() \
        == [[1.0, 1.0]]


def test_nested_bytes_data_of_its_shape_is_taken():
    request = _decode(_request(inputs=[{"name": "t", "shape": [2, 2], "datatype": "BYTES",
                                        "data": [["a", "b"], ["c", "dé"]]}]))
    assert request.inputs["t"].tolist() == [[b"a", b"b"], [b"c", "dé".encode()]]


@pytest.mark.parametrize(("accept", "binary"), [
    ("application/octet-stream", True),
    ("Application/Octet-Stream; charset=binary", True),
    ("application/octet-stream, application/json", True),  # binary, JSON as a fallback: it got JSON
    ("application/json, application/octet-stream", False),
    ("application/json;q=0.5, application/octet-stream", True),
    ("application/octet-stream;q=0.2, application/json;q=0.9", False),
    ("application/octet-stream;q=0", False),
    ("application/octet-stream;q=high", False),
    ("*/*", False),
    ("application/json", False),
])
def test_an_accept_header_asks_for_binary_outputs_when_it_ranks_them_above_json(accept, binary):
    request = decode_request(orjson.dumps(_request()), {"accept": accept}, max_bytes=LIMIT)
    assert request.parameters.get("binary_data_output", False) is binary


def test_binary_bool_bytes_other_than_0_and_1_are_refused():
    """The extension's BOOL is a byte of 0 or 1; numpy took 2 as a True whose sum is 2 and that went back out
    in a binary answer as 2."""
    header = orjson.dumps(_request(inputs=[{"name": "b", "shape": [1, 3], "datatype": "BOOL",
                                            "parameters": {"binary_data_size": 3}}]))
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}
    assert decode_request(header + b"\1\0\1", headers, max_bytes=LIMIT).inputs["b"].tolist() == [[True, False, True]]
    with pytest.raises(InferenceError, match=r"inputs\[0\]: BOOL bytes must be 0 \(false\) or 1") as caught:
        decode_request(header + b"\1\2\0", headers, max_bytes=LIMIT)
    assert caught.value.code == ErrorCode.INVALID_INPUT


def test_a_bytes_shape_its_binary_part_cannot_hold_is_refused_before_its_array_is_made():
    """The element budget is the payload limit (64 MiB for a claim-checked object): a tiny binary request declaring
    that many BYTES elements made an array of a pointer per element (8 bytes each) before finding no data."""
    import tracemalloc

    header = orjson.dumps({"id": "r", "model_name": "m", "inputs": [
        {"name": "t", "shape": [8_000_000], "datatype": "BYTES", "parameters": {"binary_data_size": 0}}]})
    tracemalloc.start()
    try:
        with pytest.raises(InferenceError, match="cannot hold 8000000 elements") as caught:
            decode_request(header, {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(header))}, max_bytes=64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.code == ErrorCode.INVALID_INPUT
    assert peak < 1 << 20, f"{peak:,} bytes allocated for a {len(header)}-byte request"
