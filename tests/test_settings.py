"""The engine knobs that kernels/ and models/ read for themselves are checked at start by Settings.from_env:
the lists there must be what those modules accept."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch

from kernels import _autotune, dispatch
from kernels.offline import compile_for
from models import cuda_graphs, numpy_models
from pipeline.settings import ENGINE_KNOB_CHOICES, ConfigError, Settings

linear_module = importlib.import_module("kernels.linear")  # `kernels.linear` is the op
layer_norm_module = importlib.import_module("kernels.linear_layer_norm")  # so is `kernels.linear_layer_norm`
attention_module = importlib.import_module("kernels.attention")  # and `kernels.attention`


def _accepts(reader, name: str, value: str, monkeypatch) -> bool:
    monkeypatch.setenv(name, value)
    try:
        reader()
    except ValueError:
        return False
    return True


def _unseen_shapes() -> bool:
    with _autotune.tuned_shapes_only():  # read only inside a warm model's batch
        return _autotune.borrowing()


def _pdl_options() -> dict[str, bool]:
    with mock.patch.object(dispatch, "INTERPRETER", False), compile_for(90):  # the interpreter never reads it
        return dispatch.pdl(torch.zeros(1))


READERS = {
    "MAAS_KERNEL_BACKEND": lambda: dispatch.backend_for(),
    "MAAS_AUTOTUNE_TIMING": _autotune._timing_options,
    "MAAS_AUTOTUNE_UNSEEN": _unseen_shapes,
    "MAAS_LINEAR_TMA": lambda: linear_module._setting("MAAS_LINEAR_TMA"),
    "MAAS_LINEAR_TMA_SPLIT_K": lambda: linear_module._setting("MAAS_LINEAR_TMA_SPLIT_K"),
    "MAAS_LINEAR_SPLIT_K": lambda: linear_module._setting("MAAS_LINEAR_SPLIT_K"),
    "MAAS_LINEAR_GEMV": lambda: linear_module._setting("MAAS_LINEAR_GEMV"),
    "MAAS_LINEAR_LAYER_NORM": lambda: layer_norm_module.use_fused(torch.zeros(1, 8), torch.zeros(8, 8)),
    "MAAS_CPU_RUNTIME": numpy_models.cpu_runtime,
    "MAAS_COMPILE_THREADS": lambda: _autotune.compile_threads(4),
    "MAAS_COMPILE_WORKERS": _autotune.compile_workers,
    "MAAS_PDL": _pdl_options,
    "MAAS_ATTENTION_TMA": lambda: attention_module._setting("MAAS_ATTENTION_TMA"),
    "MAAS_ATTENTION_PERSISTENT": lambda: attention_module._setting("MAAS_ATTENTION_PERSISTENT"),
    "MAAS_CUDA_GRAPHS": cuda_graphs.enabled,
}


def test_every_knob_checked_at_start_has_its_reader_here():
    assert set(ENGINE_KNOB_CHOICES) <= set(READERS)


@pytest.mark.parametrize("name", sorted(READERS))
def test_the_start_check_accepts_what_the_module_accepts(name, monkeypatch):
    values = [*ENGINE_KNOB_CHOICES.get(name, ("auto", "1", "12")), " Mixed ", "", "0", "-1", "guess", "2.5"]
    for value in values:
        module_ok = _accepts(READERS[name], name, value, monkeypatch)
        try:
            Settings.from_env({name: value})
            start_ok = True
        except ConfigError as exc:
            start_ok = False
            assert name in str(exc) and "expected" in str(exc)
        assert start_ok == module_ok, (name, value, start_ok, module_ok)


def test_a_typo_stops_the_worker_at_start_with_what_was_expected():
    with pytest.raises(ConfigError, match="MAAS_AUTOTUNE_UNSEEN='borow': expected one of borrow, tune"):
        Settings.from_env({"MAAS_AUTOTUNE_UNSEEN": "borow"})


def test_a_pdl_typo_stops_the_worker_at_start_not_at_its_first_gpu_launch():
    with pytest.raises(ConfigError, match="MAAS_PDL='1': expected one of auto, off, on"):
        Settings.from_env({"MAAS_PDL": "1"})


YES_NO = {"MAAS_KAFKA_IDEMPOTENCE": ("kafka_idempotence", False),
          "MAAS_PARTIAL_BATCH_RESPONSE": ("partial_batch_response", True)}


@pytest.mark.parametrize("name", [*YES_NO, "MAAS_CUDA_GRAPHS"])
@pytest.mark.parametrize("value", ["2", "enabled", "y", "-1", "tru"])
def test_a_yes_no_setting_refuses_other_values_naming_the_variable(name, value):
    """Neither silently on (a typo of MAAS_PARTIAL_BATCH_RESPONSE or MAAS_CUDA_GRAPHS) nor off (one of
    MAAS_KAFKA_IDEMPOTENCE)."""
    with pytest.raises(ConfigError, match=rf"{name}='{value}': expected one of 1, true, yes, on, 0, false, no, off"):
        Settings.from_env({name: value})


@pytest.mark.parametrize("name", sorted(YES_NO))
def test_a_yes_no_setting_takes_the_documented_words_in_any_case(name):
    attribute, default = YES_NO[name]
    for value, expected in [("1", True), ("TRUE", True), (" yes ", True), ("On", True), ("0", False),
                            ("False", False), ("NO", False), ("off", False), ("", default), (" ", default)]:
        assert getattr(Settings.from_env({name: value}), attribute) is expected, (name, value)
    settings = Settings.from_env({name: "off" if default else "on"})
    assert getattr(Settings.from_env(settings.to_env()), attribute) is not default
    assert getattr(Settings.from_env({}), attribute) is default


async def test_msk_iam_signs_a_token_from_the_aws_credential_chain(monkeypatch):
    """MSK's IAM listener takes an OAUTHBEARER token: a SigV4-signed kafka-cluster:Connect URL made from the
    process's AWS credentials (here from the environment, signed locally) by AWS's signer library."""
    import base64
    from urllib.parse import parse_qs, urlparse

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "b-1.msk.example:9098", "AWS_REGION": "eu-west-1",
                                  "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "AWS_MSK_IAM"})
    kwargs = settings.kafka_client_kwargs()
    assert kwargs["sasl_mechanism"] == "OAUTHBEARER" and "sasl_plain_password" not in kwargs
    token = await kwargs["sasl_oauth_token_provider"].token()
    url = urlparse(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    query = parse_qs(url.query)
    assert url.hostname == "kafka.eu-west-1.amazonaws.com" and query["Action"] == ["kafka-cluster:Connect"]
    assert query["X-Amz-Credential"][0].startswith("AKIDEXAMPLE/") and query["X-Amz-Signature"][0]
    plain = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "b:9098", "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                               "KAFKA_SASL_MECHANISM": "AWS_MSK_IAM"})
    with pytest.raises(ConfigError, match="AWS_MSK_IAM needs KAFKA_SECURITY_PROTOCOL=SASL_SSL"):
        plain.kafka_client_kwargs()


@pytest.mark.parametrize(("env", "fragment"), [
    ({"MAAS_MAX_IN_FLIGHT": "1_000"}, "MAAS_MAX_IN_FLIGHT='1_000' is not a whole number"),
    ({"MAAS_MAX_IN_FLIGHT": "\u0661\u0662"}, "is not a whole number"),
    ({"MAAS_MAX_IN_FLIGHT": "--5"}, "MAAS_MAX_IN_FLIGHT='--5' is not a whole number"),
    ({"MAAS_TORCH_THREADS": "99999999999"}, r"MAAS_TORCH_THREADS=99999999999 must be in 0\.\.4,096"),
    ({"MAAS_GC_GEN0_THRESHOLD": "99999999999"}, "must be in 0..2,147,483,647"),
    ({"MAAS_HEALTH_PORT": "99999"}, "MAAS_HEALTH_PORT=99999 must be in 0..65,535"),
    ({"MAAS_KAFKA_SESSION_TIMEOUT_MS": "99999999999"}, "MAAS_KAFKA_SESSION_TIMEOUT_MS"),
    ({"MAAS_SHUTDOWN_TIMEOUT_S": "0"}, "MAAS_SHUTDOWN_TIMEOUT_S=0 must be in 1..3,600"),
    ({"MAAS_REBALANCE_DRAIN_S": "-1"}, "MAAS_REBALANCE_DRAIN_S"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "host:abc"}, "expected host\\[:port\\] entries"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:9092,,b:9092"}, "got ''"),
    ({"KAFKA_BOOTSTRAP_SERVERS": ":9092"}, "got ':9092'"),
    ({"KAFKA_SASL_MECHANISM": "BOGUS"}, "KAFKA_SASL_MECHANISM='BOGUS': expected one of PLAIN"),
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL='TLS': expected PLAINTEXT, SSL"),
    ({"AWS_ENDPOINT_URL": "localhost:4566"}, r"AWS_ENDPOINT_URL='localhost:4566': expected http://HOST\[:PORT\]"),
    ({"AWS_ENDPOINT_URL": "None"}, "AWS_ENDPOINT_URL='None': expected"),
    ({"AWS_ENDPOINT_URL": "ftp://host"}, "AWS_ENDPOINT_URL='ftp://host': expected"),
    ({"AWS_ENDPOINT_URL": "http://host:port"}, "AWS_ENDPOINT_URL='http://host:port': expected"),
    ({"AWS_ENDPOINT_URL": "admin:hunter2@host:4566"}, "AWS_ENDPOINT_URL='\\*\\*\\*@host:4566': expected"),
    ({"MAAS_TOPIC_RESULTS": "team results"}, "MAAS_TOPIC_RESULTS='team results': expected a Kafka topic name"),
    ({"MAAS_TOPIC_DLQ": "__consumer_offsets"}, "MAAS_TOPIC_DLQ='__consumer_offsets': expected a Kafka topic"),
    ({"MAAS_TOPIC_METRICS": "m" * 250}, "MAAS_TOPIC_METRICS='m{60}': expected"),
    ({"MAAS_TOPIC_RESULTS": "maas.requests"}, "MAAS_TOPIC_RESULTS='maas.requests': the same topic as "
                                              "MAAS_TOPIC_REQUESTS"),
])
def test_environment_values_out_of_bounds_are_named(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Settings.from_env(env)


def test_environment_values_within_bounds_are_taken():
    settings = Settings.from_env({"MAAS_MAX_IN_FLIGHT": " 12 ", "KAFKA_BOOTSTRAP_SERVERS": "a:9092,b,[::1]:9093",
                                  "MAAS_MODEL_CACHE_BYTES": str(8 << 30), "MAAS_SHUTDOWN_TIMEOUT_S": "25",
                                  "MAAS_REBALANCE_DRAIN_S": "90"})
    assert settings.max_in_flight == 12 and settings.model_cache_bytes == 8 << 30
    assert settings.shutdown_timeout_s == 25 and Settings.from_env(settings.to_env()).shutdown_timeout_s == 25
    assert Settings.from_env(settings.to_env()).rebalance_drain_s == 90
    assert Settings.from_env({}).shutdown_timeout_s == 20  # below Kubernetes' default grace period of 30 s
    topics = Settings.from_env({"MAAS_TOPIC_REQUESTS": "", "MAAS_TOPIC_DLQ": "team-a.dlq"}).topics
    assert topics.all() == ["maas.requests", "maas.results", "maas.metrics", "team-a.dlq"]  # empty: the default
    assert Settings.from_env({"KAFKA_SECURITY_PROTOCOL": ""}).kafka_security_protocol == "PLAINTEXT"  # as unset
    assert Settings.from_env({"KAFKA_SECURITY_PROTOCOL": " sasl_ssl "}).kafka_security_protocol == "SASL_SSL"


def test_real_aws_is_chosen_by_a_variable_not_by_a_profile_file(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = x\n")
    home = {"HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    assert Settings.from_env(home).embedded_aws  # `make demo` on a developer's machine stays local
    assert not Settings.from_env({**home, "AWS_PROFILE": "default"}).embedded_aws
    assert not Settings.from_env({"MAAS_AWS": "aws"}).embedded_aws  # an EC2 instance role: boto3's chain
    with pytest.raises(ConfigError, match="MAAS_AWS='yes'"):
        Settings.from_env({"MAAS_AWS": "yes"})


async def test_bootstrap_creates_the_bucket_in_a_region_other_than_us_east_1(live):
    from dataclasses import replace

    from pipeline.services import aws_client, bootstrap

    elsewhere = replace(live, aws_region="eu-west-1", batch_bucket=f"{live.batch_bucket}-eu")
    await bootstrap(elsewhere)
    await bootstrap(elsewhere)  # already there: nothing to do
    location = aws_client(elsewhere, "s3").get_bucket_location(Bucket=elsewhere.batch_bucket)
    assert location["LocationConstraint"] == "eu-west-1"
