"""One typed settings object, read from the environment, with the embedded defaults.

Everything configurable lives here so that pointing the engine at real Kafka / AWS is configuration only.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from urllib.parse import urlsplit

_AWS_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


# What a yes/no setting takes, in any case; unset or empty means its default. models/cuda_graphs.py takes the same.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")

# Knobs read where they act, by kernels/ and models/, each time they are used (those modules import torch, which
# a CPU worker serving numpy twins never does, so their lists are not imported here). Checked once at start,
# so that a typo stops the worker with a message instead of failing its GPU batches one by one; a test holds
# these lists to what those modules accept.
ENGINE_KNOB_CHOICES: dict[str, tuple[str, ...]] = {
    "MAAS_KERNEL_BACKEND": ("auto", "triton", "torch"),
    "MAAS_AUTOTUNE_TIMING": ("quick", "full", "graph"),
    "MAAS_AUTOTUNE_UNSEEN": ("borrow", "tune"),
    "MAAS_LINEAR_TMA": ("auto", "1", "0"),
    "MAAS_LINEAR_TMA_SPLIT_K": ("0", "1", "auto"),
    "MAAS_LINEAR_SPLIT_K": ("auto", "1", "0"),
    "MAAS_LINEAR_GEMV": ("auto", "1", "0"),
    "MAAS_LINEAR_LAYER_NORM": ("auto", "1", "0"),
    "MAAS_COMPILE_WORKERS": ("threads", "processes"),
    "MAAS_CPU_RUNTIME": ("numpy", "torch"),
    "MAAS_PDL": ("auto", "off", "on"),
    "MAAS_ATTENTION_TMA": ("auto", "off", "on"),
    "MAAS_ATTENTION_PERSISTENT": ("off", "on", "auto"),
    "MAAS_CUDA_GRAPHS": TRUE_WORDS + FALSE_WORDS,
}


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and what to fix."""


def check_engine_knobs(env: Mapping[str, str]) -> None:
    """Raise ConfigError for a value of one of ``ENGINE_KNOB_CHOICES`` (or ``MAAS_COMPILE_THREADS``: auto or a
    whole number >= 1) that the module reading it would refuse; unset or empty means the default."""
    for name, choices in ENGINE_KNOB_CHOICES.items():
        value = env.get(name, "").strip().lower()
        if value and value not in choices:
            raise ConfigError(f"{name}={env[name]!r}: expected one of {', '.join(choices)}")
    threads = env.get("MAAS_COMPILE_THREADS", "").strip().lower()
    if threads and threads != "auto" and not (threads.isascii() and threads.isdigit() and int(threads) >= 1):
        raise ConfigError(f"MAAS_COMPILE_THREADS={env['MAAS_COMPILE_THREADS']!r}: expected auto or a whole "
                          "number >= 1")


# What aiokafka signs in with by username and password, and AWS_MSK_IAM (pipeline/msk_iam.py).
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "AWS_MSK_IAM")
# What a record may carry besides its value: a key (a request id, or a dead letter's key of up to 8 KiB), headers
# (tracing headers passed through, up to 16 KiB; a dead letter's original headers, up to 32 KiB, and its error) and
# the batch's framing.
RECORD_OVERHEAD_BYTES = 64 * 1024


def _check_bootstrap_servers(servers: str) -> None:
    for entry in (s.strip() for s in servers.split(",")):
        host, colon, port = entry.rpartition(":")
        if not colon:
            host, port = entry, "9092"
        if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"KAFKA_BOOTSTRAP_SERVERS={servers!r}: expected host[:port] entries separated by "
                              f"commas, got {entry!r}")


