"""Listener factories: where a site accepts connections.

A listener factory is a picklable value.  ``bind()`` makes a *bound* socket
that is not listening yet: binding is where an address-in-use or a bad
address shows, so the reload's prepare phase binds every new listener
before anything is committed, and the kernel sends no connection to a
socket that may still be thrown away.  Committing is two steps:
``BoundListener.listen`` (listen, build what accepts: all that can fail,
done before the new version is published) and ``start`` (accept; cannot
fail, done after), so a listener that cannot listen never lets a version
be published that is then withdrawn.

TCP listeners set ``SO_REUSEPORT`` so that every worker binds its own
socket on the same address and the kernel spreads connections over them;
each carries the ``reuseport`` program, so that the connections queued on
one that closes move to the others instead of being reset.

A served listener accepts in one of two ways, chosen by the service in the
site's slot: for a service whose ``accepts_raw`` is True (the proxy), the core's
``Listener`` accepts and relays with no asyncio transport at all; for any
other service, an asyncio server.  ``BoundListener.follow()`` switches
between them when an ``Update`` changes the kind of service; the socket
stays open and listening throughout, so no connection is refused, and a
connection the "wrong" way meets is still served (the core's listener falls
back to ``loop.connect_accepted_socket``, the asyncio server's protocol
factory works for every service).  ``HOTPROXY_CORE_ACCEPT=0`` turns the
core's accept off.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from . import addresses, core, reuseport
from .addresses import format_host_port, is_literal
from .addresses import parse_host_port as parse_host_port  # noqa: F401 - its home before addresses.py

if TYPE_CHECKING:
    # What a listener serves with: a site's ``Acceptor`` (the core's) -- the
    # protocol factory of an asyncio server, and the core ``Listener``'s, whose
    # slot's service decides how connections are accepted.
    from ._core import Acceptor as SiteAcceptor
    from .service import Service

log = logging.getLogger("hotproxy.listeners")

#: accept in the core for services that allow it (``HOTPROXY_CORE_ACCEPT=0``: never)
CORE_ACCEPT: bool = os.environ.get("HOTPROXY_CORE_ACCEPT", "1") not in ("", "0")


def accepts_raw(service: Service | None) -> bool:
    """True if the core's ``Listener`` serves *service* without a transport."""
    return CORE_ACCEPT and service is not None and service.accepts_raw is True


