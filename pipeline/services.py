"""Connect the engine to its infrastructure: the configured Kafka / AWS, or the embedded local stack.

Resolution order when KAFKA_BOOTSTRAP_SERVERS / AWS_ENDPOINT_URL are unset: a stack started by `maas up`
in this folder (its addresses are in .maas/stack.json), else a private embedded stack for this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from infra.bootstrap import ensure_buckets, ensure_topics
from infra.stack import LocalStack, StackError
from models.cache import ModelCache
from models.repository import Repository, RepositoryError, without_credentials
from models.repository import open_repository as open_model_repository
from models.s3_repository import parse_s3_uri
from pipeline.claim_check import ClaimCheckStore
from pipeline.settings import ConfigError, Settings
from pipeline.sinks import topic_max_bytes

STATE_FILE = Path(".maas") / "stack.json"
#: The part of a client's stop deadline kept for closing it without what it could not finish (see `stop_producer`):
#: that takes milliseconds once its connections are closed; this bounds the rare case that does not.
ABANDON_GUARD_S = 1.0
RECORD_LIMITS_TIMEOUT_S = 10.0  # `record_limits`' question to the cluster, at a worker's or a function's start

log = logging.getLogger(__name__)


def write_state(settings: Settings, path: Path = STATE_FILE) -> None:
    """Record where this process's stack listens, for other `maas` commands run in this folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "pid": os.getpid(),
        "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
        "aws_endpoint_url": settings.aws_endpoint_url,
    }))


def read_state(path: Path = STATE_FILE) -> dict[str, Any] | None:
    """The addresses of a running `maas up`, or None when there is none (or it died).

    A `maas up` holds the lock beside the file for its life (`stack_lock`), which the kernel drops however it ends:
    a file whose lock nobody holds was left by one that died, though its pid may name another process by now
    (after a reboot, say)."""
    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if _locked(stack_lock(path)) else None


def stack_lock(state_file: Path = STATE_FILE) -> Path:
    """The file a `maas up` holds an exclusive `flock` on while it runs."""
    return state_file.with_suffix(".lock")


