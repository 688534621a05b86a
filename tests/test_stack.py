"""The local stack really starts, answers, bootstraps, and never leaves orphans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from worker_support import maas_up_recorded

import infra.stack
from infra.stack import LocalStack, StackError
from pipeline.services import aws_client, bootstrap
from pipeline.settings import ConfigError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purposes
        return f.read().split()[2] != "Z"


async def test_bootstrap_creates_topics_and_bucket(live):
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**live.kafka_client_kwargs())
    await admin.start()
    try:
        topics = set(await admin.list_topics())
    finally:
        await admin.close()
    assert set(live.topics.all()) <= topics
    buckets = {b["Name"] for b in aws_client(live, "s3").list_buckets()["Buckets"]}
    assert live.batch_bucket in buckets
    await bootstrap(live)  # idempotent: a second run creates nothing and does not fail


def test_stack_stop_ends_both_processes(tmp_path):
    stack = LocalStack(tmp_path / "s").start()
    pids = [stack._broker.pid, stack._moto.pid]
    with socket.create_connection(("127.0.0.1", stack.kafka_port), timeout=2):
        pass
    with urllib.request.urlopen(f"{stack.endpoint_url}/moto-api/", timeout=2) as response:
        assert response.status == 200
    stack.stop()
    assert not any(_alive(pid) for pid in pids)
    assert not (tmp_path / "s").exists()


def _held_port(listening: bool) -> socket.socket:
    """A loopback port another process holds: listening (a probe that connects reaches it) or only bound."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    if listening:
        held.listen()
    return held


@pytest.mark.parametrize("service", ["kafka", "aws"])
@pytest.mark.parametrize("listening", [True, False], ids=["listening", "bound"])
def test_a_port_taken_before_the_child_binds_it_is_not_mistaken_for_the_child(service, listening, tmp_path):
    """A port another process holds is refused in one line whose log is still there. A foreign listener used to pass
    the readiness probe (the stack 'started' while its own broker or moto had exited, unable to bind), and the log
    a failed start pointed to was removed with the stack's folder."""
    with _held_port(listening) as held:
        port = held.getsockname()[1]
        stack = LocalStack(tmp_path / "s", **{"kafka_port" if service == "kafka" else "s3_port": port})
        with pytest.raises(StackError, match=f"could not listen on 127.0.0.1:{port}: another process holds") as error:
            stack.start(kafka=service == "kafka", aws=service == "aws")
    assert Path(str(error.value).rsplit("see ", 1)[1]).is_file()
    assert stack._broker is None and stack._moto is None
    stack.stop()


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "bound"])
def test_a_free_port_taken_before_the_child_binds_it_is_replaced(listening, tmp_path, monkeypatch):
    """free_port() gives a port out and another process may take it before the child binds it: the child then
    exits, and the stack starts on the next free port instead of failing (or, behind a foreign listener, of
    'starting' without its own broker and moto)."""
    with _held_port(listening) as held:
        taken = held.getsockname()[1]
        ports = iter([taken, taken])  # the first port of each service is taken
        free_port = infra.stack.free_port
        monkeypatch.setattr(infra.stack, "free_port", lambda: next(ports, None) or free_port())
        with LocalStack(tmp_path / "s") as stack:
            assert taken not in (stack.kafka_port, stack.s3_port)
            assert _alive(stack._broker.pid) and _alive(stack._moto.pid)
            with urllib.request.urlopen(f"{stack.endpoint_url}/moto-api/", timeout=2) as response:
                assert response.status == 200
            with socket.create_connection(("127.0.0.1", stack.kafka_port), timeout=2):
                pass


async def test_an_embedded_stack_that_cannot_start_keeps_the_log_its_error_names(settings, tmp_path, monkeypatch):
    """`maas`'s one-line error says "see <log>": its folder went with the stack, which `connected` stopped again."""
    from dataclasses import replace

    from pipeline.services import connected

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with _held_port(listening=False) as held:
        monkeypatch.setattr(infra.stack, "free_port", lambda: held.getsockname()[1])
        with pytest.raises(ConfigError, match="another process holds that port") as error:
            async with connected(replace(settings, aws_endpoint_url=None), use_state=False):
                pass
    assert Path(str(error.value).rsplit("see ", 1)[1]).is_file()