class ListenerFactory(abc.ABC):
    """Makes a bound (not yet listening) socket for a site."""

    backlog: int

    @abc.abstractmethod
    def bind(self) -> BoundListener:
        """Bind a new socket; raise ``OSError`` (or ``ValueError``) if it cannot."""

    async def make(self) -> BoundListener:
        """``bind()`` without blocking the loop (what the executor calls)."""
        return self.bind()

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The address as an operator writes it (``127.0.0.1:80``, ``unix:/p``)."""


class BoundListener:
    """A bound socket, and once served, what accepts on it: the core's
    ``Listener`` or an asyncio server (see the module's docstring)."""

    def __init__(self, sock: socket.socket, factory: ListenerFactory,
                 on_close: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.factory = factory
        self.server: asyncio.AbstractServer | None = None
        self.core_listener: Any = None
        self._acceptor: SiteAcceptor | None = None
        self._on_close = on_close
        self._closed = False
        self._switching = False
        #: ``listen()`` succeeded (the socket listens, the acceptor is built)
        self._listening = False
        #: ``start()`` ran: connections are accepted
        self._started = False

    @property
    def address(self) -> str:
        return self.factory.address

    @property
    def mode(self) -> str:
        """``"core"``, ``"loop"`` (an asyncio server), or ``"bound"`` (not accepting yet)."""
        if not self._started:
            return "bound"
        if self.core_listener is not None:
            return "core"
        return "loop" if self.server is not None else "bound"

    async def listen(self, acceptor: SiteAcceptor, service: Service | None) -> None:
        """Listen, and build what will accept with the site's *acceptor*: every
        step that can fail, and none that accepts a connection (``start()`` does).

        *service* is the version about to be published: the core accepts
        if it allows it, else an asyncio server.  The socket listens last,
        so a failure leaves it bound and not listening, as it was (a staged
        listener can be committed again); the kernel queues connections
        from then on, and ``start()`` accepts them.
        """
        if self._closed or self._listening:
            raise RuntimeError(f"{self!r}: listen() on a listener that is closed or already listens")
        lst = server = None
        if accepts_raw(service):
            lst = core.impl.Listener(acceptor, self.sock, self._fallback)
            # Watch and unwatch at once (nothing runs in between): this makes
            # the loop's engine if it is the first (a descriptor: EMFILE
            # shows here) and proves the socket can be watched, so that
            # start() does not fail for either.
            lst.start()
            lst.stop()
        else:
            loop = asyncio.get_running_loop()
            # The server takes the socket (closes it with itself): give it a
            # duplicate, so that a failure below leaves ours as it was.
            dup = self.sock.dup()
            try:
                dup.setblocking(False)
                server = await loop.create_server(acceptor, sock=dup, backlog=self.factory.backlog,
                                                  start_serving=False)
            except BaseException:
                dup.close()
                raise
        try:
            self.sock.listen(self.factory.backlog)
        except BaseException:
            if server is not None:
                server.close()
            raise
        # -- nothing can fail below this line --
        if isinstance(self.factory, TcpListenerFactory) and self.factory.reuse_port:
            # listening: in its address's group, which the program is for (never raises)
            reuseport.attach(self.sock)
        self._acceptor = acceptor
        if server is not None:
            # the server's duplicate is the socket from now on
            old, self.sock = self.sock, dup
            old.close()
        self.core_listener, self.server = lst, server
        self._listening = True

    async def start(self) -> None:
        """Accept on the socket ``listen()`` prepared.  Never raises."""
        if not self._listening or self._started or self._closed:
            return
        self._started = True
        try:
            if self.core_listener is not None:
                self.core_listener.start()
            elif self.server is not None:
                await self.server.start_serving()
        except Exception as exc:   # pragma: no cover - listen() checked what can fail
            log.error("%s: cannot start accepting: %s", self.address, exc)

    async def serve(self, acceptor: SiteAcceptor) -> None:
        """``listen()`` for the service now in the slot, then ``start()``."""
        await self.listen(acceptor, acceptor.slot.current)
        await self.start()

    async def follow(self) -> None:
        """Accept the way the service now in the slot wants (after an Update).

        Never raises: accepting the other way still serves every connection.
        """
        acceptor = self._acceptor
        if acceptor is None or self._closed or self._switching or not self._started:
            return
        want_core = accepts_raw(acceptor.slot.current)
        try:
            if want_core and self.server is not None:
                self._stop_loop()
                self._serve_core()
            elif not want_core and self.core_listener is not None:
                self._switching = True
                try:
                    await self._serve_loop_from_core()
                finally:
                    self._switching = False
        except Exception as exc:   # pragma: no cover - needs a failing loop
            log.warning("%s: cannot switch how the listener accepts: %s", self.address, exc)

    def _serve_core(self) -> None:
        assert self._acceptor is not None   # (listen() set it)
        lst = core.impl.Listener(self._acceptor, self.sock, self._fallback)
        lst.start()
        self.core_listener = lst

    async def _serve_loop_from_core(self) -> None:
        # The asyncio server takes the socket (and closes it with itself):
        # give it a duplicate, and keep the core's listener until it serves.
        assert self._acceptor is not None
        lst = self.core_listener
        dup = self.sock.dup()
        dup.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                self._acceptor, sock=dup, backlog=self.factory.backlog)
        except BaseException:
            dup.close()
            raise
        lst.stop()
        self.core_listener = None
        if self._closed:   # closed meanwhile: this server is not wanted
            server.close()
            return
        self.server = server
        old, self.sock = self.sock, dup
        old.close()

    def _stop_loop(self) -> None:
        # Stop the asyncio server but keep the socket: it closes its own
        # copy, this duplicate stays ours.
        assert self.server is not None
        spare = self.sock.dup()
        spare.setblocking(False)
        self.server.close()
        self.server = None
        self.sock = spare

    def _fallback(self, sock: socket.socket) -> None:
        # the core's listener accepted for a service without a raw relay
        factory = self._acceptor
        assert factory is not None
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(factory, sock))
        _pending_accepts.add(task)
        task.add_done_callback(_accept_done)

    def own_file(self, on_close: Callable[[], None] | None) -> None:
        """What to do with the socket's file when it closes (None: leave it):
        a master that hands its sockets over leaves the files to the new one,
        which takes them once the hand-over is done."""
        self._on_close = on_close

    def close(self) -> int:
        """Stop accepting; open connections are not touched.

        Connections the kernel has already queued on the socket are accepted
        and served (not reset, as closing a listening socket would do); the
        number of them is returned.
        """
        if self._closed:
            return 0
        self._closed = True
        taken = 0
        if not self._started:
            # never accepted: nothing is ours to take (a listen() that was
            # not followed by start() only happens when closing anyway)
            if self.server is not None:
                self.server.close()   # closes the socket with itself
            else:
                self.sock.close()
        elif self.core_listener is not None:
            lst, self.core_listener = self.core_listener, None
            lst.stop()
            try:
                taken = lst.take_queued()
            except OSError as exc:
                log.warning("%s: accepting queued connections on close: %s", self.address, exc)
            self.sock.close()
        elif self.server is not None:
            # Keep the socket open through a duplicate while the server lets
            # go of it, then take what is queued and only then close it.
            try:
                spare = self.sock.dup()
            except OSError:
                spare = None
            self.server.close()
            if spare is not None:
                taken = self._take_queued(spare)
                spare.close()
        else:
            self.sock.close()
        if self._on_close is not None:
            self._on_close()
        return taken

    def _take_queued(self, sock: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        factory = self._acceptor
        assert factory is not None
        sock.setblocking(False)
        taken = 0
        while taken < 4096:   # bounded: the queue holds at most the backlog
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("%s: accepting queued connections on close: %s", self.address, exc)
                break
            taken += 1
            task = loop.create_task(loop.connect_accepted_socket(factory, conn))
            _pending_accepts.add(task)
            task.add_done_callback(_accept_done)
        return taken

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        return f"<BoundListener {self.address} {state}>"


_pending_accepts: set[asyncio.Task[Any]] = set()


def _accept_done(task: asyncio.Task[Any]) -> None:
    _pending_accepts.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("a connection queued at close was lost: %s", task.exception())


# -- name lookups in a running loop -------------------------------------------------
#
# A worker builds new versions while it serves: a blocking getaddrinfo() there
# would stall every accept and relay of the worker for as long as DNS takes.
# So inside a loop, host names are looked up through ``resolver`` (the loop's
# resolver, which runs getaddrinfo in a thread); literal addresses need no
# lookup and are converted at once.

#: ``(host, port, flags) -> getaddrinfo() list``, awaited for every host name
#: a worker looks up; tests replace it (a resolver that takes its time)
Resolver = Callable[[str, int, int], Awaitable[list[tuple[Any, ...]]]]


async def _loop_resolver(host: str, port: int, flags: int) -> list[tuple[Any, ...]]:
    loop = asyncio.get_running_loop()
    return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)


