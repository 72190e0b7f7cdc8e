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

Limits, so that clients that connect and say nothing cannot take the
master's descriptors (it needs them to restart workers):

* a connection is *idle* while it has not sent a complete request line; one
  idle for ``idle_timeout`` seconds (``runtime.admin_idle_timeout``) is told
  so and closed.  A connection waiting for its reply (a reload takes its
  time) or for the "stopped" event is not idle; a reply the client does not
  read within ``idle_timeout`` closes it.
* at most ``max_connections`` at once: ``MAX_CONNECTIONS``, or a quarter of
  the descriptor limit (``RLIMIT_NOFILE``) when that is less.  At the cap a
  new connection takes the place of the one idle the longest (which is told
  why), so ``hotproxy status`` still answers while a leaky script holds
  connections open; if none is idle, the new one gets ``{"ok": false,
  "error": "too many admin connections (N); try again"}`` and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import stat
import time
from typing import Any, Awaitable, Callable

from .adminclient import AdminError, encode as _encode
from .errors import HotproxyError, describe

log = logging.getLogger("hotproxy.admin")

#: the longest request line accepted
MAX_REQUEST = 64 * 1024

#: seconds a connection may take to send a complete request line (default)
IDLE_TIMEOUT = 10.0

#: admin connections at once, at most (fewer when descriptors are scarce)
MAX_CONNECTIONS = 64

#: a handler gets a request (a dict with a str "cmd") and returns the reply,
#: and whether the connection should then wait for the "stopped" event
Handler = Callable[[dict[str, Any]], Awaitable[tuple[dict[str, Any], bool]]]


def default_max_connections() -> int:
    """``MAX_CONNECTIONS``, or a quarter of the soft ``RLIMIT_NOFILE`` if less (at least 1).

    The other three quarters stay for what the master must always be able
    to open: worker channels, listeners, and a restarted worker's pipes.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft // 4))


class _Client:
    """One admin connection, as the cap and the idle timeout see it."""

    __slots__ = ("task", "writer", "idle_since")

    def __init__(self, task: asyncio.Task[None], writer: asyncio.StreamWriter) -> None:
        self.task = task
        self.writer = writer
        #: loop time since it has been waiting for a request line; None while busy
        self.idle_since: float | None = None


class AdminServer:
    """Serves JSON-line requests on a Unix socket with *handler*.

    *idle_timeout* and *max_connections* are the limits described in the
    module's docstring (None: ``default_max_connections()``);
    ``idle_timeout`` may be changed while serving (a reload does).
    """

    def __init__(self, path: str, handler: Handler, commands: tuple[str, ...], *,
                 idle_timeout: float = IDLE_TIMEOUT, max_connections: int | None = None) -> None:
        self.path = path
        self.handler = handler
        self.commands = commands
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections if max_connections is not None else default_max_connections()
        self._server: asyncio.AbstractServer | None = None
        self._ident: tuple[int, int] | None = None
        #: the connections being served, oldest first
        self._clients: dict[asyncio.Task[None], _Client] = {}
        self._stop_waiters: list[asyncio.StreamWriter] = []
        #: connections closed at the cap since the last warning, and when that was
        self._capped = 0
        self._capped_logged = 0.0

    async def start(self) -> None:
        """Create the socket (checked, mode 0600) and start serving; raise ``AdminError``."""
        sock = _bind_private(self.path)
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(
            self._client, sock=sock, limit=MAX_REQUEST)

    async def start_inherited(self, sock: socket.socket) -> None:
        """Serve on *sock*, the admin socket bound at ``path`` by the master this
        one upgrades (connections queued on it meanwhile are served)."""
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST)

    def listening_socket(self) -> socket.socket | None:
        """The bound socket (to pass to a new master), or None when not serving."""
        server: Any = self._server   # asyncio's and uvloop's servers have .sockets
        socks = server.sockets if server is not None else None
        return socks[0] if socks else None

    def hand_over(self, unlink: bool) -> None:
        """Stop accepting, for a new master that has the socket: open connections
        go on (the ``upgrade`` client waits for its reply); the file stays
        unless *unlink* (the new master serves another path)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if unlink:
            self._unlink()
        self._ident = None

    async def close(self) -> None:
        """Stop accepting, drop idle clients, remove the socket file (if still ours).

        Clients waiting for the "stopped" event stay connected until
        ``notify_stopped``.
        """
        if self._server is not None:
            self._server.close()
            self._server = None
        self._unlink()
        tasks = list(self._clients)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def connections(self) -> int:
        """Admin connections open now (``stop`` clients waiting for "stopped" included)."""
        return len(self._clients) + len(self._stop_waiters)

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

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Make room for a new connection under the cap, or refuse it (False)."""
        if self.connections < self.max_connections:
            return True
        idle = [c for c in self._clients.values() if c.idle_since is not None]
        self._note_capped()
        if not idle:
            _say_and_close(writer, f"too many admin connections ({self.max_connections}); try again")
            return False
        victim = min(idle, key=lambda c: c.idle_since or 0.0)
        del self._clients[victim.task]      # its place is taken now, not when its task ends
        _say_and_close(victim.writer, f"closed: too many admin connections ({self.max_connections}), "
                                      "and this one had sent no request for the longest")
        victim.task.cancel()
        return True

    def _note_capped(self) -> None:
        self._capped += 1
        now = time.monotonic()
        if now - self._capped_logged >= 10.0:
            log.warning("admin socket at its cap of %d connections: %d closed or refused (the idle "
                        "longest go first)", self.max_connections, self._capped)
            self._capped, self._capped_logged = 0, now

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if not self._admit(writer):
            return
        client = self._clients[task] = _Client(task, writer)
        loop = asyncio.get_running_loop()
        keep = False
        try:
            while True:
                client.idle_since = loop.time()
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        line = await reader.readline()
                except TimeoutError:
                    writer.write(_encode(_error(f"no complete request within {self.idle_timeout:g}s; closing")))
                    break
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_encode(_error(f"request longer than {MAX_REQUEST} bytes")))
                    break
                client.idle_since = None
                if not line:
                    break
                if not line.strip():
                    continue
                reply, keep = await self._handle(line)
                writer.write(_encode(reply))
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        await writer.drain()
                except TimeoutError:   # a client that does not read its reply
                    keep = False
                    writer.transport.abort()
                    break
                if keep:
                    self._stop_waiters.append(writer)
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug in a handler: say so, keep serving others
            log.exception("admin request failed")
        finally:
            if self._clients.get(task) is client:
                del self._clients[task]
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
            return _error(f"malformed request: not JSON ({describe(exc)[:200]})"), False
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


def _say_and_close(writer: asyncio.StreamWriter, message: str) -> None:
    """One error line, then hang up (the line is flushed before the close)."""
    with contextlib.suppress(Exception):
        writer.write(_encode(_error(message)))
        writer.close()


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


__all__ = ["AdminClient", "AdminError", "AdminServer", "IDLE_TIMEOUT", "MAX_CONNECTIONS", "MAX_REQUEST",
           "default_max_connections"]
