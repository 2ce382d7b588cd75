"""The sockets the supervisor serves from its own loop: the status socket, and the metrics endpoint (HTTP).

The supervisor has no threads and no event loop (it forks), so these are plain non-blocking sockets whose
descriptors join the loop's `wait()`: a readable listener is accepted, a readable connection read. Answers are
small (kilobytes) and written at once; a client that does not take them within a second is dropped, so no
client can hold the loop up for long. A forked child closes its copies first thing (`close_in_child`).

Status: a unix stream socket, mode 0660 (group: the service's, `dingdifyd`); a client connects and reads one
JSON document until EOF, nothing to send. Metrics: `GET /metrics` over TCP or a unix socket; anything else is
404/405. Neither opens anything to the network unless `metrics_listen` names a non-loopback address.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dingdifyd.errors import ConfigError
from dingdifyd.paths import parse_listen

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
WRITE_TIMEOUT = 1.0  # the longest a slow client may hold the supervisor's loop
READ_TIMEOUT = 5.0  # a metrics client that has not sent its request by then is dropped
MAX_CONNECTIONS = 16
MAX_REQUEST = 8192


def _bind_unix(path: str, key: str) -> socket.socket:
    """A listening unix socket at `path`; a stale one (nobody listening) is replaced, a live one is an error."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError([f"{key}: {path} exists and is not a socket"])
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by a daemon that is gone
        else:
            raise ConfigError([f"{key}: {path} is in use: another dingdifyd runs with this configuration"])
        finally:
            probe.close()
    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(MAX_CONNECTIONS)
    except OSError as exc:
        sock.close()
        raise ConfigError([f"{key}: cannot listen on {path}: {exc.strerror}"]) from None
    sock.setblocking(False)
    return sock


def _send_and_close(conn: socket.socket, data: bytes) -> None:
    try:
        conn.settimeout(WRITE_TIMEOUT)
        conn.sendall(data)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        log.debug("a status/metrics client went away: %s", exc)
    finally:
        conn.close()


class StatusEndpoint:
    def __init__(self, path: str, document: Callable[[], dict[str, Any]], key: str = "status_socket"):
        self.path = path
        self._document = document
        self._socket: socket.socket | None = _bind_unix(path, key)
        log.info("status socket: %s", path)

    def waitables(self) -> list[Any]:
        return [self._socket] if self._socket is not None else []

    def serve(self, ready: list[Any]) -> None:
        if self._socket is None or self._socket not in ready:
            return
        for _ in range(MAX_CONNECTIONS):
            try:
                conn, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("status socket: accept failed: %s", exc)
                return
            try:
                data = json.dumps(self._document(), ensure_ascii=False).encode("utf-8")
            except Exception:
                log.exception("status socket: building the status failed")
                conn.close()
                continue
            _send_and_close(conn, data)

    def close(self, *, unlink: bool = True) -> None:
        if self._socket is None:
            return
        self._socket.close()
        self._socket = None
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


@dataclass
class _Client:
    conn: socket.socket
    since: float
    data: bytes = field(default=b"")


class MetricsEndpoint:
    def __init__(
        self,
        listen: str,
        render: Callable[[], bytes],
        content_type: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        key: str = "metrics_listen",
    ):
        self.listen = listen
        self._render = render
        self._content_type = content_type
        self._clock = clock
        self._clients: list[_Client] = []
        self._unix_path: str | None = None
        kind, address = parse_listen(listen)
        if kind == "unix":
            self._socket: socket.socket | None = _bind_unix(address, key)
            self._unix_path = address
        else:
            self._socket = self._bind_tcp(address, key)
        log.info("metrics: http://%s/metrics", listen if kind == "tcp" else f"unix:{address}")

    @staticmethod
    def _bind_tcp(address: tuple[str, int], key: str) -> socket.socket:
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError([f"{key}: {host!r} is not an address to listen on ({exc.strerror})"]) from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(MAX_CONNECTIONS)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError([f"{key}: {host}:{port} is already in use (another program, or another "
                                   "instance: each needs its own port)"]) from None  # fmt: skip
            raise ConfigError([f"{key}: cannot listen on {host}:{port}: {exc.strerror}"]) from None
        sock.setblocking(False)
        return sock

    def waitables(self) -> list[Any]:
        if self._socket is None:
            return []
        return [self._socket, *(client.conn for client in self._clients)]

    def serve(self, ready: list[Any]) -> None:
        if self._socket is None:
            return
        if self._socket in ready:
            self._accept()
        now = self._clock()
        for client in list(self._clients):
            if client.conn in ready:
                self._read(client)
            elif now - client.since > READ_TIMEOUT:
                self._drop(client)

    def _accept(self) -> None:
        assert self._socket is not None
        for _ in range(MAX_CONNECTIONS):
            try:
                conn, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("metrics: accept failed: %s", exc)
                return
            if len(self._clients) >= MAX_CONNECTIONS:
                conn.close()
                continue
            conn.setblocking(False)
            self._clients.append(_Client(conn, self._clock()))

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.conn.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        client.data += chunk
        if b"\r\n\r\n" in client.data or b"\n\n" in client.data:
            self._clients.remove(client)
            _send_and_close(client.conn, self._respond(client.data))
        elif not chunk or len(client.data) > MAX_REQUEST:
            self._drop(client)

    def _respond(self, request: bytes) -> bytes:
        method, _, rest = request.partition(b" ")
        target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _http(405, "Method Not Allowed", b"only GET\n", "text/plain", extra="Allow: GET, HEAD\r\n")
        if target != b"/metrics":
            return _http(404, "Not Found", b"the metrics are at /metrics\n", "text/plain")
        try:
            body = self._render()
        except Exception:
            log.exception("metrics: rendering failed")
            return _http(500, "Internal Server Error", b"rendering failed\n", "text/plain")
        return _http(200, "OK", b"" if method == b"HEAD" else body, self._content_type, length=len(body))

    def _drop(self, client: _Client) -> None:
        with contextlib.suppress(ValueError):
            self._clients.remove(client)
        client.conn.close()

    def close(self, *, unlink: bool = True) -> None:
        for client in self._clients:
            client.conn.close()
        self._clients.clear()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            if unlink and self._unix_path:
                with contextlib.suppress(OSError):
                    os.unlink(self._unix_path)


def _http(status: int, reason: str, body: bytes, content_type: str, *, length: int | None = None,
          extra: str = "") -> bytes:  # fmt: skip
    size = len(body) if length is None else length
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n{extra}\r\n")  # fmt: skip
    return head.encode("ascii") + body


class Endpoints:
    """Both, as the arbiter uses them: waitables for its wait(), serve after it, close at the end or in a child."""

    def __init__(self, status: StatusEndpoint | None = None, metrics: MetricsEndpoint | None = None):
        self.status = status
        self.metrics = metrics

    def waitables(self) -> list[Any]:
        return [*(self.status.waitables() if self.status else ()), *(self.metrics.waitables() if self.metrics else ())]

    def serve(self, ready: list[Any]) -> None:
        for endpoint in (self.status, self.metrics):
            if endpoint is not None:
                endpoint.serve(ready)

    def close(self) -> None:
        for endpoint in (self.status, self.metrics):
            if endpoint is not None:
                endpoint.close()

    def close_in_child(self) -> None:
        """A forked bot process's copies: closed, the files left to the supervisor."""
        for endpoint in (self.status, self.metrics):
            if endpoint is not None:
                endpoint.close(unlink=False)
