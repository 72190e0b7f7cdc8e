"""The config file: TOML in, checked ``Config`` values out.

Rules of this module:

* Loading never half-succeeds: ``load_config`` returns a complete ``Config``
  or raises one ``ConfigError`` whose message is a single line naming the
  file, the key and what was expected.  Nothing here touches a running
  instance -- the reload applies a ``Config`` after it has been built.
* Every key is declared in a table below (``RUNTIME_OPTIONS`` and each
  ``ServiceKind``); a key that is not declared is an error, so a typo never
  silently falls back to a default.
* What can be checked without binding a socket is checked here: types and
  ranges, listen addresses (syntax, one service per address), and upstream
  host names (they must resolve).  Whether a port is free is the reload's
  prepare phase's business, because only binding can tell.
* A service's factory and listener factory are frozen dataclasses that
  compare by value; the reload diffs two configs with ``==`` on them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import stat
import tempfile
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Mapping

from .echo import EchoFactory
from .errors import ConfigError
from .listeners import ListenerFactory, TcpListenerFactory, UnixListenerFactory, parse_host_port
from .service import CountConnections, LimitConnections, MakeService, stack

#: what error messages call the embedded default config
DEFAULT_SOURCE = "<embedded default>"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")


# -- option declarations -------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One config key: its type, default and limits.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``, ``path`` (a
    string; relative paths are taken relative to the config file's
    directory), ``upstreams`` (a non-empty list of ``host:port`` /
    ``[v6]:port`` / ``unix:/path`` whose hosts must resolve).
    """

    type: str
    default: Any = None
    required: bool = False
    min: float | None = None
    #: the largest value (huge numbers overflow the C integers and timers
    #: they end up in, or ask for a million workers)
    max: float | None = None
    #: the minimum is exclusive (``> min`` rather than ``>= min``)
    above: bool = False
    choices: tuple[str, ...] | None = None
    doc: str = ""


#: the upper bound of every duration (seconds)
_YEAR = 365 * 24 * 3600


RUNTIME_OPTIONS: dict[str, Option] = {
    "workers": Option("int", None, min=1, max=1024, doc="worker processes (default: CPU count)"),
    "cpu_affinity": Option("bool", False, doc="pin worker i to CPU i mod ncpu"),
    "drain_timeout": Option("float", 30.0, min=0, max=_YEAR, doc="seconds a removed or stopping service may drain"),
    "pidfile": Option("path", None, doc="write the master's pid here"),
    "admin_socket": Option("path", None, doc="the admin Unix socket (default: derived from the config path)"),
    "log_level": Option("str", "info", choices=_LOG_LEVELS, doc="master and worker log level"),
    "tcp_migrate_req": Option("bool", False, doc="at start, set the network-wide sysctl "
                              "net.ipv4.tcp_migrate_req=1 (if permitted), so that a killed worker's "
                              "queued connections move to another worker instead of being reset"),
}

#: keys every service has, whatever its kind
COMMON_OPTIONS: dict[str, Option] = {
    "kind": Option("str", None, required=True, doc="the service kind: proxy or echo"),
    "listen": Option("str", None, required=True, doc="127.0.0.1:80, [::1]:80 or unix:/path"),
    "backlog": Option("int", 1024, min=1, max=65535, doc="listen backlog"),
}


@dataclass(frozen=True)
class ServiceKind:
    """A kind of service the config can declare: its options and how to build it.

    ``build`` gets the checked option values (defaults filled in, without
    the common keys) and returns the service factory; a ``ValueError`` it
    raises becomes a ``ConfigError`` naming the service.
    """

    name: str
    options: Mapping[str, Option]
    build: Callable[[dict[str, Any]], MakeService]
    doc: str = ""


def _build_echo(opts: dict[str, Any]) -> MakeService:
    return stack(EchoFactory(opts["greeting"].encode()),
                 LimitConnections(max_connections=opts["max_connections"]), CountConnections())


def _build_proxy(opts: dict[str, Any]) -> MakeService:
    from .proxy import ProxyFactory  # imported late: the proxy is optional for the echo-only case

    opts = dict(opts, upstreams=tuple(opts["upstreams"]))
    return stack(ProxyFactory(**opts), CountConnections())


