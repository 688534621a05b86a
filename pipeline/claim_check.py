"""Claim checks on S3: large inputs by reference (`inputs_uri`), large outputs and oversized dead letters
written to objects that the small Kafka record points to.

Every URI a caller gives is validated: the bucket must be one this deployment allows, the key must be a
plain relative path under the claim-check prefix (MAAS_CLAIM_CHECK_PREFIX), and an object is sized (HEAD)
before it is read, so a reference can neither reach another team's bucket, the batch jobs' inbox and outbox
or this store's own results, nor make a worker download more than the payload limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from models.s3_repository import BUCKET_RE
from pipeline.codec import CONTENT_TYPE, HEADER_LENGTH, JSON, Framed, decode_request
from pipeline.errors import ErrorCode, InferenceError
from pipeline.protocol import InferenceRequest, InferenceResponse
from pipeline.settings import ConfigError

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

    def __post_init__(self) -> None:
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

    async def fetch(self, uri: str, field: str = "inputs_uri") -> tuple[bytes, dict[str, str]]:
        bucket, key = self.check_uri(uri, field)

        def get() -> tuple[bytes, dict[str, str]]:
            head = self.s3.head_object(Bucket=bucket, Key=key)
            size = head["ContentLength"]
            if size > self.max_object_bytes:
                raise InferenceError(ErrorCode.PAYLOAD_TOO_LARGE, f"{field}: object is {size} bytes; the limit is "
                                     f"{self.max_object_bytes}")
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read(self.max_object_bytes + 1)
            headers = {CONTENT_TYPE: head.get("ContentType", "application/json")}
            length = head.get("Metadata", {}).get(HEADER_LENGTH)
            if length:
                headers[HEADER_LENGTH] = length
            return body, headers

        try:
            return await asyncio.to_thread(get)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"):
                raise InferenceError(ErrorCode.INVALID_REQUEST, f"{field}: {uri} cannot be read ({code})") from None
            raise InferenceError(ErrorCode.UNAVAILABLE, f"{field}: S3 error reading {uri}: {code}") from None
        except BotoCoreError as exc:
            raise InferenceError(ErrorCode.UNAVAILABLE, f"{field}: S3 unreachable: {exc}") from None

    async def resolve_inputs(self, request: InferenceRequest, max_bytes: int) -> None:
        """Fill `request.inputs` from the object its `inputs_uri` names (a V2 request, JSON or binary)."""
        if request.inputs_uri is None:
            return
        payload, headers = await self.fetch(request.inputs_uri)
        inner = decode_request(payload, headers, max_bytes=max_bytes,
                               defaults={"id": request.id, "model_name": request.model_name})
        if inner.inputs_uri is not None:
            raise InferenceError(ErrorCode.INVALID_REQUEST, "inputs_uri: the object may not refer to another object",
                                 request.id)
        request.inputs, request.datatypes = inner.inputs, inner.datatypes

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
        except (ClientError, BotoCoreError) as exc:
            raise InferenceError(ErrorCode.UNAVAILABLE, f"{field}: S3 error writing s3://{bucket}/{key}: "
                                 f"{exc}") from None

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
