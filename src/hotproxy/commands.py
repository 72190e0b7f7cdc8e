"""The six deployment commands, as plain picklable values.

A command says *what* to do to one site; ``ServiceExecutor.execute`` does it
on one worker and ``WorkerManager.dispatch`` on all of them.  See
docs/architecture.md, "The six commands", for the contract; in short:

==================  ==========================================================
Precommit           build from the running service (``make_via_ref``), stage it
Update              swap the staged service in; open connections keep theirs
Commit              serve the staged service on a (new) listener
PrepareAndCommit    build fresh (``make``), make the listener, serve
Abort               drop what is staged
Remove              stop accepting, drain, forget the site
==================  ==========================================================

``Precommit`` may also carry a listener factory: the listener is then bound
(not yet listening) while staging, so that a later ``Commit`` cannot fail on
an address that is in use -- the reload's prepare phase relies on this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .listeners import ListenerFactory
    from .service import MakeService


@dataclass(frozen=True)
class Precommit:
    """Build the next version of *name* from the running one and stage it."""

    name: str
    factory: MakeService
    #: optional: also bind (stage) this listener, for a following ``Commit``
    listener_factory: ListenerFactory | None = None


@dataclass(frozen=True)
class Update:
    """Swap the staged service of *name* into its slot."""

    name: str


@dataclass(frozen=True)
class Commit:
    """Serve the staged service of *name* on a listener.

    With ``listener_factory=None`` the listener staged by ``Precommit`` is
    used, or else -- on a site already serving -- the current one is kept.
    """

    name: str
    listener_factory: ListenerFactory | None = None


@dataclass(frozen=True)
class PrepareAndCommit:
    """Build *name* fresh (no state transfer), make its listener and serve."""

    name: str
    factory: MakeService
    listener_factory: ListenerFactory


@dataclass(frozen=True)
class Abort:
    """Drop whatever is staged for *name*."""

    name: str


@dataclass(frozen=True)
class Remove:
    """Stop accepting on *name*, drain its connections, forget it.

    ``drain_timeout=None`` uses the executor's default.
    """

    name: str
    drain_timeout: float | None = None


Command = Union[Precommit, Update, Commit, PrepareAndCommit, Abort, Remove]

#: the command classes (``isinstance(x, COMMANDS)``)
COMMANDS = (Precommit, Update, Commit, PrepareAndCommit, Abort, Remove)

_WITH_LISTENER = (Precommit, Commit, PrepareAndCommit)


def listener_factory_of(command: object) -> ListenerFactory | None:
    """The listener factory *command* carries (``Precommit``, ``Commit``,
    ``PrepareAndCommit``), or None."""
    if isinstance(command, _WITH_LISTENER):
        return command.listener_factory
    return None


def with_listener_factory(command: Precommit | Commit | PrepareAndCommit, lf: ListenerFactory) -> Command:
    """*command* carrying *lf* instead of its listener factory."""
    return replace(command, listener_factory=lf)


def site_of(command: object) -> str | None:
    """The site *command* names, or None if it is not a command."""
    return command.name if isinstance(command, COMMANDS) else None


__all__ = ["COMMANDS", "Abort", "Command", "Commit", "PrepareAndCommit", "Precommit", "Remove", "Update",
           "listener_factory_of", "site_of", "with_listener_factory"]
