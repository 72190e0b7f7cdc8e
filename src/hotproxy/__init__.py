"""hotproxy: a TCP proxy whose services are replaced while it runs.

Also a library: the six deployment commands, the per-worker executor, the
worker manager and the service/factory/layer contract work for any asyncio
network service.
"""

from .commands import Abort, Command, Commit, PrepareAndCommit, Precommit, Remove, Update
from .echo import EchoFactory, EchoService
from .errors import (BuildListenerError, BuildServiceError, CommandGroupError, ConfigError, DeployError,
                     HotproxyError, NothingDeployedError, NothingStagedError, SiteNotFoundError,
                     WorkerError)
from .executor import ServiceExecutor
from .listeners import ListenerFactory, TcpListenerFactory, UnixListenerFactory, parse_address
from .manager import ResultGroup, WorkerManager, WorkerResult
from .proxy import ProxyFactory, ProxyService
from .service import (CountConnections, Layer, LayerService, LimitConnections, MakeService, Service,
                      stack)

__version__ = "0.1.0"

__all__ = [
    "Abort", "BuildListenerError", "BuildServiceError", "Command", "CommandGroupError", "Commit",
    "ConfigError", "CountConnections", "DeployError", "EchoFactory", "EchoService", "HotproxyError",
    "Layer", "LayerService", "LimitConnections", "ListenerFactory", "MakeService",
    "NothingDeployedError", "NothingStagedError", "PrepareAndCommit", "Precommit", "ProxyFactory",
    "ProxyService", "Remove",
    "ResultGroup", "Service", "ServiceExecutor", "SiteNotFoundError", "TcpListenerFactory",
    "UnixListenerFactory", "Update", "WorkerError", "WorkerManager", "WorkerResult", "parse_address",
    "stack",
]
