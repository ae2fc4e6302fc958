"""Real MQTT peers for tests and the latency bench: a collecting paho subscriber and a private Mosquitto.

    with MqttCollector("127.0.0.1", 1883, "t-abc/#") as rx:
        ...
        rx.wait_for(lambda msgs: len(msgs) >= 3)

    with Mosquitto(tmp_path, users={"plc": "pw"}) as broker:   # own process on a free port
        broker.restart()
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.embedded import free_port

SHARED_BROKER = ("127.0.0.1", 1883)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: dict[str, Any]
    retain: bool
    received: float  # time.perf_counter()


class MqttCollector:
    """Subscribes to ``pattern`` and keeps every message; reconnects by itself."""

    def __init__(self, host: str, port: int, pattern: str, client_id: str | None = None, clean: bool = True,
                 username: str | None = None, password: str | None = None, qos: int = 1,
                 tls_ca: Path | None = None) -> None:
        self.pattern = pattern
        self.qos = qos
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=clean)
        if username:
            self._client.username_pw_set(username, password)
        if tls_ca is not None:
            self._client.tls_set(ca_certs=str(tls_ca))
        self._client.reconnect_delay_set(0.2, 1)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._host, self._port = host, port

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.pattern, qos=self.qos)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(msg.topic, json.loads(msg.payload), bool(msg.retain), time.perf_counter())
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 30.0) -> list[Message]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.messages), timeout):
                seen = [(m.topic, m.payload.get("delivery_id", m.payload.get("state"))) for m in self.messages]
                raise AssertionError(f"MQTT messages on {self.pattern} not as expected within {timeout} s: {seen}")
            return list(self.messages)

    def events(self) -> list[Message]:
        """Event messages (not the retained state)."""
        with self._cond:
            return [m for m in self.messages if "delivery_id" in m.payload]

    def __enter__(self) -> MqttCollector:
        self._client.connect(self._host, self._port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError(f"could not subscribe to {self.pattern} on {self._host}:{self._port}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Mosquitto:
    """A Mosquitto of our own on a free (or given) port, with persistence so a restart keeps sessions."""

    def __init__(self, root: Path, port: int | None = None, users: dict[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.binary = binary
        self.port = port or free_port()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1"]
        if tls:  # (certificate, key) PEM; the certificate is its own CA
            lines += [f"cafile {tls[0]}", f"certfile {tls[0]}", f"keyfile {tls[1]}"]
        lines += ["persistence true", f"persistence_location {root}/",
                 "log_dest stderr", "autosave_interval 1",
                 # Started as root, mosquitto would switch to its own user, who cannot read a private tmp dir.
                 f"user {getpass.getuser()}"]
        if users:
            pwfile = root / "passwd"
            pwfile.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = root / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                      stderr=(self.root / "mosquitto.log").open("ab"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:  # listening is enough: a TLS or password-only broker would refuse a plain probe
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"mosquitto did not listen on {self.port}; see {self.root / 'mosquitto.log'}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()  # SIGTERM: it saves its persistence file on the way out
            self._proc.wait(15)
            self._proc = None

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
