"""A real OPC UA server (asyncua) for tests and the latency bench, on its own event loop thread.

It holds a small PLC-like address space (namespace 2, string node ids):

    Press1.Reject (Boolean)  Press1.EventId (String)  Press1.PeakScore (Float)  Press1.Count (Int32)
    Line4.Reject  Line4.EventId  Line4.PeakScore  Line4.Count

and records every value a client writes (``history``), so a test sees a pulse it would miss by polling.

    with OpcUaServer() as plc:                       # security None, anonymous
    with OpcUaServer(tmp, secure=True, users={"lw": "pw"}) as plc:   # SignAndEncrypt only, users only
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography.x509.oid import ExtendedKeyUsageOID

from pipeline.embedded import free_port

NS = 2
VARIABLES = {"Reject": (False, ua.VariantType.Boolean), "EventId": ("", ua.VariantType.String),
             "PeakScore": (0.0, ua.VariantType.Float), "Count": (0, ua.VariantType.Int32)}
CLIENT_URI = "urn:freeopcua:client"


def node_id(name: str) -> str:
    return f"ns={NS};s={name}"


def nodes(prefix: str) -> dict[str, str]:
    """The subscription's node map for one camera/line of this server."""
    return {"reject": node_id(f"{prefix}.Reject"), "event_id": node_id(f"{prefix}.EventId"),
            "peak_score": node_id(f"{prefix}.PeakScore"), "count": node_id(f"{prefix}.Count")}


async def make_certificate(directory: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    """A self-signed certificate (DER) and key (PEM)."""
    cert, key = directory / f"{name}-cert.der", directory / f"{name}-key.pem"
    use = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    await setup_self_signed_certificate(key, cert, uri, "localhost", [use], {"commonName": name})
    return cert, key


class _Users(UserManager):
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User)
        return None


class _Recorder:
    def __init__(self, server: OpcUaServer) -> None:
        self.server = server

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        name = node.nodeid.Identifier
        with self.server.lock:
            self.server.history.setdefault(name, []).append((time.perf_counter(), val))


class OpcUaServer:
    def __init__(self, root: Path | None = None, port: int | None = None, secure: bool = False,
                 users: dict[str, str] | None = None, prefixes: tuple[str, ...] = ("Press1", "Line4")) -> None:
        self.port = port or free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}/linewatch/"
        self.root = root
        self.secure = secure
        self.users = users
        self.prefixes = prefixes
        self.lock = threading.Lock()
        self.history: dict[str, list[tuple[float, Any]]] = {}
        # (perf_counter, node name, value) of each external write, taken as the server applies it.
        self.writes: list[tuple[float, str, Any]] = []
        self.written = threading.Condition(self.lock)
        self.client_cert: Path | None = None
        self.client_key: Path | None = None
        self.server_cert: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        server = Server(user_manager=_Users(self.users) if self.users else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        if self.secure:
            assert self.root is not None
            self.server_cert, server_key = await make_certificate(self.root, "server", "urn:linewatch:test:server",
                                                                  True)
            self.client_cert, self.client_key = await make_certificate(self.root, "client", CLIENT_URI, False)
            await server.load_certificate(str(self.server_cert))
            await server.load_private_key(str(server_key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                                        ua.SecurityPolicyType.Basic256Sha256_Sign])
        if self.users:
            server.set_security_IDs(["Username"])
        idx = await server.register_namespace("urn:linewatch:test")
        assert idx == NS
        plc = await server.nodes.objects.add_object(idx, "PLC")
        watched = []
        for prefix in self.prefixes:
            for name, (initial, vtype) in VARIABLES.items():
                var = await plc.add_variable(ua.NodeId(f"{prefix}.{name}", idx), f"{prefix}.{name}",
                                             ua.Variant(initial, vtype))
                await var.set_writable()
                watched.append(var)
        server.subscribe_server_callback(CallbackType.PostWrite, self._post_write)
        await server.start()
        sub = await server.create_subscription(10, _Recorder(self))
        await sub.subscribe_data_change(watched)
        self._server = server

    async def _post_write(self, event: Any, dispatcher: Any) -> None:
        now = time.perf_counter()
        with self.written:
            for item in event.request_params.NodesToWrite:
                self.writes.append((now, str(item.NodeId.Identifier), item.Value.Value.Value))
            self.written.notify_all()

    def wait_write(self, name: str, value: Any, timeout: float = 30.0) -> float:
        """perf_counter of the first write of ``value`` to ``name``, waiting for it if need be."""
        def found() -> float | None:
            return next((t for t, n, v in self.writes if n == name and v == value), None)

        with self.written:
            if not self.written.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no write of {value!r} to {name} within {timeout} s")
            result = found()
            assert result is not None
            return result

    def start(self) -> OpcUaServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start(), timeout=60)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._server.stop())
            self._server = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(10)
            self._loop = None

    def read(self, name: str) -> Any:
        assert self._server is not None
        return self._call(self._server.get_node(node_id(name)).read_value())

    def values(self, prefix: str) -> dict[str, Any]:
        return {name: self.read(f"{prefix}.{name}") for name in VARIABLES}

    def changes(self, name: str) -> list[Any]:
        """Every value the node took (the initial one first)."""
        with self.lock:
            return [v for _, v in self.history.get(name, [])]

    def __enter__(self) -> OpcUaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
