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
"""

from __future__ import annotations

from typing import Any, Iterable

from .commands import listener_factory_of, site_of, with_listener_factory
from .errors import BuildListenerError, WorkerError, describe
from .fdchannel import InheritedListenerFactory
from .listeners import BoundListener, ListenerFactory, UnixListenerFactory
from .workers import ProcessWorker


class SharedSockets:
    """The master's listening sockets, by path."""

    def __init__(self) -> None:
        self._bound: dict[str, BoundListener] = {}
        self._token = 0
        #: paths adopted from the master this one upgrades, not ours until ``own_adopted``
        self._adopted: set[str] = set()

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
        """*command* as *worker* gets it: a Unix listener it names replaced by the
        master's socket, sent now over the worker's fd channel (any other
        command as it is).  ``BuildListenerError`` if the path cannot be
        bound, ``WorkerError`` if the worker cannot be sent the socket."""
        lf = listener_factory_of(command)
        if not isinstance(lf, UnixListenerFactory):
            return command
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


__all__ = ["SharedSockets"]
