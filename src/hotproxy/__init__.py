"""hotproxy: a TCP proxy whose services are replaced while it runs.

Also a library: the six deployment commands, the per-worker executor, the
worker manager and the service/factory/layer contract work for any asyncio
network service.

The public names are imported on first use (PEP 562): ``import hotproxy``
costs nothing, so ``hotproxy status`` -- a short-lived process that sends
one JSON line -- does not pay for asyncio, uvloop and the compiled core.
``from hotproxy import WorkerManager`` works as before.
"""

from __future__ import annotations

#: ``typing.TYPE_CHECKING`` without importing typing (type checkers know the name)
TYPE_CHECKING = False

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Abort", "Command", "Commit", "PrepareAndCommit", "Precommit", "Remove", "Update"),
                    "commands"),
    **dict.fromkeys(("EchoFactory", "EchoService"), "echo"),
    **dict.fromkeys(("BuildListenerError", "BuildServiceError", "CommandGroupError", "ConfigError", "DeployError",
                     "HotproxyError", "NothingDeployedError", "NothingStagedError", "SiteNotFoundError",
                     "WorkerError"), "errors"),
    "ServiceExecutor": "executor",
    **dict.fromkeys(("ListenerFactory", "TcpListenerFactory", "UnixListenerFactory", "parse_address"),
                    "listeners"),
    **dict.fromkeys(("ResultGroup", "WorkerManager", "WorkerResult"), "manager"),
    **dict.fromkeys(("ProxyFactory", "ProxyService", "UpstreamSpec"), "proxy"),
    **dict.fromkeys(("CountConnections", "Layer", "LayerService", "LimitConnections", "MakeService", "Service",
                     "stack"), "service"),
}

__all__ = [
    "Abort", "BuildListenerError", "BuildServiceError", "Command", "CommandGroupError", "Commit",
    "ConfigError", "CountConnections", "DeployError", "EchoFactory", "EchoService", "HotproxyError",
    "Layer", "LayerService", "LimitConnections", "ListenerFactory", "MakeService",
    "NothingDeployedError", "NothingStagedError", "PrepareAndCommit", "Precommit", "ProxyFactory",
    "ProxyService", "Remove",
    "ResultGroup", "Service", "ServiceExecutor", "SiteNotFoundError", "TcpListenerFactory",
    "UnixListenerFactory", "Update", "UpstreamSpec", "WorkerError", "WorkerManager", "WorkerResult",
    "parse_address", "stack",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use, then keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        # not ours (or a submodule not imported yet): the import system then
        # tries ``hotproxy.<name>`` as a submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see: the eager imports
    from .commands import Abort, Command, Commit, PrepareAndCommit, Precommit, Remove, Update
    from .echo import EchoFactory, EchoService
    from .errors import (BuildListenerError, BuildServiceError, CommandGroupError, ConfigError, DeployError,
                         HotproxyError, NothingDeployedError, NothingStagedError, SiteNotFoundError,
                         WorkerError)
    from .executor import ServiceExecutor
    from .listeners import ListenerFactory, TcpListenerFactory, UnixListenerFactory, parse_address
    from .manager import ResultGroup, WorkerManager, WorkerResult
    from .proxy import ProxyFactory, ProxyService, UpstreamSpec
    from .service import (CountConnections, Layer, LayerService, LimitConnections, MakeService, Service,
                          stack)
