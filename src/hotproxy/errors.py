"""hotproxy's exception family, and how any exception is shown to an operator.

Every error hotproxy raises derives from ``HotproxyError``.  Deployment errors
name the site and the worker they happened on; each is one line, fit to show
an operator as it is.  They pickle, because workers send them to the master.

``describe(exc)`` is the one way an exception of any kind becomes the line
an operator reads (in a reload report, a log line, a ``DeployError``), and
``one_line(text)`` the one way a text is made a single line.  This module
imports nothing: the light CLI commands use it.
"""

from __future__ import annotations

#: ``typing.TYPE_CHECKING`` without importing typing (the CLI's control commands stay light)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


class HotproxyError(Exception):
    """Root of every error hotproxy raises."""


class DeployError(HotproxyError):
    """A command failed on one worker; the site was left exactly as it was."""

    #: what kind of failure, for messages ("build service", "site not found", ...)
    what = "deploy"

    def __init__(self, site: str, detail: str = "", worker: int | None = None) -> None:
        self.site = site
        self.detail = detail
        self.worker = worker
        super().__init__(site, detail, worker)

    def __str__(self) -> str:
        where = f"site {self.site!r}"
        if self.worker is not None:
            where += f" on worker {self.worker}"
        msg = f"{self.what}: {where}"
        return f"{msg}: {self.detail}" if self.detail else msg

    def __reduce__(self) -> tuple[type[DeployError], tuple[str, str, int | None]]:
        return (type(self), (self.site, self.detail, self.worker))

    def on_worker(self, worker: int) -> DeployError:
        """Stamp the worker id (the executor does this) and return self."""
        if self.worker is None:
            self.worker = worker
            self.args = (self.site, self.detail, worker)
        return self


class BuildServiceError(DeployError):
    """The factory could not build the service."""

    what = "cannot build service"


class BuildListenerError(DeployError, OSError):
    """The listener could not be made (bind, listen, bad address)."""

    what = "cannot build listener"

    def __init__(self, site: str, detail: str = "", worker: int | None = None) -> None:
        DeployError.__init__(self, site, detail, worker)

    __str__ = DeployError.__str__


class SiteNotFoundError(DeployError, LookupError):
    """No site by that name on this worker."""

    what = "site not found"


class NothingStagedError(DeployError):
    """Update/Commit asked for, but nothing is precommitted."""

    what = "nothing staged"


class NothingDeployedError(DeployError):
    """Update asked for on a site that serves nothing yet (use Commit)."""

    what = "nothing deployed"


class WorkerError(HotproxyError):
    """A worker process is gone or its control channel broke."""

    def __init__(self, worker: int, detail: str) -> None:
        self.worker = worker
        self.detail = detail
        super().__init__(worker, detail)

    def __str__(self) -> str:
        return f"worker {self.worker}: {self.detail}"

    def __reduce__(self) -> tuple[type[WorkerError], tuple[int, str]]:
        return (type(self), (self.worker, self.detail))


class WorkerTimeoutError(WorkerError):
    """A worker stayed silent past its deadline; the manager killed it (it is restarted)."""


class ConfigError(HotproxyError, ValueError):
    """A configuration problem: one line naming the file, the key and what was expected."""


def one_line(text: str) -> str:
    """*text* on one line, nothing hidden: surrounding white space dropped,
    control characters inside (a newline in a config key, in an exception's
    text) shown escaped as Python writes them (``\\n``)."""
    text = text.strip()
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe(exc: BaseException | None, *, typed: bool = False) -> str:
    """*exc* as one line for an operator.

    A hotproxy error says it all (its own line).  An ``OSError`` says its
    reason (``strerror``) and the file it names, without the errno; a
    ``TimeoutError`` without a text says "timed out".  Anything else says its
    text, or its type's name when it has none -- and with *typed*, its type
    before its text (``RuntimeError: ...``): for failures no check foresaw,
    where the type is half the story.
    """
    if exc is None:
        return "unknown error"
    name = type(exc).__name__
    if isinstance(exc, HotproxyError):
        text = str(exc) or name
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if not exc.filename else f"{exc.strerror}: {exc.filename}"
    elif isinstance(exc, TimeoutError) and not str(exc):
        text = "timed out"
    else:
        text = str(exc)
        if typed:
            text = f"{name}: {text}" if text else name
        elif not text:
            text = name
    return one_line(text)


class CommandGroupError(ExceptionGroup[Exception], HotproxyError):
    """The failures of one command across workers, raised together."""

    # the base's overloads (Exception vs BaseException members) cannot be
    # narrowed to this class's one kind of member
    def derive(self, excs: Sequence[Exception]) -> CommandGroupError:  # type: ignore[override]
        return CommandGroupError(self.message, excs)
