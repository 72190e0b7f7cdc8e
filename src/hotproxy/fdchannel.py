"""Listening sockets the master owns, passed to its workers (``SCM_RIGHTS``).

A Unix socket path cannot be bound by several processes the way
``SO_REUSEPORT`` lets them share a TCP port.  So in multi-process mode the
master binds it once (``sharedsockets``) and hands each worker a duplicate
of the descriptor over the worker's *fd channel*, a socketpair next to its
control channel; every worker accepts from the one socket.

Rules of this module:

* The master's end is an ``FdSender`` its worker handle owns; the worker's
  end an ``FdReceiver`` the worker process owns.  No module state: two
  channels in one process (tests, embedding) do not meet.
* A descriptor travels with a *token*; the command that uses it names the
  token (an ``InheritedListenerFactory``).  The master sends the descriptor
  before the command, so it is normally waiting already.
* The worker reads its end without blocking: the loop never waits in
  ``recvmsg()``; ``make()`` waits in the loop, bounded.  A worker process
  reads it as descriptors arrive (``start``), not only when a command
  claims one: the master sends every descriptor of a batch before the
  batch (an upgrade hands over hundreds of TCP sockets), which would fill
  the socket's buffer and block the master's send otherwise.
* Every descriptor received is either taken by a listener or closed: the
  worker calls ``done(command)`` after every command, so a command that
  failed before binding leaves no descriptor behind, and a token given up
  before its descriptor arrived has the descriptor closed when it does.
* The other way (worker -> master) carries only an upgrade's hand-over: the
  worker's TCP listening sockets (``send_listeners``), at most ``SCM_MAX_FD``
  per ``sendmsg``, each batch one byte; the master reads them as they come
  (``FdSender.receive``) while the worker's reply says how many there are.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from .commands import listener_factory_of, with_listener_factory
from .listeners import BoundListener, ListenerFactory


#: the most descriptors one ``sendmsg`` carries (the kernel's ``SCM_MAX_FD``)
SCM_MAX_FD = 253


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """``socket.recv_fds``, the descriptors close-on-exec (``MSG_CMSG_CLOEXEC``: uvloop starts
    a worker without closing what is inheritable, and Python 3.11's ``recv_fds`` drops its flags)."""
    msg, ancdata, _, _ = sock.recvmsg(bufsize, socket.CMSG_LEN(maxfds * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True) for i in range(0, usable, 4)]
    return msg, fds


async def _wait_fd(fd: int, writable: bool, timeout: float) -> None:
    """Wait (in the loop, at most *timeout* seconds) until *fd* is readable or writable."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, wake)
    try:
        await asyncio.wait_for(ready, max(0.0, timeout))
    except asyncio.TimeoutError:
        pass
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


async def send_listeners(sock: socket.socket, fds: list[int], timeout: float = 10.0) -> None:
    """The worker's side of an upgrade's hand-over: send *fds* to the master on the
    fd channel *sock* (non-blocking), ``SCM_MAX_FD`` at a time; ``OSError`` if it cannot."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for start in range(0, len(fds), SCM_MAX_FD):
        batch = fds[start:start + SCM_MAX_FD]
        while True:
            try:
                socket.send_fds(sock, [b"L"], batch)
                break
            except (BlockingIOError, InterruptedError):
                if loop.time() >= deadline:
                    raise OSError(errno.ETIMEDOUT, "the master does not read the listening sockets") from None
                await _wait_fd(sock.fileno(), True, deadline - loop.time())


class FdSender:
    """The master's end of one worker's fd channel."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        sock.settimeout(timeout)
        self.sock = sock

    def send(self, token: int, fd: int) -> None:
        """Send *fd* with *token* (the worker claims it by token)."""
        socket.send_fds(self.sock, [token.to_bytes(8, "big")], [fd])

    def send_many(self, tokens: list[int], fds: list[int]) -> None:
        """Send *fds*, each with its token, ``SCM_MAX_FD`` to a message."""
        for start in range(0, len(fds), SCM_MAX_FD):
            socket.send_fds(self.sock, [b"".join(t.to_bytes(8, "big") for t in tokens[start:start + SCM_MAX_FD])],
                            fds[start:start + SCM_MAX_FD])

    def _read_ready(self, into: list[int]) -> bool:
        """Append the descriptors already queued by the worker to *into*; False once
        nothing is queued.  ``OSError`` if the channel is closed."""
        # (non-blocking for this call only: with a timeout the socket would wait in poll() first)
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            msg, fds = recv_fds(self.sock, 1, SCM_MAX_FD)
        except (BlockingIOError, InterruptedError):
            return False
        finally:
            self.sock.settimeout(timeout)
        if not msg and not fds:
            raise OSError(errno.EPIPE, "the worker's fd channel is closed")
        into += fds
        return True

    def discard(self) -> None:
        """Close whatever the worker sent that nobody read (a hand-over given up on)."""
        left: list[int] = []
        try:
            while self._read_ready(left):
                pass
        except OSError:
            pass
        for fd in left:
            os.close(fd)

    async def receive(self, into: list[int], count: asyncio.Future[int], timeout: float) -> None:
        """Read the worker's listening sockets into *into* as they come, until there are
        *count* (a future: the worker's reply says how many) or *timeout* seconds
        have passed (``OSError``).  The caller closes *into* if it gives up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (count.done() and not count.cancelled() and count.exception() is None
                   and len(into) >= count.result()):
            if count.done() and (count.cancelled() or count.exception() is not None):
                return
            if self._read_ready(into):
                continue
            if loop.time() >= deadline:
                raise OSError(errno.ETIMEDOUT, f"{len(into)} listening sockets arrived in {timeout:g}s")
            waiting: asyncio.Future[Any] = asyncio.ensure_future(
                _wait_fd(self.sock.fileno(), False, deadline - loop.time()))
            either: list[asyncio.Future[Any]] = [waiting, count]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)

    def close(self) -> None:
        self.sock.close()


class FdReceiver:
    """A worker's end of its fd channel: the descriptors the master sent, by token."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._received: dict[int, int] = {}
        #: tokens a listener took (``done`` has nothing to close for them)
        self._claimed: set[int] = set()
        #: tokens released before their descriptor was read: closed when it arrives
        self._unwanted: set[int] = set()
        #: ``start`` ran: the loop reads the channel as descriptors arrive
        self._reading = False
        #: ``claim_async`` calls waiting for the next descriptor (``start``)
        self._waiters: list[asyncio.Future[None]] = []

    def start(self) -> None:
        """Read the channel in the running loop as descriptors arrive (a worker process)."""
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read_arrived)
        self._reading = True

    def _read_arrived(self) -> None:
        try:
            while self._read_one():
                pass
        except OSError:
            # the master's end is closed: nothing more comes
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _read_one(self) -> bool:
        """Read one message -- descriptors and their tokens, 8 bytes each -- if one is
        there (False if not); ``OSError`` if the channel is closed.

        (Every message carries descriptors, and a stream socket never reads past
        the message whose descriptors it returns: one read is one message.)"""
        try:
            msg, fds = recv_fds(self.sock, 8 * SCM_MAX_FD, SCM_MAX_FD)
        except (BlockingIOError, InterruptedError):
            return False
        if not msg or not fds:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EPIPE, "inherited listener channel closed")
        tokens = [int.from_bytes(msg[i:i + 8], "big") for i in range(0, len(msg) - 7, 8)]
        for i, fd in enumerate(fds):
            got = tokens[i] if i < len(tokens) else -1
            if got in self._unwanted or got < 0:
                self._unwanted.discard(got)
                os.close(fd)
            else:
                self._received[got] = fd
        return True

    # -- commands ---------------------------------------------------------------

    def received(self, command: Any) -> Any:
        """*command*, its inherited listener (if any) taking descriptors from this channel."""
        lf = listener_factory_of(command)
        if isinstance(lf, InheritedListenerFactory):
            return with_listener_factory(command, replace(lf, channel=self))
        return command

    def done(self, command: Any) -> None:
        """After *command* ran: close its descriptor unless a listener took it."""
        lf = listener_factory_of(command)
        if isinstance(lf, InheritedListenerFactory):
            self.release(lf.token)

    # -- descriptors ------------------------------------------------------------

    def claim(self, token: int) -> int:
        """The descriptor sent with *token*; ``BlockingIOError`` if it is not there yet."""
        while token not in self._received:
            if not self._read_one():
                raise BlockingIOError(errno.EAGAIN, "not yet")
        self._claimed.add(token)
        return self._received.pop(token)

    async def claim_async(self, token: int, timeout: float = 10.0) -> int:
        """``claim``, waiting (in the loop, bounded) for the descriptor to arrive."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return self.claim(token)
            except BlockingIOError:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OSError(errno.ETIMEDOUT, "the inherited listener did not arrive")
            if self._reading:
                arrived: asyncio.Future[None] = loop.create_future()
                self._waiters.append(arrived)
                try:
                    await asyncio.wait_for(arrived, remaining)
                except asyncio.TimeoutError:
                    pass
                continue
            readable: asyncio.Future[None] = loop.create_future()
            fd = self.sock.fileno()

            def wake() -> None:
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await asyncio.wait_for(readable, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(fd)

    def release(self, token: int) -> None:
        """Close the descriptor sent with *token* unless a listener took it."""
        if token in self._claimed:
            self._claimed.discard(token)
            return
        try:
            fd = self.claim(token)
        except BlockingIOError:
            self._unwanted.add(token)   # not read yet: closed when it is
            return
        except OSError:
            return
        self._claimed.discard(token)
        os.close(fd)


@dataclass(frozen=True)
class InheritedListenerFactory(ListenerFactory):
    """A listener whose socket the master bound and sent to this worker.

    The manager substitutes it for listener factories that workers cannot
    bind each on their own (Unix sockets); ``original`` is what the user gave.
    In the worker, ``FdReceiver.received`` sets ``channel``, where the
    descriptor comes from.
    """

    original: ListenerFactory
    token: int
    channel: FdReceiver | None = field(default=None, repr=False)

    @property
    def backlog(self) -> int:  # type: ignore[override]
        return self.original.backlog

    @property
    def address(self) -> str:
        return self.original.address

    def _channel(self) -> FdReceiver:
        if self.channel is None:
            raise OSError(errno.EBADF, "no inherited listener channel (not a worker process)")
        return self.channel

    def bind(self) -> BoundListener:
        """The socket, if its descriptor has arrived (``BlockingIOError`` if not)."""
        return self._wrap(self._channel().claim(self.token))

    async def make(self) -> BoundListener:
        """The socket; waits in the loop (never in ``recvmsg()``) if it is not there yet."""
        return self._wrap(await self._channel().claim_async(self.token))

    def _wrap(self, fd: int) -> BoundListener:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        # the master owns the path; workers never unlink it
        return BoundListener(sock, self)

    def __eq__(self, other: object) -> bool:
        # the same listener as the one the user asked for
        if isinstance(other, InheritedListenerFactory):
            return self.original == other.original
        return self.original == other

    def __hash__(self) -> int:
        return hash(self.original)

    def __reduce__(self) -> Any:
        # the channel is this process's: it does not travel
        return (type(self), (self.original, self.token))


__all__ = ["SCM_MAX_FD", "FdReceiver", "FdSender", "InheritedListenerFactory", "send_listeners"]