resolver: Resolver = _loop_resolver


async def lookup(host: str, port: int, *, passive: bool = False) -> list[tuple[Any, ...]]:
    """``getaddrinfo(host, port)`` for stream sockets, without blocking the loop:
    a literal address at once, a host name through ``resolver``."""
    flags = socket.AI_PASSIVE if passive else 0
    if is_literal(host):
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags | socket.AI_NUMERICHOST)
    return await resolver(host, port, flags)


@dataclass(frozen=True)
class TcpListenerFactory(ListenerFactory):
    """A TCP listener on ``host:port`` (IPv4 or IPv6), with ``SO_REUSEPORT``."""

    host: str
    port: int
    backlog: int = 1024
    reuse_port: bool = True

    @property
    def address(self) -> str:
        return format_host_port(self.host, self.port)

    def bind(self) -> BoundListener:
        """Bind now; a host name is looked up here, blocking (``make()`` does not)."""
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        return self._bind(infos[0][0], infos[0][4])

    async def make(self) -> BoundListener:
        """Look the host up without blocking the loop, then bind."""
        infos = await lookup(self.host, self.port, passive=True)
        return self._bind(infos[0][0], infos[0][4])

    def _bind(self, family: int, sockaddr: Any) -> BoundListener:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(sockaddr)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return BoundListener(sock, self)


@dataclass(frozen=True)
class UnixListenerFactory(ListenerFactory):
    """A Unix stream socket at ``path``, chmod ``mode``.

    A socket file left by a dead process (nobody accepts on it) is replaced;
    a live one, or a path that is not a socket, is an error.  The file is
    unlinked when the listener closes, if it is still ours.
    """

    path: str
    mode: int | None = 0o660
    backlog: int = 1024

    @property
    def address(self) -> str:
        return addresses.unix_address(self.path)

    def bind(self) -> BoundListener:
        _remove_stale_unix_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            if self.mode is not None:
                os.chmod(self.path, self.mode)
            st = os.stat(self.path)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return BoundListener(sock, self, on_close=self._unlinker((st.st_dev, st.st_ino)))

    def adopt(self, sock: socket.socket) -> BoundListener:
        """*sock*, bound at ``path`` by another process (the master this one
        upgrades), as ours; closing it leaves the file (see ``BoundListener.own_file``)."""
        sock.setblocking(False)
        return BoundListener(sock, self)

    def _unlinker(self, ident: tuple[int, int]) -> Callable[[], None]:
        path = self.path

        def unlink_if_ours() -> None:
            try:
                now = os.stat(path)
            except OSError:
                return
            if (now.st_dev, now.st_ino) == ident:
                try:
                    os.unlink(path)
                except OSError:
                    pass

        return unlink_if_ours

    def unlinker_now(self) -> Callable[[], None] | None:
        """What removes the file at ``path`` as it is now, if it is ours to remove (None if absent)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return self._unlinker((st.st_dev, st.st_ino))


def _remove_stale_unix_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # nobody accepts on it: a leftover of a dead process
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError:
        return  # let bind() report it
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a live listener")


def parse_address(text: str, *, backlog: int = 1024) -> ListenerFactory:
    """``"127.0.0.1:80"``, ``"[::1]:80"`` or ``"unix:/path"`` -> a listener factory."""
    addr = addresses.parse(text)
    if addr.path is not None:
        return UnixListenerFactory(addr.path, backlog=backlog)
    assert addr.host is not None and addr.port is not None
    return TcpListenerFactory(addr.host, addr.port, backlog=backlog)
