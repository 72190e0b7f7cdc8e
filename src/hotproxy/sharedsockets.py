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
        paths = {lf.path for lf in used if isinstance(lf, UnixListenerFactory)}
        for path in [p for p in self._bound if p not in paths]:
            self._bound.pop(path).close()

    def close(self) -> None:
        """Close every socket (the manager stops)."""
        for bound in self._bound.values():
            bound.close()
        self._bound.clear()


__all__ = ["SharedSockets"]
