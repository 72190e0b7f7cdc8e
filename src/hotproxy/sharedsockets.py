"""The listening sockets the master owns and its workers share: Unix paths.

A Unix socket path cannot be bound once per worker (``SO_REUSEPORT`` lets
workers share a TCP port, not a path).  So in multi-process mode the master
binds it once and, for every command that names it, sends the worker a
duplicate of the descriptor (``fdchannel``) and the command a token for it.

Rules of this module:

* A path is bound once and kept while a deployment or a staged command of
  the manager's record names it, so a restarted worker gets the same socket
  back and connections queued meanwhile are not refused; ``release_unused``
  (once per dispatch, after every command of it is recorded) closes, and
  unlinks if still ours, the rest.
* Keyed by path alone: a backlog change, a move onto a path another site
  leaves in the same reload (a swap), or a restarted worker all get the
  socket already listening there -- binding the path again would fail,
  and unlinking it would lose the file.  The worker sets the backlog when
  it listens (Linux lets ``listen()`` change it).
* Sockets systemd passed (``activation``) are served, TCP and Unix alike,
  to the sites whose address is theirs, the same way; they are kept (never
  released, never unlinked) until the master stops or hands over.
* TCP sockets are the workers' own (``SO_REUSEPORT``), but for an upgrade:
  each old worker's TCP listening sockets are passed on to the new worker
  of the same id as they arrive (``adopt_tcp``: the master keeps no copy,
  only the token by address), and the first command that names that
  address on that worker serves on it -- the same socket, its queue goes
  on.  ``release_handed`` makes the workers close the ones no service took
  (their old worker still holds them); a worker that dies has its tokens
  forgotten (``forget_handed``) and, restarted, binds its own.
"""

from __future__ import annotations

from typing import Any, Iterable

from . import activation
from .commands import listener_factory_of, site_of, with_listener_factory
from .errors import BuildListenerError, WorkerError, describe
from .fdchannel import InheritedListenerFactory
from .listeners import BoundListener, ListenerFactory, TcpListenerFactory, UnixListenerFactory
from .workers import ProcessWorker


