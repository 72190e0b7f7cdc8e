"""The CLI's side of the admin socket: a blocking JSON-lines client.

``hotproxy reload|status|stop`` are short-lived processes that send one
request line and read one or two reply lines (the protocol is described in
``admin``).  Their cost is their start-up, so this module imports only
``socket`` and ``json`` -- no asyncio, no event loop -- and every wait is
bounded by a deadline (``socket.settimeout`` with what is left of it).
The master's side, and an asyncio client for tests and programs that
already run a loop, are in ``admin``.
"""

from __future__ import annotations

import json
import socket
import time

from .errors import HotproxyError

#: ``typing.TYPE_CHECKING`` without importing typing (type checkers know the name)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: the longest reply line accepted (a status of many services is well below)
MAX_REPLY = 16 * 1024 * 1024


class AdminError(HotproxyError):
    """The admin socket cannot be created or reached, or answered nonsense."""


class AdminTimeout(AdminError, TimeoutError):
    """No (complete) answer before the deadline."""


def encode(obj: dict[str, Any]) -> bytes:
    """One protocol line: compact JSON and a newline (either direction)."""
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


class AdminConnection:
    """One blocking connection to a running master's admin socket.

    Use as a context manager::

        with AdminConnection(path) as conn:
            reply = conn.request("status", timeout=120)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def __enter__(self) -> AdminConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout: float) -> None:
        """Connect; raise ``AdminError`` naming the socket if nobody is there."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # a master that does not accept (its backlog full, or stopped in a
        # debugger) must not hang the CLI
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise AdminError(f"no hotproxy is running here (no admin socket {self.path})") from None
        except ConnectionRefusedError:
            sock.close()
            raise AdminError(f"no hotproxy is running here (admin socket {self.path} refuses)") from None
        except TimeoutError:
            sock.close()
            raise AdminTimeout(f"admin socket {self.path}: no connection within {timeout:g}s") from None
        except OSError as exc:
            sock.close()
            raise AdminError(f"admin socket {self.path}: {exc.strerror or exc}") from None
        self._sock = sock

    def request(self, cmd: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; ``AdminTimeout`` after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        if self._sock is None:
            self.connect(timeout)
        assert self._sock is not None
        try:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self._sock.sendall(encode({"cmd": cmd, **fields}))
        except TimeoutError:
            raise AdminTimeout(f"no answer to {cmd!r} within {timeout:g}s") from None
        except OSError as exc:
            raise AdminError(f"admin socket {self.path}: {exc.strerror or exc}") from None
        try:
            reply = self.read(deadline - time.monotonic())
        except AdminTimeout:
            raise AdminTimeout(f"no answer to {cmd!r} within {timeout:g}s") from None
        if reply is None:
            raise AdminError("the running hotproxy closed the admin connection without replying")
        return reply

    def read(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None at EOF (or a reset); ``AdminTimeout`` after *timeout* seconds."""
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                return _decode(line)
            if len(self._buf) > MAX_REPLY:
                raise AdminError(f"the admin socket answered a line longer than {MAX_REPLY} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AdminTimeout(f"no answer within {timeout:g}s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(256 * 1024)
            except TimeoutError:
                raise AdminTimeout(f"no answer within {timeout:g}s") from None
            except OSError:
                return None
            if not chunk:
                return None
            self._buf += chunk

    def close(self) -> None:
        """Hang up."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _decode(line: bytes) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError:
        raise AdminError("the admin socket answered something that is not JSON") from None
    if not isinstance(data, dict):
        raise AdminError("the admin socket answered something that is not an object")
    return data


__all__ = ["AdminConnection", "AdminError", "AdminTimeout", "MAX_REPLY", "encode"]