ECHO = ServiceKind("echo", {
    "greeting": Option("str", "", doc="sent first on every connection (tells versions apart)"),
    "max_connections": Option("int", 10000, min=1, max=10_000_000, doc="open connections at most, over all workers"),
}, _build_echo, doc="echoes every byte back")

PROXY = ServiceKind("proxy", {
    "upstreams": Option("upstreams", None, required=True, doc="where to connect"),
    "balance": Option("str", "round_robin", choices=("round_robin", "random", "least_conn", "hash"),
                      doc="how to pick an upstream"),
    "connect_timeout": Option("float", 2.0, min=0, max=_YEAR, above=True, doc="seconds to connect upstream"),
    "idle_timeout": Option("float", 300.0, min=0, max=_YEAR, above=True, doc="close after this many idle seconds"),
    "max_connections": Option("int", 10000, min=1, max=10_000_000, doc="open client connections at most, over all workers"),
    "retries": Option("int", 2, min=0, max=100, doc="other upstreams to try when a connect fails"),
    "max_fails": Option("int", 3, min=0, max=1_000_000, doc="failures that mark an upstream down"),
    "fail_timeout": Option("float", 10.0, min=0, max=_YEAR, doc="seconds an upstream stays down"),
    "keepalive": Option("bool", False, doc="TCP keepalive on both sides"),
    "access_log": Option("bool", False, doc="log one line per connection"),
}, _build_proxy, doc="relays TCP to upstreams")

#: the service kinds ``kind = "..."`` may name
KINDS: dict[str, ServiceKind] = {"echo": ECHO, "proxy": PROXY}


def register_kind(kind: ServiceKind) -> None:
    """Add a service kind, for programs that embed hotproxy and for tests.

    The kind's factories must be importable by name in the worker processes
    (workers import the master's ``sys.path``).
    """
    KINDS[kind.name] = kind


# -- the checked config --------------------------------------------------------


@dataclass(frozen=True)
class RuntimeConfig:
    """The ``[runtime]`` table, checked, defaults filled in."""

    workers: int
    cpu_affinity: bool = False
    drain_timeout: float = 30.0
    pidfile: str | None = None
    admin_socket: str = ""
    log_level: str = "info"
    tcp_migrate_req: bool = False


@dataclass(frozen=True)
class ServiceConfig:
    """One ``[services.NAME]`` table, checked and built."""

    name: str
    kind: str
    listen: str
    listener: ListenerFactory
    factory: MakeService
    #: every option of the service with defaults filled in (for status and logs)
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def same_as(self, other: ServiceConfig) -> bool:
        """True if running *other* instead of this would change nothing."""
        return self.factory == other.factory and self.listener == other.listener


@dataclass(frozen=True)
class Config:
    """A whole checked config file."""

    #: the absolute path of the file, or None for the embedded default
    path: str | None
    runtime: RuntimeConfig
    services: Mapping[str, ServiceConfig]

    @property
    def source(self) -> str:
        """How messages name this config: its path or ``<embedded default>``."""
        return self.path or DEFAULT_SOURCE


# -- loading -------------------------------------------------------------------


def default_config_text() -> str:
    """The embedded default config (``hotproxy run`` without ``-c``)."""
    return resources.files("hotproxy").joinpath("default.toml").read_text(encoding="utf-8")


#: a config file larger than this is refused (a real one is a few KiB)
MAX_CONFIG_BYTES = 4 * 1024 * 1024


class NeedsLookup(Exception):
    """``load_config(lookups=False)`` met a host name: load it where blocking is fine."""


