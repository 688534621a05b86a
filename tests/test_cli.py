"""The `maas` command as a newcomer runs it: help, one-line configuration errors, models, the demo."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import orjson
import pytest
from botocore.exceptions import ClientError
from worker_support import maas_up_recorded

from infra.stack import free_port
from models.cache import ModelCache
from pipeline.batch_jobs import SOURCE_ETAG, BatchConfig, BatchJobRunner
from pipeline.client import example_requests
from pipeline.engine import InferenceEngine
from pipeline.services import aws_client


def maas(*args: str, env: dict[str, str] | None = None, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "MAAS_", "AWS_"))}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env={**base, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands():
    out = maas("--help")
    assert out.returncode == 0
    for command in ("up", "worker", "submit", "demo", "models"):
        assert command in out.stdout


@pytest.mark.parametrize("args", [["-v", "models", "list"], ["models", "list", "-v"], ["models", "-v", "list"],
                                  ["--verbose", "models", "list"], ["models", "list", "--verbose"]])
def test_verbose_goes_before_or_after_the_command(args, tmp_path):
    """`maas worker -v` ended in "unrecognized arguments: -v": only `maas -v worker` was taken, though `--help`
    goes after the command."""
    out = maas(*args, env={"MAAS_MODEL_REPOSITORY": str(tmp_path / "repo")}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_verbose_is_off_unless_given_somewhere():
    from pipeline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["worker", "-v"]).verbose is True
    assert parser.parse_args(["-v", "batch", "submit", "f.jsonl"]).verbose is True
    assert parser.parse_args(["batch", "submit", "f.jsonl", "-v"]).verbose is True
    assert parser.parse_args(["worker"]).verbose is False
    assert parser.parse_args(["models", "describe", "m", "--version", "2"]).verbose is False


@pytest.mark.parametrize(("argv", "ours", "aiokafka", "others"), [
    (["worker"], logging.WARNING, logging.CRITICAL, logging.WARNING),
    (["worker", "-v"], logging.INFO, logging.WARNING, logging.INFO),
])
def test_verbose_shows_our_info_lines_and_no_librarys_debug_lines(argv, ours, aiokafka, others, restore_logging):
    """`-v` is for the worker's own INFO lines. A library at DEBUG under it would bury them, during a broker
    outage, under aiokafka's connection retries; aiokafka stays at WARNING (its connection errors show, as ERROR
    lines), and is silent without `-v`."""
    from pipeline.cli import build_parser
    from pipeline.observability import configure_logging

    configure_logging(build_parser().parse_args(argv).verbose)
    assert logging.getLogger("pipeline.kafka_worker").getEffectiveLevel() == ours
    assert logging.getLogger("aiokafka.conn").getEffectiveLevel() == aiokafka
    for name in ("kafka", "botocore", "boto3", "urllib3", "s3transfer", "aiohttp.access"):
        assert logging.getLogger(name).getEffectiveLevel() == others, name


def test_submit_without_a_broker_says_what_to_set(tmp_path):
    out = maas("submit", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "maas: error: no broker to submit to: set KAFKA_BOOTSTRAP_SERVERS, or run `maas up` in this folder"
    ]


@pytest.mark.parametrize("command", [["worker"], ["submit", "--count", "1"]])
def test_an_unreachable_broker_names_the_address_and_setting(tmp_path, command):
    address = f"127.0.0.1:{free_port()}"
    out = maas(*command, env={"KAFKA_BOOTSTRAP_SERVERS": address, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
               cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"maas: error: cannot reach Kafka at {address} "
                                                   "(KAFKA_BOOTSTRAP_SERVERS)")


@pytest.mark.parametrize("command", [["worker"], ["submit", "--count", "1"]])
def test_a_stack_that_maas_up_recorded_but_no_longer_answers_is_named(tmp_path, command):
    """With `maas up` alive but its stack not answering, the error named KAFKA_BOOTSTRAP_SERVERS, which the user
    never set (`maas submit`: "cannot reach Kafka at the broker"), and not where the address came from."""
    address = f"127.0.0.1:{free_port()}"
    with maas_up_recorded(tmp_path, address, f"http://127.0.0.1:{free_port()}"):
        out = maas(*command, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"maas: error: cannot reach Kafka at {address} ")
    assert lines[0].endswith(f"the address is that of the stack `maas up` (pid {os.getpid()}) recorded in "
                             ".maas/stack.json: if it has stopped answering, stop that `maas up` and start it again")


def test_a_reader_that_stops_early_ends_the_output_quietly(tmp_path):
    repo = str(tmp_path / "repo")
    assert maas("models", "examples", env={"MAAS_MODEL_REPOSITORY": repo}).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "MAAS_", "AWS_"))}
    # `true` has exited before maas writes a byte: every write meets a closed pipe
    done = subprocess.run(f"{sys.executable} -m pipeline models describe mnist_mlp | true; echo ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", env={**env, "MAAS_MODEL_REPOSITORY": repo},
                          capture_output=True, text=True, timeout=120)
    assert done.stderr == "" and done.stdout.strip() == "0"


def test_bad_setting_is_named(tmp_path):
    out = maas("models", "list", env={"MAAS_MAX_IN_FLIGHT": "lots"}, cwd=tmp_path)
    assert out.returncode == 2 and "MAAS_MAX_IN_FLIGHT='lots' is not a whole number" in out.stderr


def test_batch_worker_refuses_an_outbox_inside_the_inbox_at_once(tmp_path):
    """Checked before any broker, bucket or model is touched (both are unreachable here), in one line."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
           "MAAS_BATCH_INBOX_PREFIX": "jobs/", "MAAS_BATCH_OUTBOX_PREFIX": "jobs/results/"}
    out = maas("batch", "worker", env=env, cwd=tmp_path, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("maas: error: MAAS_BATCH_INBOX_PREFIX='jobs/' and "
                               "MAAS_BATCH_OUTBOX_PREFIX='jobs/results/' overlap")


@pytest.mark.parametrize("command", ["serve", "models"])
def test_an_s3_model_repository_with_no_store_to_reach_is_refused_naming_what_to_set(command, tmp_path):
    """No AWS_ENDPOINT_URL, no AWS credentials and no `maas up` here: the store would be AWS itself, asked with the
    embedded stack's dummy keys (a connection error on a machine without a route there, InvalidAccessKeyId with
    one), and `maas serve` started anyway and answered every request 503."""
    args = ["serve", "--port", "0"] if command == "serve" else ["models", "list"]
    out = maas(*args, env={"MAAS_MODEL_REPOSITORY": "s3://maas-models/zoo"}, cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == (
        "maas: error: MAAS_MODEL_REPOSITORY s3://maas-models/zoo is on S3, but AWS_ENDPOINT_URL is unset, no AWS "
        "credentials are configured and no `maas up` runs in this folder: start `maas up` here, or point "
        "AWS_ENDPOINT_URL (or AWS credentials) at the store")


@pytest.mark.parametrize("args, env", [
    (["bootstrap"], {}),  # S3 unreachable while creating the batch bucket
    (["models", "list"], {"MAAS_MODEL_REPOSITORY": "s3://bucket/models"}),  # the repository unreachable
], ids=["bootstrap", "models-list"])
def test_credentials_in_an_endpoint_url_never_reach_the_terminal(args, env, stack, tmp_path):
    secret_endpoint = {"AWS_ENDPOINT_URL": "http://admin:hunter2@127.0.0.1:1", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers}
    out = maas("-v", *args, env={**secret_endpoint, **env}, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "hunter2" not in out.stdout + out.stderr
    assert "http://***@127.0.0.1:1" in out.stderr, out.stderr  # the endpoint is still named, without its password


def test_models_examples_list_and_describe(tmp_path):
    env = {"MAAS_MODEL_REPOSITORY": str(tmp_path / "repo")}
    empty = maas("models", "list", env=env)
    assert (empty.returncode, empty.stdout) == (0, "")
    assert empty.stderr.startswith(f"no models in {tmp_path / 'repo'} (MAAS_MODEL_REPOSITORY)"), empty.stderr
    assert "published mnist_mlp v1" in maas("models", "examples", env=env).stdout
    assert maas("models", "list", env=env).stdout.startswith("mnist_mlp\tversions [1]")
    described = json.loads(maas("models", "describe", "mnist_mlp", env=env).stdout)
    assert described["version"] == 1 and described["architecture"] == "mlp"
    out = maas("models", "describe", "nope", env=env)
    assert out.returncode == 2 and "model 'nope' is not in the repository" in out.stderr


def test_models_tune_on_a_machine_without_a_gpu_says_why_it_cannot(tmp_path):
    out = maas("models", "tune", "mnist_mlp", "--output", str(tmp_path / "table.json"),
               env={"MAAS_MODEL_REPOSITORY": str(tmp_path / "repo")})
    assert out.returncode == 2 and not (tmp_path / "table.json").exists()
    assert out.stderr.strip() == ("maas: error: no CUDA GPU here: `models tune` times kernels on the GPU model the "
                                  "workers will run on")


def test_models_precompile_says_what_is_missing(tmp_path):
    """Each refusal in one line: a GPU model without a table (naming those shipped), a table recording no binaries,
    the Triton interpreter switched on. (Precompiling itself: ``tests/kernels/test_kernels_compile.py``.)"""
    compiler = {"TRITON_INTERPRET": "0"}
    out = maas("models", "precompile", "--gpu", "NVIDIA Z100", env=compiler)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("maas: error: no tuning table at ") and "nvidia-z100.json" in out.stderr
    assert "tables shipped for: nvidia-h100-80gb-hbm3" in out.stderr
    picks_only = tmp_path / "picks.json"
    picks_only.write_text(json.dumps({"device": "NVIDIA Z100", "autotuners": {}, "choices": {}}))
    out = maas("models", "precompile", "--table", str(picks_only), env=compiler)
    assert out.returncode == 2 and f"tuning table {picks_only} lists no kernel binaries" in out.stderr, out.stderr
    out = maas("models", "precompile", "--table", str(picks_only), env={"TRITON_INTERPRET": "1"})
    assert out.returncode == 2 and "TRITON_INTERPRET is set" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_embedded_stack(tmp_path):
    out = maas("demo", "--requests", "60", "--show", "3", cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "answered 60/60 (60 results)" in out.stdout
    accuracy = float(out.stdout.split("accuracy ")[1].split("%")[0])
    assert accuracy > 90
    assert "requests/s end to end over Kafka" in out.stdout


@pytest.mark.parametrize("encoding", [[], ["--binary"]], ids=["json", "binary"])
async def test_submit_prints_answers_in_either_encoding(live, encoding, tmp_path):
    import asyncio

    from worker_support import running_worker

    env = {**live.to_env(), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    async with running_worker(live):
        out = await asyncio.to_thread(maas, "submit", "--count", "5", *encoding, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("submit-")]
    assert len(lines) == 5 and all('result v1 {"probabilities": [' in line for line in lines)
    assert "5/5 answered" in out.stdout


async def test_submit_with_no_worker_asks_whether_one_runs(live, tmp_path):
    """With no worker on the broker (one started in another folder serves a private stack) `maas submit` printed
    "no answer within the timeout" per request and nothing on why."""
    import asyncio

    env = {**live.to_env(), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    out = await asyncio.to_thread(maas, "submit", "--count", "2", "--timeout", "1.5", env=env, cwd=tmp_path)
    assert out.returncode == 1 and "0/2 answered" in out.stdout, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        f"no answer within 1.5s: is `maas worker` running on {live.kafka_bootstrap_servers} (started in this "
        "folder, or with the same KAFKA_BOOTSTRAP_SERVERS)?"]


@pytest.mark.parametrize(("args", "fragment"), [
    (("submit", "--count", "0"), "argument --count: expected a whole number >= 1, got '0'"),
    (("submit", "--timeout", "nan"), "argument --timeout: expected a number of seconds > 0"),
    (("demo", "--requests", "-3"), "argument --requests: expected a whole number >= 1"),
    (("serve", "--port", "70000"), "argument --port: expected a port in 0..65535"),
    (("worker", "--health-port", "-1"), "argument --health-port: expected a port in 0..65535"),
    (("batch", "worker", "--wait", "-5"), "argument --wait: expected a whole number in 0..20, got '-5'"),
    (("batch", "worker", "--wait", "21"), "argument --wait: expected a whole number in 0..20, got '21'"),
    (("batch", "submit", "f.jsonl", "--timeout", "nan"), "argument --timeout: expected a number of seconds > 0"),
    (("batch", "submit", "f.jsonl", "--poll", "-1"), "argument --poll: expected a number of seconds > 0"),
    (("batch", "submit", "f.jsonl", "--poll", "0"), "argument --poll: expected a number of seconds > 0"),
])
def test_bad_arguments_are_one_line_errors(args, fragment, tmp_path):
    out = maas(*args, cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr


def test_submit_of_an_unreadable_file_and_against_an_unreachable_broker_is_one_line(tmp_path):
    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    (tmp_path / "latin1.json").write_bytes(b'{"id": "caf\xe9"}')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "ok.json").write_text('{"id": "r1", "model_name": "mnist_mlp", "inputs": []}')
    (tmp_path / "twice.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n')  # "1/2 answered", exit 1
    for name, fragment in (("missing.json", "cannot read it"), (".", "cannot read it"),
                           ("latin1.json", "cannot read it"), ("empty.jsonl", "holds no request"),
                           ("twice.jsonl", "request 3 has the id 'a' of an earlier one"),
                           ("ok.json", "KafkaConnectionError")):
        out = maas("submit", name, env=env, cwd=tmp_path, timeout=90)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and fragment in lines[0], (name, out.stderr[-2000:])


def test_a_second_maas_up_in_one_folder_is_refused(tmp_path):
    with maas_up_recorded(tmp_path, "127.0.0.1:1", "http://127.0.0.1:1"):
        out = maas("up", cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and f"a local stack is already up here (pid {os.getpid()}" in out.stderr
    assert (tmp_path / ".maas" / "stack.json").exists()  # the running stack's file stays


def test_a_maas_up_started_while_another_is_still_starting_is_refused(tmp_path):
    """Two `maas up` started together both found no state file, both started a stack, and the second's file
    replaced the first's; the lock a starting `maas up` holds (taken here as it would take it) refuses the second."""
    (tmp_path / ".maas").mkdir()
    with open(tmp_path / ".maas" / "stack.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = maas("up", cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == ("maas: error: another `maas up` is starting a local stack here; stop it first, or "
                                  "run `maas up` in another folder")
    assert not (tmp_path / ".maas" / "stack.json").exists()


async def test_batch_submit_says_once_when_no_worker_reports_on_its_job(live, tmp_path, monkeypatch, capsys):
    """With no `maas batch worker`, `submit` said nothing until its timeout ran out: an hour by default."""
    import argparse

    from pipeline.commands import batch as batch_command

    monkeypatch.setattr(batch_command, "UNCLAIMED_HINT_S", 0.3)
    path = tmp_path / "lonely.jsonl"
    path.write_bytes(orjson.dumps(example_requests(1, prefix="lonely")[0][0], option=orjson.OPT_SERIALIZE_NUMPY))
    args = argparse.Namespace(file=str(path), job=None, output=None, timeout=1.5, poll=0.1)
    assert await batch_command.cmd_submit(args, live) == 1
    err = capsys.readouterr().err
    inbox = f"s3://{live.batch_bucket}/{BatchConfig.from_settings(live).inbox_prefix}"
    hint = f"no worker has reported on the job after 0s: is `maas batch worker` running on {inbox}? (still waiting, "
    assert err.count(hint + "up to --timeout)") == 1, err
    assert err.rstrip().endswith("no summary within 2s: is `maas batch worker` running?"), err


async def test_batch_submit_downloads_only_the_results_of_its_own_upload(live, repository, tmp_path):
    """The results object says which upload it comes from (source-etag). A run of another upload of the same job
    may have written it after the summary `submit` waited for: then nothing is downloaded, and the exit is 1."""
    import asyncio

    config = BatchConfig.from_settings(live)
    s3 = aws_client(live, "s3")
    requests, _ = example_requests(3, prefix="submit")
    path = tmp_path / "jobs" / "mine.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in requests))
    env = {**live.to_env(), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}

    async def submitted(job: str) -> tuple[asyncio.Task, str]:
        """`maas batch submit` under way, and the ETag of its upload once it is there."""
        submitting = asyncio.create_task(asyncio.to_thread(
            maas, "batch", "submit", str(path), "--job", job, "--poll", "0.1", "--timeout", "120", env=env,
            cwd=tmp_path))
        while not submitting.done():
            try:
                head = await asyncio.to_thread(s3.head_object, Bucket=config.bucket, Key=config.inbox_key(job))
                return submitting, head["ETag"].strip('"')
            except ClientError:
                await asyncio.sleep(0.1)
        raise AssertionError(submitting.result().stderr)

    submitting, etag = await submitted("own")
    async with InferenceEngine(ModelCache(repository), worker_id="cli-test") as engine:
        runner = BatchJobRunner(engine, s3, config, max_request_bytes=live.max_request_bytes)
        assert (await runner.run(config.bucket, config.inbox_key("own")))["source"]["etag"] == etag
    out = await submitting
    assert out.returncode == 0, out.stderr
    assert len((path.parent / "own.results.jsonl").read_bytes().splitlines()) == 3

    submitting, etag = await submitted("foreign")
    s3.put_object(Bucket=config.bucket, Key=config.results_key("foreign"), Body=b'{"id": "not yours"}\n',
                  Metadata={SOURCE_ETAG: "0" * 32})
    s3.put_object(Bucket=config.bucket, Key=config.summary_key("foreign"), Metadata={SOURCE_ETAG: etag},
                  Body=orjson.dumps({"lines": 3, "throughput_lines_per_s": 1.0}))
    out = await submitting
    assert out.returncode == 1 and "holds the results of another upload of job 'foreign'" in out.stderr, out.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == ["mine.jsonl", "own.results.jsonl"]


def _spawn_maas(*args: str, env: dict[str, str], cwd) -> tuple[subprocess.Popen, list[str]]:
    """`maas ARGS` running in the background; its output lines are collected as they come."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "MAAS_", "AWS_"))}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env={**base, **env}, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def test_sigterm_while_maas_up_starts_its_stack_leaves_nothing_behind(tmp_path, examples_root):
    """Before the graceful handler was installed, SIGTERM killed the process outright and the stack's
    temporary folder (/tmp/maas-stack-*) stayed behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp), "MAAS_MODEL_REPOSITORY": str(examples_root)}
    proc, lines = _spawn_maas("up", env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not list(temp.glob("maas-stack-*")):  # the stack is starting
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)  # hang guard
    finally:
        proc.kill()
    assert not list(temp.glob("maas-stack-*")), "".join(lines)


def _wait_for_line(proc: subprocess.Popen, lines: list[str], fragment: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not any(fragment in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)


@pytest.mark.slow
def test_an_s3_model_repository_lives_on_the_embedded_stack(tmp_path):
    """`maas up`, `maas batch worker` and `maas demo` opened MAAS_MODEL_REPOSITORY before their embedded stack was
    up: an s3:// repository went to AWS itself (s3.amazonaws.com, with the stack's dummy keys), not to the stack's
    S3 as `maas worker`'s does, and `maas up` stopped on its first example model. The stack makes the repository's
    bucket (it starts empty), and `maas models` and `maas serve`, which start no stack, use the one `maas up` runs."""
    env = {"MAAS_MODEL_REPOSITORY": "s3://maas-models/zoo"}
    up, up_lines = _spawn_maas("up", env=env, cwd=tmp_path)
    batch = None
    try:
        _wait_for_line(up, up_lines, "local stack is up")
        assert "published example model mnist_mlp v1 to s3://maas-models/zoo\n" in up_lines, "".join(up_lines)
        batch, batch_lines = _spawn_maas("batch", "worker", "--examples", "--wait", "1", env=env, cwd=tmp_path)
        _wait_for_line(batch, batch_lines, "batch worker watching")
        listed = maas("models", "list", env=env, cwd=tmp_path)
        assert listed.stdout.startswith("mnist_mlp\tversions [1]"), listed.stdout + listed.stderr
        serve, serve_lines = _spawn_maas("serve", "--port", "0", env=env, cwd=tmp_path)
        try:
            _wait_for_line(serve, serve_lines, "serving the V2 API on ")
            url = next(line for line in serve_lines if "serving the V2 API on " in line).split()[5]
            with urllib.request.urlopen(f"{url}/v2/models/mnist_mlp", timeout=30) as answer:
                assert json.loads(answer.read())["versions"] == ["1"]
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
    finally:
        for proc in (batch, up):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                finally:
                    proc.kill()
    demo = maas("demo", "--requests", "5", "--show", "1", env=env, cwd=tmp_path, timeout=240)
    assert demo.returncode == 0 and "answered 5/5 (5 results)" in demo.stdout, demo.stdout + demo.stderr


@contextlib.contextmanager
def _maas_up_on_moto(tmp_path, stack, examples_root):
    """`maas up` with AWS configured (keys, and boto3's own AWS_ENDPOINT_URL_S3 leading to the session's moto): it
    starts only a broker. Yields the process and its output lines once it is up; SIGTERMed after."""
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_ENDPOINT_URL_S3": stack.endpoint_url,
           "MAAS_MODEL_REPOSITORY": str(examples_root)}
    up, lines = _spawn_maas("up", env=env, cwd=tmp_path)
    try:
        _wait_for_line(up, lines, "topics: ")
        yield up, lines
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        finally:
            up.kill()


def test_maas_up_on_real_aws_prints_no_endpoint_to_export(tmp_path, stack, examples_root):
    """With AWS configured (here: keys, and boto3's own AWS_ENDPOINT_URL_S3 leading to the session's moto) `maas up`
    starts only the broker; it printed `export AWS_ENDPOINT_URL=None`, which sent every command of a shell that
    ran it to botocore's "Invalid endpoint: None"."""
    with _maas_up_on_moto(tmp_path, stack, examples_root) as (_, lines):
        pass
    exports = [line.strip() for line in lines if line.startswith("export ")]
    assert len(exports) == 1 and exports[0].startswith("export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:"), "".join(lines)


def test_a_state_file_left_by_a_dead_maas_up_stops_no_later_one(tmp_path, stack, examples_root):
    """A `maas up` killed outright leaves `.maas/stack.json`; once its pid names another live process (after a
    reboot, say; here this test's), the next `maas up` said "a local stack is already up here" and other commands
    went to its dead addresses. Nobody holds the stack's lock then: the file is a dead one's, and the next `maas up`
    starts and writes its own."""
    (tmp_path / ".maas").mkdir()
    (tmp_path / ".maas" / "stack.json").write_text(json.dumps(
        {"pid": os.getpid(), "kafka_bootstrap_servers": "127.0.0.1:1", "aws_endpoint_url": "http://127.0.0.1:1"}))
    with _maas_up_on_moto(tmp_path, stack, examples_root) as (up, _):
        assert json.loads((tmp_path / ".maas" / "stack.json").read_text())["pid"] == up.pid


def _serve_holding_a_request(tmp_path, env: dict[str, str]) -> tuple[subprocess.Popen, list[str], str, int]:
    """`maas serve --port 0` on an empty repository, yielded with its output lines, host and port."""
    proc, lines = _spawn_maas("serve", "--port", "0", env={"MAAS_MODEL_REPOSITORY": str(tmp_path / "repo"), **env},
                              cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not any("serving the V2 API on" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("".join(lines))
        time.sleep(0.05)
    url = next(line for line in lines if "serving the V2 API on" in line).split(" on ")[1].split()[0]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return proc, lines, host, int(port)


def _hold(host: str, port: int) -> socket.socket:
    """A connection whose request is in flight, its body never coming."""
    held = socket.create_connection((host, port), timeout=5)
    held.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    assert held.recv(100).startswith(b"HTTP/1.1 100 Continue")  # now in flight, reading its body
    return held


def test_serve_drains_within_the_shutdown_timeout(tmp_path):
    """`maas serve` drained the requests in flight for a fixed 25 s after SIGTERM, past MAAS_SHUTDOWN_TIMEOUT_S
    (20 s by default, below a pod's 30 s grace period): it now gets three quarters of that timeout."""
    proc, lines, host, port = _serve_holding_a_request(tmp_path, {"MAAS_SHUTDOWN_TIMEOUT_S": "4"})
    try:
        with _hold(host, port):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, "".join(lines)  # a 25 s drain would still be under way
    finally:
        proc.kill()


def test_a_second_sigterm_ends_a_draining_server_at_once(tmp_path):
    """The first SIGTERM drains the requests in flight (up to 15 s by default); the second was caught and
    ignored."""
    proc, _, host, port = _serve_holding_a_request(tmp_path, {})
    try:
        deadline = time.monotonic() + 60
        with _hold(host, port):
            proc.send_signal(signal.SIGTERM)
            while time.monotonic() < deadline:  # draining: no longer listening
                try:
                    socket.create_connection((host, port), timeout=1).close()
                except OSError:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == -signal.SIGTERM  # hang guard: the drain alone lasts 15 s
    finally:
        proc.kill()