def _locked(lock: Path) -> bool:
    """Whether a process holds an exclusive `flock` on `lock` (this one too, through another open of it)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock, if it was taken
    return False


def open_repository(settings: Settings) -> Repository:
    """MAAS_MODEL_REPOSITORY as a repository: a local folder, or S3 through the configured endpoint.

    With the embedded stack, call this after the stack's endpoint is in `settings`. A command that starts no
    stack (`maas serve`, `maas models`) takes an s3:// repository's endpoint from the `maas up` running in this
    folder: without one, S3 would be AWS itself, asked with the embedded stack's dummy keys.
    """
    if settings.embedded_aws and settings.model_repository.startswith("s3://"):
        state = read_state()
        if not state or not state.get("aws_endpoint_url"):
            raise ConfigError(f"MAAS_MODEL_REPOSITORY {settings.model_repository} is on S3, but AWS_ENDPOINT_URL is "
                              "unset, no AWS credentials are configured and no `maas up` runs in this folder: start "
                              "`maas up` here, or point AWS_ENDPOINT_URL (or AWS credentials) at the store")
        settings = settings.with_endpoints(None, state["aws_endpoint_url"])
    try:
        return open_model_repository(settings.model_repository, lambda: aws_client(settings, "s3"),
                                     cache_dir=settings.model_cache_dir)
    except RepositoryError as exc:
        raise ConfigError(f"MAAS_MODEL_REPOSITORY: {exc}") from None


def model_cache(settings: Settings, repository: Repository | None = None) -> ModelCache:
    """The warm model cache over MAAS_MODEL_REPOSITORY (or `repository`), within MAAS_MODEL_CACHE_BYTES."""
    return ModelCache(repository if repository is not None else open_repository(settings),
                      max_bytes=settings.model_cache_bytes)


def aws_client(settings: Settings, service: str) -> Any:
    """A boto3 client for S3 or SQS on the configured endpoint (dummy credentials for the embedded one)."""
    kwargs: dict[str, Any] = {
        "region_name": settings.aws_region,
        "config": Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    }
    if settings.aws_endpoint_url:
        kwargs["endpoint_url"] = settings.aws_endpoint_url
    if not settings.aws_credentials_configured:
        kwargs.update(aws_access_key_id="maas-local", aws_secret_access_key="maas-local")
    return boto3.client(service, **kwargs)


async def bootstrap(settings: Settings, *, model_bucket: bool = False) -> None:
    """Create topics and the batch bucket if missing. Failures become one-line ConfigErrors.

    `model_bucket`: also an s3:// MAAS_MODEL_REPOSITORY's bucket, for an embedded S3 that was just started
    empty. Not on a real store, where a misspelt bucket is better refused than made anew and empty."""
    try:
        await ensure_topics(settings.kafka_client_kwargs(), settings.topics.all(), settings.topic_partitions,
                            configs={"max.message.bytes": str(settings.max_record_bytes)})
    except KafkaConnectionError as exc:
        raise ConfigError(f"cannot reach Kafka at {settings.kafka_bootstrap_servers} "
                          f"(KAFKA_BOOTSTRAP_SERVERS): {exc}") from None
    except KafkaError as exc:
        raise ConfigError(f"cannot create topics on {settings.kafka_bootstrap_servers}: {exc!r}") from None
    buckets = [settings.batch_bucket]
    try:
        if model_bucket and settings.model_repository.startswith("s3://"):
            buckets.append(parse_s3_uri(settings.model_repository)[0])
    except RepositoryError as exc:
        raise ConfigError(f"MAAS_MODEL_REPOSITORY: {exc}") from None
    try:
        ensure_buckets(aws_client(settings, "s3"), buckets)
    except (BotoCoreError, ClientError) as exc:
        where = settings.aws_endpoint_url or "AWS"
        raise ConfigError(without_credentials(f"cannot reach S3 at {where} (AWS_ENDPOINT_URL / AWS credentials): "
                                              f"{exc}")) from None


@contextlib.asynccontextmanager
async def connected(settings: Settings, *, use_state: bool = True) -> AsyncIterator[Settings]:
    """Yield settings with reachable endpoints, starting an embedded stack for what is not configured."""
    stack: LocalStack | None = None
    state = read_state() if use_state else None
    if state and settings.embedded_kafka:
        settings = settings.with_endpoints(state["kafka_bootstrap_servers"],
                                           None if not settings.embedded_aws else state["aws_endpoint_url"])
    own_s3 = settings.embedded_aws
    try:  # the stack is stopped and its folder removed whatever ends this, a SIGTERM's SystemExit included
        if settings.embedded_kafka or settings.embedded_aws:
            stack = LocalStack(Path(tempfile.mkdtemp(prefix="maas-stack-")))
            try:
                stack.start(kafka=settings.embedded_kafka, aws=settings.embedded_aws)
            except StackError as exc:
                stack = None  # its children are stopped; its folder keeps the log that the message names
                raise ConfigError(str(exc)) from None
            if use_state:  # `maas worker` or `maas batch worker` with nothing configured and no `maas up` here
                _warn_private_stack(settings, stack)
            settings = settings.with_endpoints(
                stack.bootstrap_servers if settings.embedded_kafka else None,
                stack.endpoint_url if settings.embedded_aws else None,
            )
        await bootstrap(settings, model_bucket=own_s3)
        yield settings
    finally:
        if stack is not None:
            stack.stop()


def _warn_private_stack(settings: Settings, stack: LocalStack) -> None:
    """A worker that found no `maas up` in its folder (started elsewhere, or before it) served a broker of its own
    that nothing else could reach: `maas submit` then waited out its timeout, and nothing said why."""
    if settings.embedded_kafka:
        log.warning("no `maas up` runs in this folder (%s): this process started a private embedded stack (Kafka "
                    "%s, S3/SQS %s) that other commands do not find; to reach it with `maas submit`, start `maas up` "
                    "here first, or set KAFKA_BOOTSTRAP_SERVERS and AWS_ENDPOINT_URL", STATE_FILE,
                    stack.bootstrap_servers, stack.endpoint_url if settings.embedded_aws else "as configured")
    else:
        log.warning("S3/SQS are not configured (AWS_ENDPOINT_URL, AWS credentials or MAAS_AWS=aws): this process "
                    "started a private embedded S3/SQS server (%s) that other processes do not use", stack.endpoint_url)


def answer_producer(settings: Settings) -> AIOKafkaProducer:
    """The producer every source answers with: acks from all replicas, room for the largest answer or
    dead letter the settings allow, batches big enough for throughput (not started).

    It tracks the metadata of the topics it produces to (results, dead letters, metrics) from the start. Left
    to itself, aiokafka's client tracks every topic until it is asked about one it does not know (a caller's
    `reply_to` topic created after it started, or none at all), and from then on only the topics asked about:
    the platform's topics dropped out of its metadata, batches queued for them had no leader, the sender asked
    for metadata in a loop (tens of thousands of requests a second) and the batches failed after
    request_timeout_ms, stopping the worker. Topics asked about later are added to these.
    """
    producer = AIOKafkaProducer(
        **settings.kafka_client_kwargs(), acks="all", linger_ms=2, max_batch_size=settings.producer_max_batch_bytes,
        max_request_size=settings.max_record_bytes, request_timeout_ms=settings.kafka_request_timeout_ms,
        enable_idempotence=settings.kafka_idempotence, client_id=f"maas-{settings.worker_id}",
    )
    # Before start(): the client's first metadata update after its bootstrap asks for these topics.
    producer.client.set_topics([settings.topics.results, settings.topics.dlq, settings.topics.metrics])
    return producer


async def record_limits(producer: AIOKafkaProducer, settings: Settings) -> dict[str, int]:
    """The `max.message.bytes` of the results and dead-letter topics, from a started `producer`'s connection.

    A topic created elsewhere (or a broker left at Kafka's default of 1 MB) may take less than the answers and
    dead letters the settings allow (`Settings.max_record_bytes`); the broker refuses a record over it, and a
    worker that cannot answer a record stops, and stops on it again after every restart. Given these limits, the
    sink sends larger results and dead letters to S3 instead (`KafkaSink.for_settings`), keeps its batches of
    answers within the results topic's limit (Kafka checks whole batches against it) and sends each dead letter in
    a batch of its own. A topic the cluster says nothing of, or a cluster that does not answer (an ACL without
    DescribeConfigs), gives no limit: logged. A caller's `reply_to` topic's limit is read by the sink, when it first
    looks the topic up.
    """
    topics = [settings.topics.results, settings.topics.dlq]
    try:
        async with asyncio.timeout(RECORD_LIMITS_TIMEOUT_S):
            limits = await topic_max_bytes(producer.client, topics)
    except (KafkaError, TimeoutError) as exc:
        log.warning("cannot read the max.message.bytes of %s (%r): answers and dead letters over the broker's limit "
                    "would stop the worker", ", ".join(topics), exc)
        return {}
    for topic in topics:
        limit = limits.get(topic)
        if limit is None:
            log.warning("the cluster gives no max.message.bytes for topic %s: answers and dead letters over the "
                        "broker's limit would stop the worker", topic)
            continue
        if limit < settings.max_record_bytes:
            log.warning("topic %s takes records of at most %d bytes (its max.message.bytes), less than the %d the "
                        "settings allow (MAAS_MAX_REQUEST_BYTES, MAAS_MAX_INLINE_OUTPUT_BYTES): larger %s go to S3",
                        topic, limit, settings.max_record_bytes,
                        "results" if topic == settings.topics.results else "dead letters")
        if topic == settings.topics.results and limit < settings.producer_max_batch_bytes:
            log.info("topic %s takes record batches of at most %d bytes (its max.message.bytes): answers to it go in "
                     "batches within that rather than the producer's %d bytes", topic, limit,
                     settings.producer_max_batch_bytes)
    return limits


async def stop_producer(producer: AIOKafkaProducer, timeout_s: float) -> int:
    """Close `producer` within `timeout_s`, delivering what it holds meanwhile; returns how many records it
    abandoned (logged, and 0 when every one was acknowledged).

    `producer.stop()` first waits for every queued record: with the broker gone, until each batch expires after
    request_timeout_ms (40 s), and with idempotence forever (its batches never expire). That outlasts a pod's
    termination grace period (30 s by default on Kubernetes), whose SIGKILL then ends the process halfway through
    its shutdown. What is not acknowledged when the deadline comes fails with KafkaTimeoutError for whoever awaits
    it, and the producer closes without it: every source acknowledges a request (commits its offset, deletes its
    message) only after its answer was acknowledged, so an abandoned answer's request is redelivered.
    """
    guard = min(ABANDON_GUARD_S, timeout_s / 2)
    abandoned, cut_short = 0, False
    try:
        async with asyncio.timeout(timeout_s - guard):
            await producer.flush()
    except TimeoutError:
        cut_short = True
        abandoned = _abandon_records(producer, KafkaTimeoutError(
            "abandoned: the broker had not acknowledged it when the producer's time to close ran out"))
        log.warning("closing the Kafka producer: %d record(s) the broker had not acknowledged when its %.1f s to close "
                    "ran out are abandoned (the request of an answer or dead letter among them was not acknowledged "
                    "to its source either, and is redelivered)", abandoned, timeout_s)
    try:
        async with asyncio.timeout(guard):
            sender = producer._sender.sender_task
            if cut_short and sender is not None:  # cancelled, it waits for the requests in flight, which fail once
                await producer.client.close()  # the connections are closed (stop() would cancel it again)
                await asyncio.wait([sender])
            await producer.stop()
    except asyncio.CancelledError:  # that of a sender task cancelled again, unless this task is being cancelled
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        await producer.client.close()
    except Exception as exc:  # its sender still waited for a request, or failed: closed all the same
        log.error("closing the Kafka producer failed (%r); its connections are closed", exc)
        await producer.client.close()
    return abandoned


def _abandon_records(producer: AIOKafkaProducer, error: KafkaError) -> int:
    """Fail every record `producer` holds, so that its stop() no longer waits for them; returns how many were not
    acknowledged yet.

    aiokafka has no way to close a producer without its records, so this works on its internals (aiokafka 0.14):
    the sender stops sending (its task, cancelled, only waits for the produce requests in flight), and the batches
    expire, so that a request in flight that fails is not retried (a retry would wait for metadata, which no one
    fetches once the client is closed), and fail.
    """
    sender, accumulator = producer._sender, producer._message_accumulator
    if sender.sender_task is not None:
        sender.sender_task.cancel()
    batches = [batch for queued in accumulator._batches.values() for batch in queued]
    batches += accumulator._pending_batches
    unacknowledged = sum(batch.record_count for batch in batches if not batch.future.done())
    for batch in batches:
        batch._ttl = 0
    accumulator.fail_all(error)
    for batch in batches:  # reported by the caller: asyncio need not log "exception was never retrieved" for each
        for future in [batch.future, *(future for future, _ in batch._msg_futures)]:
            if future.done() and not future.cancelled():
                future.exception()
    return unacknowledged


def claim_check_store(settings: Settings, s3: Any | None = None) -> ClaimCheckStore:
    """Claim checks under MAAS_CLAIM_CHECK_PREFIX in the allowed buckets, never in the batch jobs' inbox or outbox;
    results and oversized dead letters go to the batch bucket."""
    return ClaimCheckStore(s3 or aws_client(settings, "s3"), settings.allowed_buckets,
                           output_bucket=settings.batch_bucket, max_object_bytes=settings.max_claim_check_bytes,
                           bytes_in_flight=settings.claim_check_bytes_in_flight,
                           claim_prefix=settings.claim_check_prefix,
                           reserved_prefixes=(settings.batch_inbox_prefix, settings.batch_outbox_prefix))