def load_config(path: str | None = None, *, lookups: bool = True) -> Config:
    """Read and check *path* (None: the embedded default); raise ``ConfigError``.

    With ``lookups=False`` a host name that is not an address literal raises
    ``NeedsLookup`` instead of being resolved (which may block on DNS), so
    a caller in an event loop can load an all-literal config inline and
    send the rest to a thread.
    """
    if path is None:
        return parse_config(default_config_text(), None, lookups=lookups)
    apath = os.path.abspath(path)
    try:
        # O_NONBLOCK: a FIFO given as the file must not hang the master's
        # reload waiting for a writer; only regular files are read, and only
        # up to MAX_CONFIG_BYTES (``-c /dev/zero`` must not eat the memory)
        fd = os.open(apath, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "it is a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ConfigError(f"{apath}: cannot read: {what}")
        data = b""
        while len(data) <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ConfigError(f"{apath}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{apath}: too large: more than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{apath}: not UTF-8 text (byte {exc.start})") from None
    return parse_config(text, apath, lookups=lookups)


def parse_config(text: str, path: str | None, *, lookups: bool = True) -> Config:
    """Check the TOML *text* of the file at *path* (None: the embedded default)."""
    return _Checker(path, lookups).check(text)


def default_admin_socket(path: str | None) -> str:
    """The admin socket of an instance started with config *path*, when the
    file does not set one: per user and per config file, so two instances
    with different files never meet, and ``hotproxy reload -c FILE`` finds
    the one started with ``-c FILE``."""
    key = os.path.abspath(path) if path else DEFAULT_SOURCE
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isabs(runtime_dir) and os.path.isdir(runtime_dir):
        return os.path.join(runtime_dir, f"hotproxy-{digest}.sock")
    return os.path.join(tempfile.gettempdir(), f"hotproxy-{os.getuid()}", f"{digest}.sock")


def admin_socket_for(path: str | None) -> str:
    """The admin socket to reach the instance started with *path*, even if the
    file is now broken (a reload of a broken file must still be able to ask
    the running instance, to be told it is broken)."""
    if path is None:
        return default_admin_socket(None)
    apath = os.path.abspath(path)
    try:
        fd = os.open(apath, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return default_admin_socket(apath)
            # at most what load_config reads: a huge file is still searched
            raw = os.read(fd, MAX_CONFIG_BYTES).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError:
        return default_admin_socket(apath)
    value: Any = None
    try:
        runtime = tomllib.loads(raw).get("runtime")
        if isinstance(runtime, dict):
            value = runtime.get("admin_socket")
    except tomllib.TOMLDecodeError:
        # best effort on a broken file: the first plain `admin_socket = "..."` line
        m = re.search(r'^\s*admin_socket\s*=\s*["\']([^"\']+)["\']', raw, re.M)
        value = m.group(1) if m else None
    if isinstance(value, str) and value:
        return _relative_to(value, apath)
    return default_admin_socket(apath)


def _relative_to(value: str, config_path: str | None) -> str:
    value = os.path.expanduser(value)
    if os.path.isabs(value) or config_path is None:
        return os.path.abspath(value)
    return os.path.normpath(os.path.join(os.path.dirname(config_path), value))


class _Checker:
    """Checks one file; ``fail`` raises the one-line ``ConfigError``."""

    def __init__(self, path: str | None, lookups: bool = True) -> None:
        self.path = path
        self.source = path or DEFAULT_SOURCE
        self.lookups = lookups

    def fail(self, key: str, expected: str) -> ConfigError:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        return ConfigError(where + expected)

    def check(self, text: str) -> Config:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise self.fail("", f"TOML syntax error: {exc}") from None
        for key in doc:
            if key not in ("runtime", "services"):
                raise self.fail(key, "unknown section (expected [runtime] or [services.NAME])")
        runtime = self.runtime(self.table(doc, "runtime"))
        services_doc = self.table(doc, "services")
        services: dict[str, ServiceConfig] = {}
        for name, table in services_doc.items():
            if not _NAME_RE.match(name):
                raise self.fail(f"services.{name}", "a service name is 1-64 letters, digits, '_', '-' or '.'")
            if not isinstance(table, dict):
                raise self.fail(f"services.{name}", f"expected a table [services.{name}], got {_tname(table)}")
            services[name] = self.service(name, table)
        self.check_listen_conflicts(services)
        return Config(self.path, runtime, services)

    def table(self, doc: dict[str, Any], key: str) -> dict[str, Any]:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table [{key}], got {_tname(value)}")
        return value

    def options(self, prefix: str, table: dict[str, Any], spec: Mapping[str, Option]) -> dict[str, Any]:
        """The values of *spec*'s keys in *table*, checked, defaults filled in."""
        for key in table:
            if key not in spec:
                known = ", ".join(spec)
                raise self.fail(f"{prefix}.{key}", f"unknown key (expected one of: {known})")
        out = {}
        for key, opt in spec.items():
            if key not in table:
                if opt.required:
                    raise self.fail(f"{prefix}.{key}", f"missing (expected {_expected(opt)})")
                out[key] = opt.default
                continue
            out[key] = self.value(f"{prefix}.{key}", table[key], opt)
        return out

    def value(self, key: str, value: Any, opt: Option) -> Any:
        t = opt.type
        if t == "bool":
            if not isinstance(value, bool):
                raise self.fail(key, f"expected true or false, got {_show(value)}")
            return value
        if t == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, f"expected an integer{_range(opt)}, got {_show(value)}")
            self.check_min(key, value, opt)
            return value
        if t == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise self.fail(key, f"expected a number{_range(opt)}, got {_show(value)}")
            self.check_min(key, value, opt)
            return float(value)
        if t in ("str", "path"):
            if not isinstance(value, str):
                raise self.fail(key, f"expected a string, got {_show(value)}")
            if opt.choices is not None:
                if value.lower() not in opt.choices:
                    raise self.fail(key, f"expected one of {', '.join(opt.choices)}, got {_show(value)}")
                return value.lower()
            if t == "path":
                if not value:
                    raise self.fail(key, "expected a path, got an empty string")
                return _relative_to(value, self.path)
            return value
        if t == "upstreams":
            return self.upstreams(key, value)
        raise AssertionError(f"unknown option type {t!r}")  # pragma: no cover - a bug in a spec

    def check_min(self, key: str, value: float, opt: Option) -> None:
        if opt.max is not None and value > opt.max:
            what = "an integer" if opt.type == "int" else "a number"
            raise self.fail(key, f"expected {what} <= {int(opt.max)}, got {_show(value)}")
        if opt.min is None:
            return
        if value < opt.min or (opt.above and value == opt.min):
            what = "an integer" if opt.type == "int" else "a number"
            raise self.fail(key, f"expected {what}{_range(opt)}, got {_show(value)}")

    def runtime(self, table: dict[str, Any]) -> RuntimeConfig:
        opts = self.options("runtime", table, RUNTIME_OPTIONS)
        if opts["workers"] is None:
            opts["workers"] = os.cpu_count() or 1
        if opts["admin_socket"] is None:
            opts["admin_socket"] = default_admin_socket(self.path)
        elif len(os.fsencode(opts["admin_socket"])) > 100:
            raise self.fail("runtime.admin_socket", "expected a path shorter than 100 bytes (a Unix socket limit)")
        return RuntimeConfig(**opts)

    def service(self, name: str, table: dict[str, Any]) -> ServiceConfig:
        prefix = f"services.{name}"
        kind_name = table.get("kind")
        if kind_name is None:
            raise self.fail(f"{prefix}.kind", f"missing (expected one of {', '.join(sorted(KINDS))})")
        kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            raise self.fail(f"{prefix}.kind", f"expected one of {', '.join(sorted(KINDS))}, "
                            f"got {_show(kind_name)}")
        opts = self.options(prefix, table, {**COMMON_OPTIONS, **kind.options})
        listener = self.listener(f"{prefix}.listen", opts.pop("listen"), opts["backlog"])
        backlog = opts.pop("backlog")
        del opts["kind"]
        try:
            factory = kind.build(dict(opts))
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.fail(prefix, f"invalid {kind.name} service: {exc}") from None
        except ImportError as exc:
            raise self.fail(f"{prefix}.kind", f"the {kind.name} service is not available: {exc}") from None
        return ServiceConfig(name, kind.name, listener.address, listener, factory, {"backlog": backlog, **opts})

    def listener(self, key: str, text: str, backlog: int) -> ListenerFactory:
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise self.fail(key, f"expected unix:/path, got {_show(text)}")
            path = _relative_to(path, self.path)
            if len(os.fsencode(path)) > 100:
                raise self.fail(key, "expected a socket path shorter than 100 bytes")
            return UnixListenerFactory(path, backlog=backlog)
        host, port = self.host_port(key, text, "listen address")
        if port == 0:
            raise self.fail(key, f"expected a port 1-65535, got {_show(text)} "
                                 "(port 0 would give each worker a different port)")
        self.resolve(key, host, port, passive=True)
        return TcpListenerFactory(host, port, backlog=backlog)

    def host_port(self, key: str, text: str, what: str) -> tuple[str, int]:
        try:
            return parse_host_port(text)
        except ValueError as exc:
            raise self.fail(key, f"bad {what}: {_strip_bad_address(exc)}") from None

    def upstreams(self, key: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"expected a non-empty list of addresses, got {_show(value)}")
        out = []
        for i, item in enumerate(value):
            ikey = f"{key}[{i}]"
            if not isinstance(item, str):
                raise self.fail(ikey, f"expected an address string, got {_show(item)}")
            if item.startswith("unix:"):
                if not item[5:]:
                    raise self.fail(ikey, f"expected unix:/path, got {_show(item)}")
                out.append("unix:" + _relative_to(item[5:], self.path))
                continue
            host, port = self.host_port(ikey, item, "upstream address")
            if port == 0:
                raise self.fail(ikey, f"expected a port 1-65535, got {_show(item)}")
            self.resolve(ikey, host, port, passive=False)
            out.append(item)
        return tuple(out)

    def resolve(self, key: str, host: str, port: int, passive: bool) -> tuple[Any, ...]:
        if not self.lookups and not _is_literal(host):
            raise NeedsLookup(host)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE if passive else 0)
        except (socket.gaierror, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
            raise self.fail(key, f"cannot resolve host {host!r}: {reason}") from None
        return infos[0][4]  # type: ignore[no-any-return]

    def check_listen_conflicts(self, services: Mapping[str, ServiceConfig]) -> None:
        """One service per address: with SO_REUSEPORT two services on one port
        would both bind and silently split its traffic, so it is caught here.
        A wildcard address (0.0.0.0, ::) overlaps every address of its family."""
        taken: list[tuple[tuple[Any, ...], str]] = []
        for name, svc in services.items():
            key = self.listen_key(name, svc.listener)
            for other_key, other in taken:
                if _overlap(key, other_key):
                    raise self.fail(f"services.{name}.listen",
                                    f"address {svc.listen} overlaps services.{other}.listen "
                                    f"({services[other].listen}); expected one service per address")
            taken.append((key, name))

    def listen_key(self, name: str, lf: ListenerFactory) -> tuple[Any, ...]:
        if isinstance(lf, UnixListenerFactory):
            return ("unix", os.path.realpath(lf.path))
        assert isinstance(lf, TcpListenerFactory)
        ip = str(self.resolve(f"services.{name}.listen", lf.host, lf.port, passive=True)[0])
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        return ("tcp", addr.version, lf.port, str(addr), addr.is_unspecified)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _overlap(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "unix":
        return bool(a[1] == b[1])
    # same family and port, and the same address or either a wildcard
    return bool(a[1:3] == b[1:3] and (a[3] == b[3] or a[4] or b[4]))


def _tname(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return _tname(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(opt: Option) -> str:
    if opt.min is None:
        return ""
    return f" > {opt.min:g}" if opt.above else f" >= {opt.min:g}"


def _expected(opt: Option) -> str:
    if opt.choices:
        return "one of " + ", ".join(opt.choices)
    return {"upstreams": "a list of addresses", "str": "a string", "path": "a path", "int": "an integer",
            "float": "a number", "bool": "true or false"}.get(opt.type, opt.type) + \
        (f" ({opt.doc})" if opt.doc else "")


def _strip_bad_address(exc: ValueError) -> str:
    text = str(exc)
    return text[len("bad address "):] if text.startswith("bad address ") else text


def describe_options() -> list[tuple[str, str, str, str]]:
    """(table, key, default, doc) for every key, for the README and ``--help``."""
    rows = []
    for key, opt in RUNTIME_OPTIONS.items():
        rows.append(("runtime", key, _default_text(opt), opt.doc))
    for key, opt in COMMON_OPTIONS.items():
        rows.append(("services.NAME", key, _default_text(opt), opt.doc))
    for kind in KINDS.values():
        for key, opt in kind.options.items():
            rows.append((f"services.NAME ({kind.name})", key, _default_text(opt), opt.doc))
    return rows


def _default_text(opt: Option) -> str:
    if opt.required:
        return "required"
    if opt.default is None:
        return "-"
    return _show(opt.default)


__all__ = [
    "COMMON_OPTIONS", "Config", "DEFAULT_SOURCE", "KINDS", "Option", "RUNTIME_OPTIONS", "RuntimeConfig",
    "ServiceConfig", "ServiceKind", "admin_socket_for", "default_admin_socket", "default_config_text",
    "describe_options", "load_config", "parse_config", "register_kind",
]
