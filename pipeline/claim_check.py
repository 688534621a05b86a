"""Claim checks on S3: large inputs by reference (`inputs_uri`), large outputs and oversized dead letters
written to objects that the small Kafka record points to.

Every URI a caller gives is validated: the bucket must be one this deployment allows, the key must be a
plain relative path under the claim-check prefix (MAAS_CLAIM_CHECK_PREFIX), and an object is sized (HEAD)
before it is read, so a reference can neither reach another team's bucket, the batch jobs' inbox and outbox
or this store's own results, nor make a worker download more than the payload limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from models.repository import without_credentials
from models.s3_repository import BUCKET_RE
from pipeline.codec import BINARY, CONTENT_TYPE, HEADER_LENGTH, JSON, Framed, decode_request
from pipeline.errors import ErrorCode, InferenceError
from pipeline.protocol import InferenceRequest, InferenceResponse
from pipeline.settings import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)
S3_DEFAULT_CONTENT_TYPE = "binary/octet-stream"  # what S3 reports for an object put without a content type
_DIGEST_END = re.compile(r"-[0-9a-f]{16}$")
_KEY_RE = re.compile(r"[A-Za-z0-9!_.*'()/=+,@-]{1,1024}")


def parse_s3_uri(uri: str, *, field: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key), refusing anything that is not a plain, safe object key."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise InferenceError(ErrorCode.INVALID_REQUEST, f"{field}: expected s3://bucket/key, got {uri!r:.80}")
    bucket, _, key = uri[5:].partition("/")
    if not BUCKET_RE.fullmatch(bucket):
        raise InferenceError(ErrorCode.INVALID_REQUEST, f"{field}: {bucket!r:.70} is not a valid bucket name")
    parts = key.split("/")
    if not _KEY_RE.fullmatch(key) or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InferenceError(ErrorCode.INVALID_REQUEST, f"{field}: {key!r:.70} is not a plain object key "
                             "(letters, digits, and !_.*'()/=+,@- ; no empty, '.' or '..' segments)")
    return bucket, key


class ByteBudget:
    """Bytes that claim-checked inputs may hold at once: `hold(n)` waits, first come first served, until `n`
    more fit under `capacity`. Requests wait for room rather than fail: the budget bounds memory, not work.

    Plain futures rather than an asyncio.Condition: a store may outlive one event loop (a cloud function's
    runtime runs each invocation in a new one), and a Condition stays bound to the first loop it waited on."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0  # the most bytes held at once, for metrics-free checks (tests, benchmarks)
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(size, self.capacity)  # callers refuse larger objects first; a smaller capacity must not hang
        if self._waiters or self.held + size > self.capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((size, waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled():  # granted just before the cancel: give it back
                    self._release(size)
                elif (size, waiter) in self._waiters:
                    self._waiters.remove((size, waiter))
                    self._grant()  # the first in line may have been the one blocking the others
                raise
        else:
            self._take(size)
        try:
            yield
        finally:
            self._release(size)

    def _take(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _release(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.held + self._waiters[0][0] <= self.capacity:
            size, waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter leaves the line itself, unless it is granted first here
                self._take(size)
                waiter.set_result(None)


@dataclass
class ClaimCheckStore:
    """S3 access for claim checks. `s3` is a boto3 client; its blocking calls run in threads.

    Callers' URIs may name keys under `claim_prefix` only; the store writes its own objects (large results,
    oversized dead letters) under `output_prefix`, which callers can neither read nor overwrite. Neither
    may overlap `reserved_prefixes` (the batch jobs' inbox, where a file starts a job, and outbox)."""

    s3: Any
    allowed_buckets: frozenset[str]
    output_bucket: str
    output_prefix: str = "results"
    max_object_bytes: int = 64 * 1024 * 1024
    claim_prefix: str = "claims/"
    reserved_prefixes: tuple[str, ...] = ()
    bytes_in_flight: int = 4 * 64 * 1024 * 1024
    budget: ByteBudget = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bytes_in_flight < self.max_object_bytes:
            raise ConfigError(f"MAAS_CLAIM_CHECK_BYTES_IN_FLIGHT={self.bytes_in_flight} is below "
                              f"MAAS_MAX_CLAIM_CHECK_BYTES={self.max_object_bytes}: the largest object allowed could "
                              "never be read")
        self.budget = ByteBudget(self.bytes_in_flight)
        name = f"MAAS_CLAIM_CHECK_PREFIX={self.claim_prefix!r}"
        parts = self.claim_prefix.split("/")
        if not (_KEY_RE.fullmatch(self.claim_prefix) and self.claim_prefix.endswith("/")
                and all(p not in ("", ".", "..") for p in parts[:-1])):
            raise ConfigError(f"{name}: expected a plain key prefix ending in '/', such as claims/ (letters, digits, "
                              "and !_.*'()/=+,@- ; no empty, '.' or '..' segments)")
        for other in (*self.reserved_prefixes, f"{self.output_prefix}/"):
            if other.startswith(self.claim_prefix) or self.claim_prefix.startswith(other):
                raise ConfigError(f"{name} overlaps {other!r}, a prefix callers must not reach (the batch jobs' "
                                  "inbox and outbox, MAAS_BATCH_INBOX_PREFIX and MAAS_BATCH_OUTBOX_PREFIX, and "
                                  f"the store's own {self.output_prefix}/); give one that neither starts nor "
                                  "starts with any of them")

    def check_uri(self, uri: str, field: str) -> tuple[str, str]:
        """The bucket and key of a URI a caller gave, refused before any work is done for it unless the bucket
        is allowed and the key lies under the claim-check prefix."""
        bucket, key = parse_s3_uri(uri, field=field)
        if bucket not in self.allowed_buckets:
            raise InferenceError(ErrorCode.INVALID_REQUEST, f"{field}: bucket {bucket!r} is not allowed here "
                                 f"(allowed: {sorted(self.allowed_buckets)}; setting MAAS_CLAIM_CHECK_BUCKETS)")
        if not key.startswith(self.claim_prefix):
            raise InferenceError(ErrorCode.INVALID_REQUEST, f"{field}: key {key!r:.70} is outside the claim-check "
                                 f"prefix: expected s3://{bucket}/{self.claim_prefix}... (setting "
                                 "MAAS_CLAIM_CHECK_PREFIX)")
        return bucket, key

    @contextlib.asynccontextmanager
    async def resolved_inputs(self, request: InferenceRequest, max_bytes: int) -> AsyncIterator[None]:
        """Fill `request.inputs` from the object its `inputs_uri` names (a V2 request, JSON or binary) for the
        duration of the block (nothing to do without one).

        The object's size counts against `budget` from before it is downloaded until the block ends (the
        caller runs the model inside it: the decoded inputs live that long), so that a fetch of many small
        records naming one large object waits for room instead of downloading it once per record at once.
        The decode runs in a thread: a large JSON object takes the event loop for seconds otherwise."""
        if request.inputs_uri is None:
            yield
            return
        field = "inputs_uri"
        bucket, key = self.check_uri(request.inputs_uri, field)
        size, headers = await self._s3_read(request.inputs_uri, field, self._head, bucket, key, field)
        async with self.budget.hold(size):
            payload = await self._s3_read(request.inputs_uri, field, self._get, bucket, key, size)
            inner = await asyncio.to_thread(decode_request, payload, headers, max_bytes=max_bytes,
                                            defaults={"id": request.id, "model_name": request.model_name})
            del payload  # the decoded inputs stay in the budget's count; the bytes need not stay in memory
            if inner.inputs_uri is not None:
                raise InferenceError(ErrorCode.INVALID_REQUEST, "inputs_uri: the object may not refer to another "
                                     "object", request.id)
            request.inputs, request.datatypes = inner.inputs, inner.datatypes
            yield

    def _head(self, bucket: str, key: str, field: str) -> tuple[int, dict[str, str]]:
        """The object's size, refused past the limit before anything is downloaded, and its transport headers."""
        head = self.s3.head_object(Bucket=bucket, Key=key)
        size = head["ContentLength"]
        if size > self.max_object_bytes:
            raise InferenceError(ErrorCode.PAYLOAD_TOO_LARGE, f"{field}: object is {size} bytes; the limit is "
                                 f"{self.max_object_bytes} (setting MAAS_MAX_CLAIM_CHECK_BYTES)")
        content_type = head.get("ContentType")
        if content_type in (None, S3_DEFAULT_CONTENT_TYPE):  # uploaded without one: the metadata says which form
            content_type = BINARY  # without HEADER_LENGTH metadata, BINARY reads the whole object as JSON
        headers = {CONTENT_TYPE: content_type}
        length = head.get("Metadata", {}).get(HEADER_LENGTH)
        if length:
            headers[HEADER_LENGTH] = length
        return size, headers

    def _get(self, bucket: str, key: str, size: int) -> bytes:
        """The object's bytes, no more than the `size` its HEAD reported (and budgeted for): one replaced by a
        larger object in between is refused rather than read past what was reserved for it."""
        stream = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            body = stream.read(size + 1)
        finally:  # the rest of an object that grew is not read: its connection goes back closed, not half read
            stream.close()
        if len(body) > size:
            raise InferenceError(ErrorCode.INVALID_REQUEST, f"inputs_uri: the object grew past the {size} bytes it "
                                 "had when it was sized; do not replace it while requests name it")
        return body

    async def _s3_read(self, uri: str, field: str, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` in a thread, its S3 failures as InferenceErrors naming `field`."""
        try:
            return await asyncio.to_thread(call, *args)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"):
                raise InferenceError(ErrorCode.INVALID_REQUEST, f"{field}: {uri} cannot be read ({code})") from None
            raise InferenceError(ErrorCode.UNAVAILABLE, f"{field}: S3 error reading {uri}: {code}") from None
        except BotoCoreError as exc:  # its message quotes the endpoint's URL: for the server's log, not the caller
            log.warning("%s: cannot read %s: %s", field, uri, without_credentials(str(exc)))
            raise InferenceError(ErrorCode.UNAVAILABLE, f"{field}: S3 cannot be reached; retry later") from None

    async def put(self, uri: str, framed: Framed, field: str = "parameters.output_uri") -> None:
        """Write the object a caller named, checked as every URI a caller gives."""
        bucket, key = self.check_uri(uri, field)
        await self._write(bucket, key, framed, field)

    async def _write(self, bucket: str, key: str, framed: Framed, field: str) -> None:
        metadata = {HEADER_LENGTH: framed.headers[HEADER_LENGTH]} if HEADER_LENGTH in framed.headers else {}

        def put() -> None:
            self.s3.put_object(Bucket=bucket, Key=key, Body=framed.body,
                               ContentType=framed.headers.get(CONTENT_TYPE, "application/json"), Metadata=metadata)

        try:
            await asyncio.to_thread(put)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise InferenceError(ErrorCode.UNAVAILABLE, f"{field}: S3 error writing s3://{bucket}/{key}: {code}"
                                 ) from None
        except BotoCoreError as exc:  # its message quotes the endpoint's URL: for the server's log, not the caller
            log.warning("%s: cannot write s3://%s/%s: %s", field, bucket, key, without_credentials(str(exc)))
            raise InferenceError(ErrorCode.UNAVAILABLE, f"{field}: S3 cannot be reached to write s3://{bucket}/{key}; "
                                 "retry later") from None

    def default_uri(self, *parts: str, suffix: str = "") -> str:
        """A new object for `parts` (a model, a request id): `<output_prefix>/<part>/.../<uuid4><suffix>`.

        The parts keep the key readable; the last segment makes it unique per call, because callers choose
        request ids: two teams' "r-1" (or one request delivered twice) must never share an object, where one
        would overwrite the other and be handed the other's data. A part the key alphabet cannot spell as it
        is ("team/a" and "team a" both read "team_a") gets a digest of its own spelling appended, so the
        readable prefix stays one per distinct part too."""
        return f"s3://{self.output_bucket}/{self._new_key(parts, suffix)}"

    def _new_key(self, parts: tuple[str, ...], suffix: str) -> str:
        safe = []
        for part in parts:
            spelled = re.sub(r"[^A-Za-z0-9!_.*'()=+,@-]", "_", part)
            # A part that already ends like a digest gets one too: no caller can pick an id whose key is another's.
            if spelled != part or part in ("", ".", "..") or _DIGEST_END.search(part):
                spelled = f"{spelled}-{hashlib.sha256(part.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
            safe.append(spelled)
        return "/".join([self.output_prefix, *safe, uuid.uuid4().hex + suffix])

    async def put_new(self, framed: Framed, *parts: str, suffix: str = "", field: str = "result") -> str:
        """Store `framed` as a new object of this store's own (see `default_uri`); returns its URI."""
        key = self._new_key(parts, suffix)
        await self._write(self.output_bucket, key, framed, field)
        return f"s3://{self.output_bucket}/{key}"

def outputs_reference(response: InferenceResponse, uri: str) -> Framed:
    """The small result that stands in for one stored in S3: output names, shapes and datatypes, and where."""
    body = {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": str(response.model_version),
        "outputs_uri": uri,
        "outputs": [{"name": n, "shape": list(a.shape), "datatype": response.datatypes.get(n, "")}
                    for n, a in response.outputs.items()],
    }
    return Framed(orjson.dumps(body), {CONTENT_TYPE: JSON})