class SharedSockets:
    """The master's listening sockets, by path."""

    def __init__(self) -> None:
        self._bound: dict[str, BoundListener] = {}
        self._token = 0
        #: paths adopted from the master this one upgrades, not ours until ``own_adopted``
        self._adopted: set[str] = set()
        #: sockets systemd passed (or the master this one upgrades had been passed), by address key
        self._activated: dict[activation.Key, BoundListener] = {}
        #: a TCP factory's key (its bind address looked up once), for matching ``_activated``
        self._tcp_keys: dict[TcpListenerFactory, activation.Key | None] = {}
        #: the tokens of the TCP listening sockets an upgrade passed on to worker *id*, by (id, address key)
        self._handed: dict[tuple[int, activation.Key], int] = {}
        #: tokens passed on that no command will claim, by worker id (``release_handed``)
        self._unclaimed: dict[int, list[int]] = {}

    def activate(self, sock: Any) -> str | None:
        """Serve the sites listening on *sock*'s address on *sock* (a socket
        systemd passed, listening already); its address as a config writes
        it, or None (the socket is closed) if it is not TCP or a Unix path."""
        key = activation.key_of(sock)
        if key is None:
            sock.close()
            return None
        old = self._activated.pop(key, None)
        if old is not None:
            old.close()
        # a BoundListener without an unlinker: the file (if a path) is systemd's
        self._activated[key] = BoundListener(sock, UnixListenerFactory(key[1], mode=None) if key[0] == "unix"
                                             else TcpListenerFactory(key[1], key[2]))
        return activation.address_of(sock)

    def activated(self) -> list[int]:
        """The descriptor of every socket systemd passed (to pass to a new master)."""
        return [bound.sock.fileno() for bound in self._activated.values()]

    def _activated_for(self, lf: ListenerFactory) -> BoundListener | None:
        if not self._activated:
            return None
        if isinstance(lf, UnixListenerFactory):
            return self._activated.get(("unix", lf.path))
        if isinstance(lf, TcpListenerFactory):
            key = self._tcp_key(lf)
            return self._activated.get(key) if key is not None else None
        return None

    def _tcp_key(self, lf: TcpListenerFactory) -> activation.Key | None:
        """What *lf* binds to, as ``activation.key_of`` names a socket (None: cannot tell)."""
        if lf not in self._tcp_keys:
            # (a host name is looked up here, once: a literal address needs no lookup)
            from .config import listen_sockaddrs

            addrs = listen_sockaddrs(lf)
            self._tcp_keys[lf] = activation.key_of_sockaddr(next(iter(addrs))) if addrs else None
        return self._tcp_keys[lf]

    def is_activated(self, key: activation.Key) -> bool:
        """True if a socket systemd passed is bound to *key* (shared already: never handed per worker)."""
        return key in self._activated

    def adopt_tcp(self, worker: ProcessWorker, sockets: list[tuple[activation.Key, int]]) -> None:
        """Pass *sockets* -- (address key, fd) of the old worker with *worker*'s id --
        on to *worker* now, ``SCM_MAX_FD`` to a message (an upgrade; see the module's
        docstring).  The caller closes the fds; ``WorkerError`` if they cannot be sent."""
        tokens = list(range(self._token + 1, self._token + 1 + len(sockets)))
        self._token += len(sockets)
        try:
            worker.send_listeners(tokens, [fd for _, fd in sockets])
        except OSError as exc:
            raise WorkerError(worker.id, f"cannot send {len(sockets)} listening sockets: {describe(exc)}") from None
        for (key, _), token in zip(sockets, tokens):
            old = self._handed.pop((worker.id, key), None)
            self._handed[(worker.id, key)] = token
            if old is not None:
                self._unclaimed.setdefault(worker.id, []).append(old)

    def forget_handed(self, worker: int) -> None:
        """Worker *worker* died: the sockets passed on to it are gone with it."""
        for k in [k for k in self._handed if k[0] == worker]:
            del self._handed[k]
        self._unclaimed.pop(worker, None)

    def release_handed(self) -> dict[int, list[int]]:
        """The tokens, by worker id, of the handed-over TCP sockets no service took:
        their workers are to close them (their old worker holds them on)."""
        for (worker, _), token in self._handed.items():
            self._unclaimed.setdefault(worker, []).append(token)
        self._handed.clear()
        out, self._unclaimed = self._unclaimed, {}
        return out

    def adopt(self, path: str, sock: Any) -> None:
        """Serve *path* on *sock*, bound and listening in the master this one
        upgrades (the same socket: connections queued on it are not lost).
        Until ``own_adopted`` it is neither released nor unlinked here."""
        old = self._bound.pop(path, None)
        if old is not None:
            old.close()
        self._bound[path] = UnixListenerFactory(path).adopt(sock)
        self._adopted.add(path)

    def own_adopted(self) -> None:
        """The hand-over is done: the adopted paths are ours (released and
        unlinked like any other once nothing names them)."""
        for path in self._adopted:
            bound = self._bound.get(path)
            if bound is not None and isinstance(bound.factory, UnixListenerFactory):
                bound.own_file(bound.factory.unlinker_now())
        self._adopted.clear()

    def sockets(self) -> dict[str, int]:
        """The descriptor of every socket, by path (to pass to a new master)."""
        return {path: bound.sock.fileno() for path, bound in self._bound.items()}

    def for_worker(self, command: Any, worker: ProcessWorker) -> Any:
        """*command* as *worker* gets it: a Unix listener it names, or one on
        the address of a socket systemd passed, replaced by the master's socket, sent now over the worker's fd channel (any other
        command as it is).  ``BuildListenerError`` if the path cannot be
        bound, ``WorkerError`` if the worker cannot be sent the socket."""
        lf = listener_factory_of(command)
        if not isinstance(lf, (UnixListenerFactory, TcpListenerFactory)):
            return command
        bound = self._activated_for(lf)
        if bound is None and isinstance(lf, TcpListenerFactory):
            key = self._tcp_key(lf) if self._handed else None
            handed = self._handed.pop((worker.id, key), None) if key is not None else None
            if handed is None:
                return command   # each worker binds its own (SO_REUSEPORT)
            # the old worker's socket, passed on to this worker already (``adopt_tcp``)
            return with_listener_factory(command, InheritedListenerFactory(lf, handed))
        if bound is None:
            assert isinstance(lf, UnixListenerFactory)
            bound = self._bound_at(site_of(command) or "?", lf)
        self._token += 1
        token = self._token
        try:
            worker.send_listener(token, bound.sock.fileno())
        except OSError as exc:
            raise WorkerError(worker.id, f"cannot send listener {lf.address}: {describe(exc)}") from None
        return with_listener_factory(command, InheritedListenerFactory(lf, token))

    def _bound_at(self, site: str, lf: UnixListenerFactory) -> BoundListener:
        """The master's socket at *lf*'s path: the one already bound, or a new one."""
        bound = self._bound.get(lf.path)
        if bound is None:
            try:
                bound = self._bound[lf.path] = lf.bind()
            except OSError as exc:
                raise BuildListenerError(site, f"{lf.address}: {describe(exc)}") from None
        return bound

    def release_unused(self, used: Iterable[ListenerFactory]) -> None:
        """Close (and unlink, if still ours) the sockets no factory of *used* names."""
        paths = {lf.path for lf in used if isinstance(lf, UnixListenerFactory)} | self._adopted
        for path in [p for p in self._bound if p not in paths]:
            self._bound.pop(path).close()

    def close(self, keep_files: bool = False) -> None:
        """Close every socket (the manager stops); *keep_files*: leave every
        file in place (a new master serves them now)."""
        for bound in self._bound.values():
            if keep_files:
                bound.own_file(None)
            bound.close()
        self._bound.clear()
        for bound in self._activated.values():
            bound.close()
        self._activated.clear()
        self._handed.clear()   # (passed on: the workers' to close)
        self._unclaimed.clear()


__all__ = ["SharedSockets"]