def _check_endpoint_url(url: str) -> None:
    """botocore raises a bare ValueError ("Invalid endpoint") for a URL without a scheme (`localhost:4566`), out of
    the first client made, far from the setting; the message leaves out the URL's user info."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is no number, or out of range
        valid = False
    if not valid:
        shown = url if "@" not in url else f"***@{url.rsplit('@', 1)[1]}"
        raise ConfigError(f"AWS_ENDPOINT_URL={shown!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    """A whole number in ASCII digits (int() would take "1_000" and "١٢٣" too) within [minimum, maximum]: the
    default maximum is what Kafka's and the C libraries' 32-bit fields take."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not (text.isascii() and text.removeprefix("-").isdigit()):
        raise ConfigError(f"{name}={raw!r} is not a whole number")
    value = int(text)
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={value} must be in {minimum}..{maximum:,}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """One of TRUE_WORDS or FALSE_WORDS, in any case (unset or empty: ``default``). Anything else is refused: a
    typo used to count silently as off for one setting and as on for the next."""
    raw = env.get(name)
    text = (raw or "").strip().lower()
    if not text:
        return default
    if text not in TRUE_WORDS + FALSE_WORDS:
        raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
    return text in TRUE_WORDS


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Topics:
    """The platform's own topics (MAAS_TOPIC_*): four different valid names."""

    requests: str = "maas.requests"
    results: str = "maas.results"
    metrics: str = "maas.metrics"
    dlq: str = "maas.dlq"

    def all(self) -> list[str]:
        return [self.requests, self.results, self.metrics, self.dlq]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Topics:
        """Refused at start, naming the variable: an empty or malformed name failed later, at the broker (an empty
        one went through to it), and results on the requests topic would be read back as requests."""
        names: dict[str, str] = {}
        for attribute in ("requests", "results", "metrics", "dlq"):
            variable = f"MAAS_TOPIC_{attribute.upper()}"
            name = env.get(variable) or getattr(cls, attribute)
            if not valid_topic_name(name):
                raise ConfigError(f"{variable}={name[:60]!r}: expected a Kafka topic name (1-249 letters, digits, '.', "
                                  "'_', '-'; not '.', '..' or an internal '__' topic)")
            if name in names.values():
                other = next(v for v, n in names.items() if n == name)
                raise ConfigError(f"{variable}={name!r}: the same topic as {other}; each needs its own")
            names[variable] = name
        return cls(*names.values())


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def valid_topic_name(name: object) -> bool:
    """A name Kafka takes for a topic, other than its own internal ones (`__consumer_offsets`, ...)."""
    return (isinstance(name, str) and _TOPIC_NAME.fullmatch(name) is not None and name not in (".", "..")
            and not name.startswith("__"))


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. `None` for Kafka / AWS endpoints means "start the embedded stack"."""

    kafka_bootstrap_servers: str | None = None
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    aws_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    aws_credentials_configured: bool = False
    model_repository: str = "model_repository"
    model_cache_dir: str | None = None
    model_cache_bytes: int = 4 << 30
    batch_bucket: str = "maas-batch"
    topics: Topics = field(default_factory=Topics)
    topic_partitions: int = 4
    consumer_group: str = "maas-workers"
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_request_bytes: int = 4 * 1024 * 1024
    max_in_flight: int = 4096
    max_fetch_records: int = 500
    max_running_batches: int = 8
    commit_interval_ms: int = 1000
    shutdown_timeout_s: int = 20
    rebalance_drain_s: int = 30
    kafka_session_timeout_ms: int = 10000
    kafka_request_timeout_ms: int = 40000
    kafka_heartbeat_interval_ms: int = 1000
    kafka_fetch_max_wait_ms: int = 10
    torch_threads: int = 0
    gil_switch_interval_us: int = 0
    gc_gen0_threshold: int = 50_000
    producer_max_batch_bytes: int = 256 * 1024
    kafka_idempotence: bool = False
    claim_check_buckets: frozenset[str] = frozenset()
    claim_check_prefix: str = "claims/"
    max_inline_output_bytes: int = 1024 * 1024
    max_claim_check_bytes: int = 64 * 1024 * 1024
    claim_check_bytes_in_flight: int = 4 * 64 * 1024 * 1024
    health_port: int = 0
    log_format: str = "text"
    api_keys: str = field(default="", repr=False)
    rate_limit: str = ""
    rate_limit_models: str = ""
    admin_tenants: frozenset[str] = frozenset()
    batch_inbox_prefix: str = "inbox/"
    batch_outbox_prefix: str = "outbox/"
    batch_queue: str = "maas-batch-events"
    sqs_requests_queue: str = "maas-requests"
    sqs_results_queue_url: str | None = None
    sqs_dlq_url: str | None = None
    partial_batch_response: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        check_engine_knobs(env)
        topics = Topics.from_env(env)
        protocol = (env.get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").strip().upper()  # empty: unset, as elsewhere
        if protocol not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
            raise ConfigError(
                f"KAFKA_SECURITY_PROTOCOL={protocol!r}: expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
            )
        mechanism = env.get("KAFKA_SASL_MECHANISM") or None
        if mechanism is not None and mechanism not in SASL_MECHANISMS:
            raise ConfigError(f"KAFKA_SASL_MECHANISM={mechanism!r}: expected one of {', '.join(SASL_MECHANISMS)}")
        servers = env.get("KAFKA_BOOTSTRAP_SERVERS") or None
        if servers is not None:
            _check_bootstrap_servers(servers)
        if endpoint := env.get("AWS_ENDPOINT_URL"):
            _check_endpoint_url(endpoint)
        max_claim_check = _int(env, "MAAS_MAX_CLAIM_CHECK_BYTES", 64 * 1024 * 1024, minimum=1024)
        settings = cls(
            kafka_bootstrap_servers=servers,
            kafka_security_protocol=protocol,
            kafka_sasl_mechanism=mechanism,
            kafka_sasl_username=env.get("KAFKA_SASL_USERNAME") or None,
            kafka_sasl_password=env.get("KAFKA_SASL_PASSWORD") or None,
            aws_endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            aws_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_credentials_configured=_choice(env, "MAAS_AWS", "auto", ("auto", "aws")) == "aws"
            or any(env.get(name) for name in _AWS_CREDENTIAL_VARS),
            model_repository=env.get("MAAS_MODEL_REPOSITORY") or "model_repository",
            model_cache_dir=env.get("MAAS_MODEL_CACHE_DIR") or None,
            model_cache_bytes=_int(env, "MAAS_MODEL_CACHE_BYTES", 4 << 30, minimum=1 << 20, maximum=1 << 50),
            batch_bucket=env.get("MAAS_BATCH_BUCKET") or "maas-batch",
            topics=topics,
            topic_partitions=_int(env, "MAAS_TOPIC_PARTITIONS", 4, minimum=1, maximum=10_000),
            consumer_group=env.get("MAAS_CONSUMER_GROUP") or "maas-workers",
            max_request_bytes=_int(env, "MAAS_MAX_REQUEST_BYTES", 4 * 1024 * 1024, minimum=1024),
            max_in_flight=_int(env, "MAAS_MAX_IN_FLIGHT", 4096, minimum=1, maximum=1_000_000),
            max_fetch_records=_int(env, "MAAS_MAX_FETCH_RECORDS", 500, minimum=1, maximum=100_000),
            max_running_batches=_int(env, "MAAS_MAX_RUNNING_BATCHES", 8, minimum=1, maximum=1024),
            commit_interval_ms=_int(env, "MAAS_COMMIT_INTERVAL_MS", 1000, minimum=10),
            shutdown_timeout_s=_int(env, "MAAS_SHUTDOWN_TIMEOUT_S", 20, minimum=1, maximum=3600),
            rebalance_drain_s=_int(env, "MAAS_REBALANCE_DRAIN_S", 30, minimum=0, maximum=3600),
            kafka_session_timeout_ms=_int(env, "MAAS_KAFKA_SESSION_TIMEOUT_MS", 10000, minimum=1000),
            kafka_request_timeout_ms=_int(env, "MAAS_KAFKA_REQUEST_TIMEOUT_MS", 40000, minimum=1000),
            kafka_heartbeat_interval_ms=_int(env, "MAAS_KAFKA_HEARTBEAT_INTERVAL_MS", 1000, minimum=100),
            kafka_fetch_max_wait_ms=_int(env, "MAAS_KAFKA_FETCH_MAX_WAIT_MS", 10, minimum=0),
            torch_threads=_int(env, "MAAS_TORCH_THREADS", 0, minimum=0, maximum=4096),
            gil_switch_interval_us=_int(env, "MAAS_GIL_SWITCH_INTERVAL_US", 0, minimum=0, maximum=1_000_000),
            gc_gen0_threshold=_int(env, "MAAS_GC_GEN0_THRESHOLD", 50_000, minimum=0),
            kafka_idempotence=_bool(env, "MAAS_KAFKA_IDEMPOTENCE", False),
            claim_check_buckets=frozenset(b.strip() for b in env.get("MAAS_CLAIM_CHECK_BUCKETS", "").split(",")
                                          if b.strip()),
            claim_check_prefix=env.get("MAAS_CLAIM_CHECK_PREFIX") or "claims/",
            max_inline_output_bytes=_int(env, "MAAS_MAX_INLINE_OUTPUT_BYTES", 1024 * 1024, minimum=1024),
            max_claim_check_bytes=max_claim_check,
            claim_check_bytes_in_flight=_int(env, "MAAS_CLAIM_CHECK_BYTES_IN_FLIGHT", 4 * max_claim_check,
                                             minimum=max_claim_check, maximum=1 << 50),
            health_port=_int(env, "MAAS_HEALTH_PORT", 0, minimum=0, maximum=65535),
            log_format=_choice(env, "MAAS_LOG_FORMAT", "text", ("text", "json")),
            api_keys=env.get("MAAS_API_KEYS", ""),
            rate_limit=env.get("MAAS_RATE_LIMIT", ""),
            rate_limit_models=env.get("MAAS_RATE_LIMIT_MODELS", ""),
            admin_tenants=frozenset(s.strip() for s in env.get("MAAS_ADMIN_TENANTS", "").split(",") if s.strip()),
            batch_inbox_prefix=env.get("MAAS_BATCH_INBOX_PREFIX") or "inbox/",
            batch_outbox_prefix=env.get("MAAS_BATCH_OUTBOX_PREFIX") or "outbox/",
            batch_queue=env.get("MAAS_BATCH_QUEUE") or "maas-batch-events",
            sqs_requests_queue=env.get("MAAS_SQS_REQUESTS_QUEUE") or "maas-requests",
            sqs_results_queue_url=env.get("MAAS_SQS_RESULTS_QUEUE_URL") or None,
            sqs_dlq_url=env.get("MAAS_SQS_DLQ_URL") or None,
            partial_batch_response=_bool(env, "MAAS_PARTIAL_BATCH_RESPONSE", True),
        )
        if worker_id := env.get("MAAS_WORKER_ID"):
            settings = replace(settings, worker_id=worker_id)
        return settings

    @property
    def embedded_kafka(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @property
    def embedded_aws(self) -> bool:
        """Real AWS is used when an endpoint, a credential variable or MAAS_AWS=aws says so. Not a profile
        file alone: a developer's ~/.aws/credentials must not send `make demo` to their account; nor an EC2
        instance role, which only a network call would find (MAAS_AWS=aws hands over to boto3's chain)."""
        return self.aws_endpoint_url is None and not self.aws_credentials_configured

    @property
    def max_record_bytes(self) -> int:
        """The largest Kafka record the platform produces: an answer with an inline result, or a dead letter
        holding a whole request, each with up to RECORD_OVERHEAD_BYTES of key and headers. Its producers take
        records this large, and the topics it creates take them (`max.message.bytes`)."""
        return max(1024 * 1024, max(self.max_request_bytes, self.max_inline_output_bytes) + RECORD_OVERHEAD_BYTES)

    @property
    def allowed_buckets(self) -> frozenset[str]:
        """Buckets that inputs_uri / output_uri may name: the configured ones, else the batch bucket."""
        return self.claim_check_buckets or frozenset({self.batch_bucket})

    def with_endpoints(self, bootstrap_servers: str | None, endpoint_url: str | None) -> Settings:
        return replace(
            self,
            kafka_bootstrap_servers=bootstrap_servers or self.kafka_bootstrap_servers,
            aws_endpoint_url=endpoint_url or self.aws_endpoint_url,
        )

    def kafka_client_kwargs(self) -> dict[str, object]:
        """Connection options shared by every aiokafka client."""
        if self.kafka_bootstrap_servers is None:
            raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set and no embedded broker was started")
        kwargs: dict[str, object] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol.startswith("SASL") and self.kafka_sasl_mechanism == "AWS_MSK_IAM":
            if self.kafka_security_protocol != "SASL_SSL":
                raise ConfigError("KAFKA_SASL_MECHANISM=AWS_MSK_IAM needs KAFKA_SECURITY_PROTOCOL=SASL_SSL")
            from pipeline.msk_iam import MskIamTokenProvider

            kwargs.update(sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=MskIamTokenProvider(self.aws_region))
        elif self.kafka_security_protocol.startswith("SASL"):
            if not (self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password):
                raise ConfigError(
                    "KAFKA_SECURITY_PROTOCOL is SASL_*: set KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME "
                    "and KAFKA_SASL_PASSWORD (or KAFKA_SASL_MECHANISM=AWS_MSK_IAM for MSK's IAM listener)"
                )
            kwargs.update(
                sasl_mechanism=self.kafka_sasl_mechanism,
                sasl_plain_username=self.kafka_sasl_username,
                sasl_plain_password=self.kafka_sasl_password,
            )
        if self.kafka_security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context()
        return kwargs

    def to_env(self) -> dict[str, str]:
        """The environment that `from_env` turns back into these settings (for child processes)."""
        env = {
            "KAFKA_SECURITY_PROTOCOL": self.kafka_security_protocol,
            "AWS_REGION": self.aws_region,
            "MAAS_AWS": "aws" if self.aws_credentials_configured else "auto",
            "MAAS_MODEL_REPOSITORY": self.model_repository,
            "MAAS_MODEL_CACHE_BYTES": str(self.model_cache_bytes),
            "MAAS_BATCH_BUCKET": self.batch_bucket,
            "MAAS_TOPIC_REQUESTS": self.topics.requests,
            "MAAS_TOPIC_RESULTS": self.topics.results,
            "MAAS_TOPIC_METRICS": self.topics.metrics,
            "MAAS_TOPIC_DLQ": self.topics.dlq,
            "MAAS_TOPIC_PARTITIONS": str(self.topic_partitions),
            "MAAS_CONSUMER_GROUP": self.consumer_group,
            "MAAS_MAX_REQUEST_BYTES": str(self.max_request_bytes),
            "MAAS_MAX_IN_FLIGHT": str(self.max_in_flight),
            "MAAS_MAX_FETCH_RECORDS": str(self.max_fetch_records),
            "MAAS_MAX_RUNNING_BATCHES": str(self.max_running_batches),
            "MAAS_COMMIT_INTERVAL_MS": str(self.commit_interval_ms),
            "MAAS_SHUTDOWN_TIMEOUT_S": str(self.shutdown_timeout_s),
            "MAAS_REBALANCE_DRAIN_S": str(self.rebalance_drain_s),
            "MAAS_KAFKA_SESSION_TIMEOUT_MS": str(self.kafka_session_timeout_ms),
            "MAAS_KAFKA_REQUEST_TIMEOUT_MS": str(self.kafka_request_timeout_ms),
            "MAAS_KAFKA_HEARTBEAT_INTERVAL_MS": str(self.kafka_heartbeat_interval_ms),
            "MAAS_KAFKA_FETCH_MAX_WAIT_MS": str(self.kafka_fetch_max_wait_ms),
            "MAAS_TORCH_THREADS": str(self.torch_threads),
            "MAAS_GIL_SWITCH_INTERVAL_US": str(self.gil_switch_interval_us),
            "MAAS_GC_GEN0_THRESHOLD": str(self.gc_gen0_threshold),
            "MAAS_KAFKA_IDEMPOTENCE": "1" if self.kafka_idempotence else "0",
            "MAAS_CLAIM_CHECK_BUCKETS": ",".join(sorted(self.claim_check_buckets)),
            "MAAS_CLAIM_CHECK_PREFIX": self.claim_check_prefix,
            "MAAS_MAX_INLINE_OUTPUT_BYTES": str(self.max_inline_output_bytes),
            "MAAS_MAX_CLAIM_CHECK_BYTES": str(self.max_claim_check_bytes),
            "MAAS_CLAIM_CHECK_BYTES_IN_FLIGHT": str(self.claim_check_bytes_in_flight),
            "MAAS_HEALTH_PORT": str(self.health_port),
            "MAAS_LOG_FORMAT": self.log_format,
            "MAAS_RATE_LIMIT": self.rate_limit,
            "MAAS_RATE_LIMIT_MODELS": self.rate_limit_models,
            "MAAS_ADMIN_TENANTS": ",".join(sorted(self.admin_tenants)),
            "MAAS_BATCH_INBOX_PREFIX": self.batch_inbox_prefix,
            "MAAS_BATCH_OUTBOX_PREFIX": self.batch_outbox_prefix,
            "MAAS_BATCH_QUEUE": self.batch_queue,
            "MAAS_SQS_REQUESTS_QUEUE": self.sqs_requests_queue,
            "MAAS_PARTIAL_BATCH_RESPONSE": "1" if self.partial_batch_response else "0",
        }
        optional = {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
            "KAFKA_SASL_USERNAME": self.kafka_sasl_username,
            "KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
            "AWS_ENDPOINT_URL": self.aws_endpoint_url,
            "MAAS_API_KEYS": self.api_keys,
            "MAAS_MODEL_CACHE_DIR": self.model_cache_dir,
            "MAAS_SQS_RESULTS_QUEUE_URL": self.sqs_results_queue_url,
            "MAAS_SQS_DLQ_URL": self.sqs_dlq_url,
        }
        return {**env, **{k: v for k, v in optional.items() if v}}

    def describe(self) -> dict[str, object]:
        """Settings safe to print or log: secrets are left out."""
        hidden = {"kafka_sasl_password", "api_keys"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
