"""Batch jobs on object storage: a JSON Lines file of requests in, a results file and a summary out.

Uploading `s3://<bucket>/<inbox>/<job>.jsonl` starts a job. Locally an S3 -> SQS bucket notification
(`ensure_batch_notifications`) feeds `BatchJobWatcher` (`maas batch worker`); in the cloud the S3 trigger
(`functions.s3`) calls the same `BatchJobRunner.run()`.

- Streaming: the object is read in chunks and split into lines; at most `window` lines, and at most
  `window_bytes` of them (but always one), are in flight; results go out through a multipart upload in parts
  of `part_bytes` (>= 5 MiB). Memory stays bounded whatever the file size or its lines' sizes.
- Order: results are written in input order, one line per non-blank input line, errors inline (with "line").
- Idempotence: the summary is written last and carries the source object's ETag; a re-delivered event for
  an object whose summary has that ETag is skipped, so duplicates (moto emits two ObjectCreated events for a
  multipart upload) never produce a second, different output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from infra.bootstrap import ensure_buckets, ensure_queue
from pipeline.engine import InferenceEngine
from pipeline.errors import ErrorCode, InferenceError
from pipeline.metrics import ERRORS, REQUESTS
from pipeline.protocol import InferenceRequest, InferenceResponse, parse_request, refuse_claim_checks
from pipeline.responder import model_label
from pipeline.settings import ConfigError, Settings
from pipeline.sqs_worker import POLL_GRACE_S, end_cancelled, receive_or_release, release_messages

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 * 1024 * 1024
MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8 bytes
SOURCE_ETAG = "source-etag"  # object metadata key on results and summary
# A summary is a few kilobytes (counts, latency percentiles, a few model versions); read no more than this of one
MAX_SUMMARY_BYTES = 1 << 20
NOTIFICATION_ID = "maas-batch-jobs"


@dataclass(frozen=True)
class BatchConfig:
    """Where jobs arrive and results go. Env: MAAS_BATCH_INBOX_PREFIX, MAAS_BATCH_OUTBOX_PREFIX, MAAS_BATCH_QUEUE."""

    bucket: str
    inbox_prefix: str = "inbox/"
    outbox_prefix: str = "outbox/"
    queue: str = "maas-batch-events"
    window: int = 512
    window_bytes: int = 128 * 1024 * 1024  # 512 lines of up to MAAS_MAX_REQUEST_BYTES each could be far more
    part_bytes: int = 8 * 1024 * 1024
    read_bytes: int = 1024 * 1024
    progress_interval_s: float = 2.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be >= {MIN_PART_BYTES} (S3 multipart minimum)")
        if self.window < 1 or self.window_bytes < 1:
            raise ValueError("window and window_bytes must be >= 1")
        self._check_prefixes()

    def _check_prefixes(self) -> None:
        """Refuse prefixes under which a job's outputs would start jobs: results (`<outbox><job>.results.jsonl`)
        written inside the inbox, or an inbox inside the outbox, or an empty prefix (every key is under it),
        would each start another job, without end. S3 filters by string prefix, so that is what is compared."""
        inbox, outbox = self.inbox_prefix, self.outbox_prefix
        names = f"MAAS_BATCH_INBOX_PREFIX={inbox!r} and MAAS_BATCH_OUTBOX_PREFIX={outbox!r}"
        if not inbox or not outbox:
            raise ConfigError(f"{names}: neither may be empty (an empty prefix takes in every key of the bucket)")
        if inbox.startswith(outbox) or outbox.startswith(inbox):
            raise ConfigError(f"{names} overlap: a job's results would land in the inbox and start another job; "
                              "give two prefixes neither of which starts the other (e.g. inbox/ and outbox/)")

    @property
    def dlq(self) -> str:
        return f"{self.queue}-dlq"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> BatchConfig:
        values: dict[str, Any] = {
            "bucket": settings.batch_bucket,
            "inbox_prefix": settings.batch_inbox_prefix,
            "outbox_prefix": settings.batch_outbox_prefix,
            "queue": settings.batch_queue,
        }
        return cls(**{**values, **overrides})

    def job_name(self, key: str) -> str | None:
        """The job a key starts, or None when the key is not a job file (outside the inbox, not .jsonl).

        Raises ValueError for a job file whose name could not be used in the outbox's keys: empty, ".", ".."
        or empty path segments (a tool that normalizes them would write outside the outbox), control
        characters, or so long that an output key would pass S3's 1,024 bytes (its results could never be
        written, after the whole file had been run)."""
        if not key.startswith(self.inbox_prefix) or not key.endswith(".jsonl"):
            return None
        name = key[len(self.inbox_prefix):-len(".jsonl")]
        if any(part in ("", ".", "..") for part in name.split("/")) or any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ValueError(f"job file {key!r:.200} names no usable job: its name must not be empty or have empty, "
                             "'.' or '..' path segments or control characters")
        longest = max(len(k.encode()) for k in (self.results_key(name), self.summary_key(name),
                                                self.progress_key(name)))
        if longest > MAX_KEY_BYTES:
            raise ValueError(f"job file {key!r:.200} names no usable job: its longest output key would be "
                             f"{longest:,} UTF-8 bytes, over S3's {MAX_KEY_BYTES:,}; shorten the name by "
                             f"{longest - MAX_KEY_BYTES:,} bytes")
        return name

    def inbox_key(self, job: str) -> str:
        return f"{self.inbox_prefix}{job}.jsonl"

    def results_key(self, job: str) -> str:
        return f"{self.outbox_prefix}{job}.results.jsonl"

    def summary_key(self, job: str) -> str:
        return f"{self.outbox_prefix}{job}.summary.json"

    def progress_key(self, job: str) -> str:
        return f"{self.outbox_prefix}{job}.progress.json"


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str
    etag: str | None = None


def _field(value: Any, *path: str) -> Any:
    """value[path[0]][path[1]]..., or None where a step is missing or not an object."""
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    return value


def object_refs(event: Mapping[str, Any]) -> list[ObjectRef]:
    """ObjectCreated records of an S3 event notification (keys arrive URL-encoded); test events give [].

    A record not shaped as S3 writes one (not an object, no string bucket name or key) is skipped with a warning,
    never raised on: the records beside it still run, and the queue message that carried it is not received
    again and again, until its DLQ, for a record no retry can read."""
    refs = []
    for index, record in enumerate(event.get("Records") or []):
        if not isinstance(record, dict):
            log.warning("S3 event record %d names no S3 object (a %s, not an object); skipped", index,
                        type(record).__name__)
            continue
        if not str(record.get("eventName", "")).startswith("ObjectCreated"):
            continue
        bucket, key, etag = (_field(record, "s3", "bucket", "name"), _field(record, "s3", "object", "key"),
                             _field(record, "s3", "object", "eTag"))
        if not isinstance(bucket, str) or not isinstance(key, str) or not bucket or not key:
            log.warning("S3 event record %d names no S3 object (no string s3.bucket.name and s3.object.key); "
                        "skipped", index)
            continue
        refs.append(ObjectRef(bucket, unquote_plus(key), etag.strip('"') or None if isinstance(etag, str) else None))
    return refs


class LatencyHistogram:
    """Log-spaced buckets (5% wide) from 10 us to ~3 h: percentiles in bounded memory for any line count."""

    _BASE, _FACTOR = 0.01, 1.05

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, ms: float) -> None:
        index = 0 if ms <= self._BASE else int(math.log(ms / self._BASE, self._FACTOR)) + 1
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total += ms
        self.max = max(self.max, ms)

    def percentile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank, seen = q / 100 * self.count, 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(self.max, self._BASE * self._FACTOR ** index)
        return self.max

    def to_json(self) -> dict[str, float]:
        return {"p50": round(self.percentile(50), 3), "p90": round(self.percentile(90), 3),
                "p99": round(self.percentile(99), 3), "max": round(self.max, 3),
                "mean": round(self.total / self.count, 3) if self.count else 0.0}


async def iter_lines(read: Callable[[int], bytes], chunk_bytes: int, max_line: int) -> AsyncIterator[bytes | None]:
    """Lines of a blocking byte stream, read in chunks off the event loop. None stands for a line over max_line
    (skipped, never buffered whole)."""
    buffer = b""
    skipping = False
    while True:
        chunk = await asyncio.to_thread(read, chunk_bytes)
        if not chunk:
            break
        data = buffer + chunk if buffer else chunk
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if skipping or end - start > max_line:
                skipping = False
                yield None
            else:
                yield data[start:end]
            start = end + 1
        buffer = data[start:]
        if len(buffer) > max_line:
            skipping, buffer = True, b""
    if skipping:
        yield None
    elif buffer:
        yield buffer


class MultipartWriter:
    """Append bytes; parts of `part_bytes` go out as they fill. Small outputs become one PutObject."""

    def __init__(self, s3: Any, bucket: str, key: str, part_bytes: int, metadata: dict[str, str],
                 content_type: str = "application/x-ndjson") -> None:
        self.s3, self.bucket, self.key = s3, bucket, key
        self.part_bytes = part_bytes
        self.metadata, self.content_type = metadata, content_type
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.bytes_written = 0

    async def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= self.part_bytes:
            await self._flush()

    async def _flush(self) -> None:
        if self._upload_id is None:
            created = await asyncio.to_thread(self.s3.create_multipart_upload, Bucket=self.bucket, Key=self.key,
                                              ContentType=self.content_type, Metadata=self.metadata)
            self._upload_id = created["UploadId"]
        body, self._buffer = bytes(self._buffer), bytearray()
        number = len(self._parts) + 1
        part = await asyncio.to_thread(self.s3.upload_part, Bucket=self.bucket, Key=self.key, PartNumber=number,
                                       UploadId=self._upload_id, Body=body)
        self._parts.append({"ETag": part["ETag"], "PartNumber": number})
        self.bytes_written += len(body)

    async def close(self) -> None:
        if self._upload_id is None:
            body, self._buffer = bytes(self._buffer), bytearray()
            await asyncio.to_thread(self.s3.put_object, Bucket=self.bucket, Key=self.key, Body=body,
                                    ContentType=self.content_type, Metadata=self.metadata)
            self.bytes_written += len(body)
            return
        if self._buffer:
            await self._flush()
        await asyncio.to_thread(self.s3.complete_multipart_upload, Bucket=self.bucket, Key=self.key,
                                UploadId=self._upload_id, MultipartUpload={"Parts": self._parts})

    async def abort(self) -> None:
        if self._upload_id is not None:
            with contextlib.suppress(ClientError):
                await asyncio.to_thread(self.s3.abort_multipart_upload, Bucket=self.bucket, Key=self.key,
                                        UploadId=self._upload_id)
            self._upload_id = None


class KeyLocks:
    """One asyncio.Lock per key, kept only while someone holds or waits on it.

    Keys come from uploads: a map that kept a lock per key ever seen would grow for as long as the process
    lives. The count of holders and waiters says when the last one has gone and the entry can go too."""

    @dataclass
    class _Entry:
        lock: asyncio.Lock = field(default_factory=asyncio.Lock)
        users: int = 0  # holding or waiting

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], KeyLocks._Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        entry = self._entries.setdefault(key, KeyLocks._Entry())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[key]


@dataclass
class _JobState:
    job: str
    etag: str
    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.perf_counter)
    lines: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    model_versions: dict[str, dict[str, int]] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def progress(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.clock
        return {"job": self.job, "etag": self.etag, "lines_done": self.lines, "ok": self.ok, "errors": self.errors,
                "elapsed_s": round(elapsed, 3), "lines_per_s": round(self.lines / elapsed, 1) if elapsed else 0.0}


class BatchJobRunner:
    """Runs job files through one engine. One runner per process: it serialises jobs on the same object."""

    def __init__(self, engine: InferenceEngine, s3: Any, config: BatchConfig, *, max_request_bytes: int,
                 worker_id: str = "local") -> None:
        self.engine = engine
        self.s3 = s3
        self.config = config
        self.max_request_bytes = max_request_bytes
        self.worker_id = worker_id
        self._locks = KeyLocks()

    async def run(self, bucket: str, key: str) -> dict[str, Any] | None:
        """Process one uploaded object; returns its summary (the existing one for a duplicate event), or None
        when the key is not a job file, the object is gone, or it was replaced by a newer upload while it ran."""
        if bucket != self.config.bucket:
            log.warning("s3://%s/%s: not in the batch bucket %s; ignored", bucket, key, self.config.bucket)
            return None
        try:
            job = self.config.job_name(key)
        except ValueError as exc:  # nowhere safe to write its results: said in the log, the object left as it is
            log.warning("%s; ignored", exc)
            return None
        if job is None:
            return None
        async with self._locks.hold((bucket, key)):
            head = await self._head(bucket, key)
            if head is None:
                log.info("job object s3://%s/%s is gone; nothing to do", bucket, key)
                return None
            etag = head["ETag"].strip('"')
            existing = await self._existing_summary(bucket, job, etag)
            if existing is not None:
                log.info("job %s (etag %s) already has a summary; skipping the duplicate event", job, etag)
                return {**existing, "duplicate": True}
            return await self._run(bucket, key, job, etag, head)

    async def _head(self, bucket: str, key: str) -> dict[str, Any] | None:
        """The job object's HEAD, or None when it is gone."""
        try:
            return await asyncio.to_thread(self.s3.head_object, Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    async def _superseded(self, bucket: str, key: str, job: str, etag: str, dropped: str) -> bool:
        """True, and logged, when the job file now holds another upload than the one this run read.

        That upload's own event runs it (another process may be running it now): this run's outputs, older,
        must not overwrite its results or summary, whichever finishes last. A deleted file supersedes nothing."""
        head = await self._head(bucket, key)
        now = None if head is None else head["ETag"].strip('"')
        if now is None or now == etag:
            return False
        log.warning("job %s: s3://%s/%s was replaced while the job ran (etag %s, now %s); %s: the new upload's "
                    "own event runs it", job, bucket, key, etag, now, dropped)
        return True

    async def _existing_summary(self, bucket: str, job: str, etag: str) -> dict[str, Any] | None:
        """The summary of this upload's finished run, or None: then the job runs (again), and its summary is
        written anew. One over MAX_SUMMARY_BYTES, or not a JSON object, is no summary this code wrote: it is not
        read whole, nor trusted (raised on, it would fail every run of the job)."""
        key = self.config.summary_key(job)
        try:
            obj = await asyncio.to_thread(self.s3.get_object, Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        try:
            if obj.get("Metadata", {}).get(SOURCE_ETAG) != etag:
                return None
            raw = await asyncio.to_thread(obj["Body"].read, MAX_SUMMARY_BYTES + 1)  # bounded, whatever its size
        finally:
            obj["Body"].close()
        if len(raw) > MAX_SUMMARY_BYTES:
            log.warning("job %s: its summary s3://%s/%s is over the %d bytes a summary may have; not a valid "
                        "summary, so the job runs again", job, bucket, key, MAX_SUMMARY_BYTES)
            return None
        try:
            summary = orjson.loads(raw)
        except orjson.JSONDecodeError:
            summary = None
        if isinstance(summary, dict):
            return summary
        log.warning("job %s: its summary s3://%s/%s is not a JSON object; not a valid summary, so the job runs "
                    "again", job, bucket, key)
        return None

    async def _run(self, bucket: str, key: str, job: str, etag: str, head: dict[str, Any]
                   ) -> dict[str, Any] | None:
        state = _JobState(job, etag)
        log.info("job %s: s3://%s/%s (%d bytes, etag %s)", job, bucket, key, head.get("ContentLength", 0), etag)
        body = await self._open(bucket, key, job, etag)
        if body is None:
            return None
        writer = MultipartWriter(self.s3, bucket, self.config.results_key(job), self.config.part_bytes,
                                 {SOURCE_ETAG: etag})
        progress = asyncio.create_task(self._report_progress(bucket, state), name=f"maas-batch-progress-{job}")
        window: deque[tuple[asyncio.Task[bytes], int]] = deque()  # (line's task, line's bytes), in input order
        in_flight = 0
        try:
            lineno = 0
            async for line in iter_lines(body.read, self.config.read_bytes, self.max_request_bytes):
                lineno += 1
                if line is not None and not line.strip():
                    continue
                size = 0 if line is None else len(line)
                # Bounded by bytes too: the oldest lines are written out until this one fits (an empty window
                # always admits it, however large, so no line waits forever).
                while window and (len(window) >= self.config.window or in_flight + size > self.config.window_bytes):
                    await writer.write(await window[0][0])  # popped once written: a cancel here still reaches it
                    in_flight -= window.popleft()[1]
                window.append((asyncio.create_task(self._line(lineno, line, state)), size))
                in_flight += size
            while window:
                await writer.write(await window[0][0])
                window.popleft()
            if await self._superseded(bucket, key, job, etag, "its results are dropped"):
                await writer.abort()
                return None
            await writer.close()
        except BaseException:
            tasks = [task for task, _ in window]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await writer.abort()
            raise
        finally:
            body.close()
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        summary = self._summary(bucket, key, job, etag, head, state, writer.bytes_written)
        if await self._superseded(bucket, key, job, etag, "its summary is not written (its results, just written, "
                                  "carry the old source-etag)"):
            return None
        await asyncio.to_thread(self.s3.put_object, Bucket=bucket, Key=self.config.summary_key(job),
                                Body=orjson.dumps(summary, option=orjson.OPT_INDENT_2),
                                ContentType="application/json", Metadata={SOURCE_ETAG: etag})
        log.info("job %s: %d lines (%d ok, %d errors) in %.1fs", job, state.lines, state.ok, state.errors,
                 summary["duration_s"])
        return summary

    async def _open(self, bucket: str, key: str, job: str, etag: str) -> Any | None:
        """The body of the upload the job's HEAD saw, or None (logged) when the job file was replaced or deleted
        since: as when that happens while the job runs, the new upload's own event runs it, and a deleted file is
        nothing to do. Neither is the job's failure, to be retried (and after its retries, dead-lettered)."""
        try:
            obj = await asyncio.to_thread(self.s3.get_object, Bucket=bucket, Key=key, IfMatch=f'"{etag}"')
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("412", "PreconditionFailed"):
                log.warning("job %s: s3://%s/%s was replaced before the job read it (etag %s); not run: the new "
                            "upload's own event runs it", job, bucket, key, etag)
                return None
            if code in ("404", "NoSuchKey", "NotFound"):
                log.info("job object s3://%s/%s is gone; nothing to do", bucket, key)
                return None
            raise
        return obj["Body"]

    async def _report_progress(self, bucket: str, state: _JobState) -> None:
        """A small progress object every few seconds, for `maas batch submit`'s progress bar."""
        key = self.config.progress_key(state.job)
        while True:
            await asyncio.sleep(self.config.progress_interval_s)
            try:
                await asyncio.to_thread(self.s3.put_object, Bucket=bucket, Key=key,
                                        Body=orjson.dumps(state.progress()), ContentType="application/json")
            except (ClientError, BotoCoreError) as exc:  # progress is best effort; the job goes on
                log.warning("job %s: cannot write progress: %s", state.job, exc)

    async def _line(self, lineno: int, line: bytes | None, state: _JobState) -> bytes:
        """One input line -> one output line (result or inline error)."""
        started = time.perf_counter()
        request: InferenceRequest | None = None
        try:
            if line is None:
                raise InferenceError(ErrorCode.PAYLOAD_TOO_LARGE, f"line is longer than {self.max_request_bytes} "
                                     "bytes (MAAS_MAX_REQUEST_BYTES)")
            request = await self._request(line, lineno)
            response = await self._infer(request)
            out = orjson.dumps(response.to_json(), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
            state.ok += 1
            REQUESTS.labels(response.model_name, "ok").inc()  # a line answered is a request answered, as on a topic
            versions = state.model_versions.setdefault(response.model_name, {})
            versions[str(response.model_version)] = versions.get(str(response.model_version), 0) + 1
        except Exception as exc:  # a bug on one line must not lose the job's other lines: an INTERNAL error line
            if not isinstance(exc, InferenceError):
                log.exception("job %s line %d: unexpected failure", state.job, lineno)
                exc = InferenceError(ErrorCode.INTERNAL, f"unexpected failure ({type(exc).__name__}; the server's log "
                                     "has the details)", request.id if request else None)  # not its message:
                # the results file is the uploader's, and an exception's message may quote the server's files
            body = exc.to_json(request.model_name if request else None)
            body["line"] = lineno
            out = orjson.dumps(body) + b"\n"
            state.errors += 1
            state.errors_by_code[str(exc.code)] = state.errors_by_code.get(str(exc.code), 0) + 1
            ERRORS.labels(str(exc.code)).inc()
            REQUESTS.labels(model_label(self.engine, request), "error").inc()
        state.lines += 1
        state.latency.add((time.perf_counter() - started) * 1000)
        return out

    async def _infer(self, request: InferenceRequest) -> InferenceResponse:
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                return await self.engine.infer(request)
            except InferenceError as exc:
                if not exc.code.transient or attempt == self.config.max_attempts:
                    raise
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    async def _request(self, line: bytes, lineno: int) -> InferenceRequest:
        try:
            body = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InferenceError(ErrorCode.INVALID_JSON, f"line is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InferenceError(ErrorCode.INVALID_REQUEST, "line must be a JSON object (a V2 request, or "
                                 '{"id", "model_name", "data" | "text"})')
        body.setdefault("id", f"line-{lineno}")
        refuse_claim_checks(body.get("inputs_uri"), body.get("parameters"),
                            body["id"] if isinstance(body["id"], str) else None, "in batch files",
                            "put the inputs in the line", "results go to the job's results file")
        if "inputs" not in body and ("data" in body or "text" in body):
            body = await self._expand_shorthand(body)
        return parse_request(body, max_elements=self.max_request_bytes)

    async def _expand_shorthand(self, body: dict[str, Any]) -> dict[str, Any]:
        """{"id", "model_name", "data": [...]} or {"text": "..."} -> a V2 request for a one-input model.

        The config comes from the engine on every line (its cache answers; "latest" is re-resolved after its
        TTL, so a newly published version is seen), and the request is pinned to the version whose input it
        was shaped for: "latest" must not move between the shaping and the run."""
        name, version = body.get("model_name"), body.get("model_version")
        if not isinstance(name, str):
            raise InferenceError(ErrorCode.INVALID_REQUEST, "model_name: expected a string", str(body["id"]))
        try:
            resolved, config = await self.engine.model_config(name, version)
        except InferenceError as exc:
            exc.request_id = str(body["id"])
            raise
        if len(config.inputs) != 1:
            raise InferenceError(ErrorCode.INVALID_REQUEST, f"model {name!r} takes {len(config.inputs)} inputs: "
                                 "the data/text shorthand needs a one-input model; send a V2 request", str(body["id"]))
        spec = config.inputs[0]
        if "text" in body:
            value = [body["text"]] if isinstance(body["text"], str) else body["text"]
            tensor = {"name": spec.name, "datatype": "BYTES",
                      "shape": [len(value) if isinstance(value, list) else 1, *(1 for _ in spec.shape[1:])],
                      "data": value}
        else:
            data = body["data"]
            nested = isinstance(data, list) and bool(data) and isinstance(data[0], list)
            rows = len(data) if nested else 1
            per_row = len(data[0]) if nested else (len(data) if isinstance(data, list) else 1)
            dims = list(spec.shape[1:])
            if dims.count(-1) == 1:  # one free dimension: it takes what the fixed ones leave
                fixed = math.prod(d for d in dims if d != -1)
                dims = [per_row // fixed if d == -1 else d for d in dims]
            tensor = {"name": spec.name, "datatype": spec.datatype, "shape": [rows, *dims], "data": data}
        out = {k: v for k, v in body.items() if k not in ("data", "text")}
        out["inputs"], out["model_version"] = [tensor], str(resolved)
        return out

    def _summary(self, bucket: str, key: str, job: str, etag: str, head: dict[str, Any], state: _JobState,
                 results_bytes: int) -> dict[str, Any]:
        duration = time.perf_counter() - state.clock
        return {
            "job": job,
            "status": "completed",
            "source": {"bucket": bucket, "key": key, "etag": etag, "bytes": head.get("ContentLength"),
                       "version_id": head.get("VersionId")},
            "results": {"bucket": bucket, "key": self.config.results_key(job), "bytes": results_bytes},
            "lines": state.lines,
            "ok": state.ok,
            "errors": state.errors,
            "errors_by_code": state.errors_by_code,
            "model_versions": state.model_versions,
            "duration_s": round(duration, 3),
            "throughput_lines_per_s": round(state.lines / duration, 1) if duration > 0 else 0.0,
            "latency_ms": state.latency.to_json(),
            "started_at": state.started,
            "finished_at": time.time(),
            "worker": self.worker_id,
        }


def ensure_batch_notifications(s3: Any, sqs: Any, config: BatchConfig) -> str:
    """Bucket, queue (+ DLQ) and the bucket notification ObjectCreated(inbox/*.jsonl) -> queue. Idempotent."""
    ensure_buckets(s3, [config.bucket])
    queue_url = ensure_queue(sqs, config.queue, config.dlq)
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"}, "Action": "sqs:SendMessage",
        "Resource": queue_arn, "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{config.bucket}"}},
    }]}
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": orjson.dumps(policy).decode()})
    current = s3.get_bucket_notification_configuration(Bucket=config.bucket)
    current.pop("ResponseMetadata", None)
    queues = [q for q in current.get("QueueConfigurations", []) if q.get("Id") != NOTIFICATION_ID]
    queues.append({
        "Id": NOTIFICATION_ID, "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": config.inbox_prefix},
                                           {"Name": "suffix", "Value": ".jsonl"}]}},
    })
    s3.put_bucket_notification_configuration(Bucket=config.bucket,
                                             NotificationConfiguration={**current, "QueueConfigurations": queues})
    return queue_url