def _children(name: str) -> set[int]:
    """This process's children whose command line mentions ``name``."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # ended meanwhile
            continue
        if parent == os.getpid() and name.encode() in cmdline:
            found.add(int(entry))
    return found


async def test_a_process_on_real_kafka_starts_only_the_embedded_s3_and_sqs(settings):
    from dataclasses import replace

    from pipeline.services import connected

    kafka_only = replace(settings, aws_endpoint_url=None)  # Kafka configured (the session's broker), AWS not
    assert not kafka_only.embedded_kafka and kafka_only.embedded_aws
    brokers, servers = _children("tansu"), _children("moto.server")
    async with connected(kafka_only, use_state=False) as ready:
        assert ready.kafka_bootstrap_servers == settings.kafka_bootstrap_servers
        assert ready.aws_endpoint_url not in (None, settings.aws_endpoint_url)
        assert _children("tansu") == brokers  # no broker nobody would use
        assert len(_children("moto.server") - servers) == 1
    assert _children("moto.server") == servers


async def test_a_worker_without_maas_up_here_says_its_stack_is_private(settings, tmp_path, monkeypatch, caplog):
    """`maas worker` (and `maas batch worker`) started in a folder where no `maas up` runs, or before it, silently
    served a broker of its own: `maas submit` next to `maas up` then waited out its 60 s with no hint why. It now
    says so, also beside a state file whose `maas up` died (its pid alive as another process, its lock free); with
    `maas up` running in its folder it finds that stack and says nothing."""
    import json
    import logging
    from dataclasses import replace

    from pipeline.services import connected

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="pipeline.services")
    nothing = replace(settings, kafka_bootstrap_servers=None, aws_endpoint_url=None)
    (tmp_path / ".maas").mkdir()  # left by a `maas up` that died, its pid taken by a live process since: no lock
    (tmp_path / ".maas" / "stack.json").write_text(json.dumps(
        {"pid": os.getpid(), "kafka_bootstrap_servers": "127.0.0.1:1", "aws_endpoint_url": "http://127.0.0.1:1"}))
    async with connected(nothing) as private:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"no `maas up` runs in this folder (.maas/stack.json): this process started a private "
                            f"embedded stack (Kafka {private.kafka_bootstrap_servers}, S3/SQS "
                            f"{private.aws_endpoint_url}) that other commands do not find; to reach it with `maas "
                            "submit`, start `maas up` here first, or set KAFKA_BOOTSTRAP_SERVERS and AWS_ENDPOINT_URL"]
    caplog.clear()
    async with connected(replace(settings, aws_endpoint_url=None)) as kafka_only:  # Kafka configured, AWS not
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and f"private embedded S3/SQS server ({kafka_only.aws_endpoint_url})" in warnings[0]
    caplog.clear()
    # `maas up` runs here (this process stands for it), on the session's stack
    with maas_up_recorded(tmp_path, settings.kafka_bootstrap_servers, settings.aws_endpoint_url):
        async with connected(nothing) as shared:
            assert (shared.kafka_bootstrap_servers, shared.aws_endpoint_url) == (settings.kafka_bootstrap_servers,
                                                                                 settings.aws_endpoint_url)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_children_die_with_a_killed_parent(tmp_path):
    script = (
        "import sys, time; from pathlib import Path; from infra.stack import LocalStack\n"
        f"s = LocalStack(Path({str(tmp_path / 's')!r})).start()\n"
        "print(s._broker.pid, s._moto.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "broker or moto outlived a SIGKILLed parent"
    finally:
        parent.kill()


def test_a_terminals_ctrl_c_reaches_the_parent_alone(stack):
    """Ctrl-C signals the terminal's whole foreground process group. The children shared it: pressed while
    `maas up` started them, it killed moto or the broker first, and `maas up` ended with exit 2 and "moto S3/SQS
    server exited" or "cannot reach S3" instead of 130, leaving its stack folder behind. In a group of their own they
    are stopped by the parent, as on any other exit."""
    for child in (stack._broker, stack._moto):
        assert os.getpgid(child.pid) == child.pid != os.getpgrp()


async def test_unreachable_broker_is_a_one_line_config_error(settings):
    from dataclasses import replace

    from infra.stack import free_port

    bad = replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"cannot reach Kafka at 127\.0\.0\.1:\d+ \(KAFKA_BOOTSTRAP_SERVERS\)"):
        await bootstrap(bad)


async def test_a_dead_maas_ups_state_file_is_not_trusted_while_the_next_one_starts(tmp_path, monkeypatch):
    """A `maas up` holds the lock from before its stack starts (seconds: a broker, an S3/SQS server) until it writes
    its own `.maas/stack.json`. A file left by a killed one, its pid alive as another process, was trusted all that
    while, the lock being held: a `maas worker` started then went to the dead stack's addresses, and a second
    `maas up` was told the dead one was up. The lock taken, the file is known to be a dead one's: it is removed."""
    import argparse
    import json

    import pipeline.commands.stack as stack_commands
    from pipeline.services import read_state
    from pipeline.settings import Settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".maas").mkdir()
    (tmp_path / ".maas" / "stack.json").write_text(json.dumps(
        {"pid": os.getpid(), "kafka_bootstrap_servers": "127.0.0.1:1", "aws_endpoint_url": "http://127.0.0.1:1"}))
    seen = []

    async def starting(settings: Settings) -> int:  # what others read while this `maas up` starts its stack
        seen.append(read_state())
        return 0

    monkeypatch.setattr(stack_commands, "_up", starting)
    assert await stack_commands.cmd_up(argparse.Namespace(), Settings()) == 0
    assert seen == [None]
