"""The admin socket: how ``hotproxy reload|status|stop`` talk to a running master.

A Unix stream socket, mode 0600, speaking JSON lines: one request object
per line, one reply object per line, several requests per connection::

    {"cmd": "reload"}              -> {"ok": true|false, "report": {...}}
    {"cmd": "status"}              -> {"ok": true, "status": {...}}
    {"cmd": "stop", "graceful": true}
                                   -> {"ok": true, "stopping": true, "pid": N}
                                      ... later {"ok": true, "event": "stopped"}

Rules: a malformed, oversized or unknown request gets an ``{"ok": false,
"error": ...}`` reply and changes nothing; a client that misbehaves is
disconnected, never the server disturbed.  The socket is not created over a
symlink, a file we do not own, or a live socket (another instance), and is
removed on close only if it is still ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
from typing import Any, Awaitable, Callable

from .adminclient import AdminError, encode as _encode
from .errors import HotproxyError

log = logging.getLogger("hotproxy.admin")

#: the longest request line accepted
MAX_REQUEST = 64 * 1024

#: a handler gets a request (a dict with a str "cmd") and returns the reply,
#: and whether the connection should then wait for the "stopped" event
Handler = Callable[[dict[str, Any]], Awaitable[tuple[dict[str, Any], bool]]]


class AdminServer:
    """Serves JSON-line requests on a Unix socket with *handler*."""

    def __init__(self, path: str, handler: Handler, commands: tuple[str, ...]) -> None:
        self.path = path
        self.handler = handler
        self.commands = commands
        self._server: asyncio.AbstractServer | None = None
        self._ident: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._stop_waiters: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        """Create the socket (checked, mode 0600) and start serving; raise ``AdminError``."""
        sock = _bind_private(self.path)
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(
            self._client, sock=sock, limit=MAX_REQUEST)

    async def close(self) -> None:
        """Stop accepting, drop idle clients, remove the socket file (if still ours).

        Clients waiting for the "stopped" event stay connected until
        ``notify_stopped``.
        """
        if self._server is not None:
            self._server.close()
            self._server = None
        self._unlink()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    def notify_stopped(self) -> None:
        """Tell every ``stop`` client the instance has stopped, and hang up."""
        for writer in self._stop_waiters:
            with contextlib.suppress(Exception):
                writer.write(_encode({"ok": True, "event": "stopped"}))
                writer.close()
        self._stop_waiters.clear()

    def _unlink(self) -> None:
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
        self._ident = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        keep = False
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_encode(_error(f"request longer than {MAX_REQUEST} bytes")))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                reply, keep = await self._handle(line)
                writer.write(_encode(reply))
                await writer.drain()
                if keep:
                    self._stop_waiters.append(writer)
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug in a handler: say so, keep serving others
            log.exception("admin request failed")
        finally:
            self._clients.discard(task)
            if not keep:
                with contextlib.suppress(Exception):
                    writer.close()

    async def _handle(self, line: bytes) -> tuple[dict[str, Any], bool]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:
            # ValueError: not JSON, not UTF-8, or an integer longer than
            # Python's int/str limit; RecursionError: '[[[[...' nested deeper
            # than the parser's stack (both fit well within MAX_REQUEST)
            return _error(f"malformed request: not JSON ({' '.join(str(exc).split())[:200]})"), False
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _error('malformed request: expected {"cmd": "..."}'), False
        if request["cmd"] not in self.commands:
            return _error(f"unknown command {request['cmd']!r}: expected one of "
                          f"{', '.join(self.commands)}"), False
        try:
            return await self.handler(request)
        except HotproxyError as exc:
            return _error(str(exc)), False


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _bind_private(path: str) -> socket.socket:
    """A socket bound at *path* with mode 0600, after checking the path is safe."""
    parent = os.path.dirname(path) or "."
    _ensure_private_dir(parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISLNK(st.st_mode):
            raise AdminError(f"admin socket {path}: is a symlink; refusing to use it")
        if st.st_uid != os.getuid():
            raise AdminError(f"admin socket {path}: owned by uid {st.st_uid}, not by us; refusing to use it")
        if not stat.S_ISSOCK(st.st_mode):
            raise AdminError(f"admin socket {path}: exists and is not a socket")
        if _alive(path):
            raise AdminError(f"admin socket {path}: another hotproxy is running on it")
        os.unlink(path)   # left by an instance that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)   # no window in which the socket is open to others
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise AdminError(f"admin socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


def _ensure_private_dir(parent: str) -> None:
    """The parent must exist; our own per-user default directory is created 0700."""
    try:
        st = os.lstat(parent)
    except FileNotFoundError:
        if os.path.basename(parent) != f"hotproxy-{os.getuid()}":
            raise AdminError(f"admin socket directory {parent} does not exist") from None
        try:
            os.mkdir(parent, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise AdminError(f"admin socket directory {parent}: {exc.strerror or exc}") from None
        st = os.lstat(parent)
    if os.path.basename(parent) == f"hotproxy-{os.getuid()}":
        # our default directory in a shared /tmp: it must really be ours
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() \
                or st.st_mode & 0o077:
            raise AdminError(f"admin socket directory {parent}: not a private directory of ours; "
                             "refusing to use it")
    elif not stat.S_ISDIR(os.stat(parent).st_mode):
        raise AdminError(f"admin socket directory {parent}: not a directory")


def _alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


# -- an asyncio client (the CLI's own is the blocking one in ``adminclient``) --------


class AdminClient:
    """A connection to a running master's admin socket, for code that runs an event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Connect; raise ``AdminError`` naming the socket if nobody is there."""
        try:
            self.reader, self.writer = await asyncio.open_unix_connection(self.path, limit=16 * 1024 * 1024)
        except FileNotFoundError:
            raise AdminError(f"no hotproxy is running here (no admin socket {self.path})") from None
        except ConnectionRefusedError:
            raise AdminError(f"no hotproxy is running here (admin socket {self.path} refuses)") from None
        except OSError as exc:
            raise AdminError(f"admin socket {self.path}: {exc.strerror or exc}") from None

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request and return the reply."""
        assert self.writer is not None
        self.writer.write(_encode({"cmd": cmd, **args}))
        await self.writer.drain()
        reply = await self.read()
        if reply is None:
            raise AdminError("the running hotproxy closed the admin connection without replying")
        return reply

    async def read(self) -> dict[str, Any] | None:
        """The next message, or None at EOF."""
        assert self.reader is not None
        try:
            line = await self.reader.readline()
        except (ConnectionError, OSError):
            return None
        if not line:
            return None
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise AdminError("the admin socket answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise AdminError("the admin socket answered something that is not an object")
        return data

    async def close(self) -> None:
        """Hang up."""
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


__all__ = ["AdminClient", "AdminError", "AdminServer", "MAX_REQUEST"]