def _s3_event(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """The S3 event notification an SQS message carries, or {} for one that carries none.

    Such a message is deleted (it would only come back), so a warning is the one trace left of it: its id and
    a short excerpt, never its values (a JSON object shows only its keys; anything else its first 40
    characters), since a stray message may carry anything."""
    body = message.get("Body") or ""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        event = None
    if isinstance(event, dict) and (isinstance(event.get("Records"), list) or event.get("Event") == "s3:TestEvent"):
        return event
    excerpt = (f"a JSON object with keys {[str(k)[:20] for k in list(event)[:5]]}" if isinstance(event, dict)
               else f"{body[:40]!r}")
    log.warning("batch queue message %s is not an S3 event notification (%d characters: %s); deleted",
                message.get("MessageId"), len(body), excerpt)
    return {}


class BatchJobWatcher:
    """Long-polls the notification queue and runs each job; a message is deleted only after its jobs finished.

    While a job runs, the message's visibility is extended, so a long job is not handed to another watcher;
    a watcher that dies leaves the message to reappear (and, after maxReceiveCount, to go to the DLQ).
    Messages are received one at a time: a message received but not yet started would become visible again
    behind a long job and be run by a second watcher too; left in the queue, it goes to an idle watcher.

    `completed` holds the summaries of the latest `MAX_COMPLETED` jobs (a worker runs for months, and each upload
    makes one), `jobs_done` counts them all.
    """

    MAX_COMPLETED = 100

    def __init__(self, runner: BatchJobRunner, sqs: Any, queue_url: str, *, wait_s: int = 10,
                 visibility_s: int = 60, drain_timeout_s: float = 20.0) -> None:
        self.runner = runner
        self.sqs = sqs
        self.queue_url = queue_url
        self.wait_s = wait_s
        self.visibility_s = visibility_s
        self.drain_timeout_s = drain_timeout_s
        self.completed: list[dict[str, Any]] = []
        self.jobs_done = 0
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._stopped: asyncio.Task | None = None  # the latest stop's drain, which every stop() waits for

    async def start(self) -> BatchJobWatcher:
        self._stopping = False
        self._stopped = None
        self._task = asyncio.create_task(self._loop(), name="maas-batch-watcher")
        return self

    async def stop(self) -> None:
        """Stop polling; let the job under way finish for up to `drain_timeout_s` (its message is then deleted),
        else cancel it: its upload is aborted and its message made visible at once, so that another watcher
        runs the job from the start. A job may take hours; a pod is killed some 30 s after its SIGTERM. A poll
        under way is waited for (at most `wait_s`), and what it receives made visible at once too. An endpoint
        that does not answer those calls (`POLL_GRACE_S` past that) has them abandoned (`end_cancelled`).

        A stop() called while another drains returns when that one is done: it returned at once, and its caller took
        the watcher for stopped with the job still under way. The drain is a task of its own, which a caller cancelled
        while it waits leaves running for the others: cancelled with its caller, it left the job running, never
        cancelled."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            self._stopped = asyncio.create_task(self._drain(task), name="maas-batch-watcher-stop")
        if self._stopped is not None:
            await asyncio.shield(self._stopped)

    async def _drain(self, task: asyncio.Task) -> None:
        started = time.monotonic()
        await asyncio.wait({task}, timeout=self.drain_timeout_s)
        task.cancel()
        # A poll under way when stop() began ends within wait_s; what a cancelled job does (abort its upload,
        # release its message) takes moments: past that the endpoint does not answer, and the calls are abandoned.
        cleanup_s = max(POLL_GRACE_S, started + self.wait_s + POLL_GRACE_S - time.monotonic())
        await end_cancelled(task, cleanup_s, f"the batch watcher on {self.queue_url}")

    async def __aenter__(self) -> BatchJobWatcher:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                received = await self._receive()
            except (ClientError, BotoCoreError) as exc:  # throttled, or the endpoint unreachable for a while
                log.warning("cannot receive from %s: %s; retrying", self.queue_url, exc)
                await asyncio.sleep(1.0)
                continue
            for message in received:
                if self._stopping:  # received while stop() waited for the poll: for another watcher
                    await self._release(message)
                    continue
                await self._handle(message)

    async def _receive(self) -> list[dict[str, Any]]:
        """One long poll's messages. Cancelled (stop() past its drain timeout), it still waits for the poll under
        way, at most `wait_s`, and releases what it received (`receive_or_release`), for another watcher."""
        return await receive_or_release(self.sqs, self.queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=self.wait_s,
                                        VisibilityTimeout=self.visibility_s)

    async def _handle(self, message: dict[str, Any]) -> None:
        ended = asyncio.Event()
        heartbeat = asyncio.create_task(self._keep_invisible(message["ReceiptHandle"], ended))
        try:
            refs = list(dict.fromkeys(object_refs(_s3_event(message))))
            for ref in refs:
                summary = await self.runner.run(ref.bucket, ref.key)
                if summary is not None:
                    self.completed.append(summary)
                    del self.completed[:-self.MAX_COMPLETED]
                    self.jobs_done += 1
        except asyncio.CancelledError:
            log.warning("batch job message %s: stopped before its job finished; released for another watcher",
                        message.get("MessageId"))
            await self._end_heartbeat(heartbeat, ended)  # first: a heartbeat landing after it undid the release
            await self._release(message)
            raise
        except Exception:
            log.exception("batch job message %s failed; it will be redelivered", message.get("MessageId"))
            return
        finally:
            await self._end_heartbeat(heartbeat, ended)
        try:
            await asyncio.to_thread(self.sqs.delete_message, QueueUrl=self.queue_url,
                                    ReceiptHandle=message["ReceiptHandle"])
        except (ClientError, BotoCoreError) as exc:  # the job is done; its redelivery will find it done
            log.warning("cannot delete batch job message %s: %s", message.get("MessageId"), exc)

    async def _release(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(ClientError, BotoCoreError):  # else it comes back when its visibility runs out
            await release_messages(self.sqs, self.queue_url, [message])

    async def _keep_invisible(self, receipt: str, ended: asyncio.Event) -> None:
        """Extend the message's visibility every third of it until `ended` is set. A call under way then is
        finished, not cancelled: cancelled, its thread went on, and a call that landed after the message's release
        hid it from the other watchers for `visibility_s` again."""
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), self.visibility_s / 3)
                return
            with contextlib.suppress(ClientError, BotoCoreError):
                await asyncio.to_thread(self.sqs.change_message_visibility, QueueUrl=self.queue_url,
                                        ReceiptHandle=receipt, VisibilityTimeout=self.visibility_s)

    @staticmethod
    async def _end_heartbeat(heartbeat: asyncio.Task, ended: asyncio.Event) -> None:
        """Stop `_keep_invisible`, letting a call under way finish for up to `POLL_GRACE_S` (an endpoint that does
        not answer it would not answer the release either)."""
        ended.set()
        if not (await asyncio.wait([heartbeat], timeout=POLL_GRACE_S))[0]:
            heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
