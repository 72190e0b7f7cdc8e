"""The config file: TOML in, checked ``Config`` values out.

Rules of this module:

* Loading never half-succeeds: ``load_config`` returns a complete ``Config``
  or raises one ``ConfigError`` whose message is a single line naming the
  file, the key and what was expected.  Nothing here touches a running
  instance -- the reload applies a ``Config`` after it has been built.
* Every key is declared once, in ``options`` (``RUNTIME_OPTIONS``,
  ``COMMON_OPTIONS`` and each ``ServiceKind``'s table), which the factories
  read too: a value this module accepts is one the factory accepts.  A key
  that is not declared is an error, so a typo never silently falls back to a
  default.
* What can be checked from the file alone is checked by ``load_config``:
  types and ranges, listen addresses (syntax, one service per address),
  upstream host names (they must resolve), paths that would clobber one
  another (a Unix listener or the pidfile on the config file or the admin
  socket), and proxies whose upstreams lead back to their own listen
  address (a loop that chains connections until the descriptors run out).
* What depends on the state of this host -- whether a port is free, a
  directory exists, a pidfile holds a pid -- is ``check_on_this_host``'s
  business (``hotproxy check``); a reload finds the same by binding.  It
  only looks: a probe socket is bound and closed, nothing is created or
  removed.
* Names and numbers are ASCII and matched whole; enumerated values (``kind``,
  ``balance``, ``log_level``) are exact lowercase words.
* A service's factory and listener factory are frozen dataclasses that
  compare by value; the reload diffs two configs with ``==`` on them.
* A reload loads with the running config as ``previous``: a service whose
  raw table (and file) is the same as the running one's, and that needed no
  name lookup, is that running ``ServiceConfig`` -- its own checks and
  build are skipped (they depend on nothing else); the checks across
  services run over all of them as always.  A service with a host name is
  looked up again at every load.
"""

from __future__ import annotations

import _socket
import errno
import functools
import gc
import ipaddress
import os
import re
import socket
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from . import addresses
from .echo import EchoFactory
from .errors import ConfigError, describe, one_line
from .listeners import ListenerFactory, TcpListenerFactory, UnixListenerFactory
from .options import (COMMON_OPTIONS, ECHO_OPTIONS, PROXY_OPTIONS, ROUTES_TABLE, RUNTIME_OPTIONS, UPSTREAM_OPTIONS,
                      Option, check_value, default_text, expected, lowercase_hint, show, type_name)
from .paths import DEFAULT_SOURCE, MAX_CONFIG_BYTES, admin_socket_for, default_admin_socket
from .paths import relative_to as _relative_to
from .service import LimitConnections, MakeService, stack

#: a service name, matched whole (``fullmatch``: ``$`` would accept a trailing newline)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


# -- service kinds (their options are declared in ``options``) -------------------


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
    #: ``build`` that names the factory too (``MakeService.named``), when
    #: that is cheaper than building and then naming: ``(name, options)``
    build_named: Callable[[str, dict[str, Any]], MakeService] | None = field(default=None, compare=False)


def _build_echo(opts: dict[str, Any]) -> MakeService:
    # the limit layer counts the connections it admits and refuses; the
    # site counts the open ones: each count is made (and reported) once
    return stack(EchoFactory(opts["greeting"].encode()), LimitConnections(max_connections=opts["max_connections"]))


def _build_proxy(opts: dict[str, Any]) -> MakeService:
    from .proxy import ProxyFactory  # imported late: the proxy is optional for the echo-only case

    # the proxy counts (and limits) its connections itself: no layer over it
    return ProxyFactory(**_proxy_args(opts))


def _build_proxy_named(name: str, opts: dict[str, Any]) -> MakeService:
    from .proxy import ProxyFactory

    # what ``_build_proxy(opts).named(name)`` gives, checked once instead of
    # twice (``named`` is a ``replace``, which checks every field again)
    return ProxyFactory(**_proxy_args(opts), service=name)


def _proxy_args(opts: dict[str, Any]) -> dict[str, Any]:
    """A proxy service's checked options as ``ProxyFactory``'s arguments."""
    return dict(opts, upstreams=tuple(opts["upstreams"]), sni_routes=opts["sni_routes"] or ())


ECHO = ServiceKind("echo", ECHO_OPTIONS, _build_echo, doc="echoes every byte back")

PROXY = ServiceKind("proxy", PROXY_OPTIONS, _build_proxy, doc="relays TCP to upstreams",
                    build_named=_build_proxy_named)

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
    cpu_affinity: bool = RUNTIME_OPTIONS["cpu_affinity"].default
    drain_timeout: float = RUNTIME_OPTIONS["drain_timeout"].default
    pidfile: str | None = RUNTIME_OPTIONS["pidfile"].default
    admin_socket: str = ""
    admin_idle_timeout: float = RUNTIME_OPTIONS["admin_idle_timeout"].default
    log_level: str = RUNTIME_OPTIONS["log_level"].default
    log_format: str = RUNTIME_OPTIONS["log_format"].default
    reload_timeout: float = RUNTIME_OPTIONS["reload_timeout"].default
    upgrade_timeout: float = RUNTIME_OPTIONS["upgrade_timeout"].default
    tcp_migrate_req: bool = RUNTIME_OPTIONS["tcp_migrate_req"].default
    #: the metrics endpoint's address (``ListenerFactory.address`` form), or None: off
    metrics: str | None = None
    #: a fleet (``fleet.py``): where the services come from, this instance's id,
    #: the host its shared TCP services listen on, its membership lease
    config_source: str | None = None
    instance_id: str | None = None
    listen_host: str | None = None
    fleet_lease_ttl: int = RUNTIME_OPTIONS["fleet_lease_ttl"].default
    #: TLS to etcd (``etcds://``): CA bundle, client certificate and key (absolute paths)
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None


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
    #: the ``[services.NAME]`` table as the file has it, and the file's path
    #: (relative paths in it are relative to that): what the factory and the
    #: listener are built from, so equal tables mean equal services
    table: tuple[str | None, Mapping[str, Any]] | None = field(default=None, compare=False, repr=False)
    #: nothing of it was looked up (every host an address literal): the next
    #: load of a file with the same table may take this one as it is
    #: (``load_config(previous=...)``) instead of checking and building it again
    reusable: bool = field(default=False, compare=False, repr=False)

    def same_as(self, other: ServiceConfig) -> bool:
        """True if running *other* instead of this would change nothing.

        The raw tables are compared first (one dict comparison, in C): a
        reload of 10,000 services leaves most of them unchanged, and
        comparing their built factories field by field is what an unchanged
        reload would cost otherwise.
        """
        if self is other:
            return True   # taken over by the load (``load_config(previous=...)``)
        if self.table is not None and self.table == other.table:
            return True
        return self.factory == other.factory and self.listener == other.listener


@dataclass(frozen=True)
class Config:
    """A whole checked config file."""

    #: the absolute path of the file, or None for the embedded default
    path: str | None
    runtime: RuntimeConfig
    services: Mapping[str, ServiceConfig]
    #: how many of ``services`` the load took from the running config as they
    #: were (same table, nothing looked up: ``load_config(previous=...)``)
    #: instead of checking and building them again
    reused: int = field(default=0, compare=False)
    #: this config's identity for a later load (``base``); a plain object, so
    #: that a config loaded against this one keeps nothing of it alive
    token: object = field(default_factory=object, compare=False, repr=False)
    #: the ``token`` of the config this one was loaded against (``previous``),
    #: or None; then every service not in ``fresh`` is that config's own
    #: ``ServiceConfig`` object (the reload's diff needs to look at ``fresh`` only)
    base: object | None = field(default=None, compare=False, repr=False)
    #: the services this load checked and built (not taken from ``base``), in file order
    fresh: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def source(self) -> str:
        """How messages name this config: its path or ``<embedded default>``."""
        return self.path or DEFAULT_SOURCE


# -- loading -------------------------------------------------------------------


def default_config_text() -> str:
    """The embedded default config (``hotproxy run`` without ``-c``)."""
    from importlib import resources   # here: only `run` without -c needs it, and it is slow to import

    return resources.files("hotproxy").joinpath("default.toml").read_text(encoding="utf-8")


class NeedsLookup(Exception):
    """``load_config(lookups=False)`` met a host name: load it where blocking is fine."""


def load_config(path: str | None = None, *, lookups: bool = True, previous: Config | None = None) -> Config:
    """Read and check *path* (None: the embedded default); raise ``ConfigError``.

    With ``lookups=False`` a host name that is not an address literal raises
    ``NeedsLookup`` instead of being resolved (which may block on DNS), so
    a caller in an event loop can load an all-literal config inline and
    send the rest to a thread.

    *previous*: the config that runs (a reload).  A service whose table is
    the same as there, in the same file, and which needed no name lookup,
    is taken from it as it is -- not checked and built again; the checks
    across services (addresses, paths, proxy loops) still cover every one.
    """
    if path is None:
        return parse_config(default_config_text(), None, lookups=lookups, previous=previous)
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
    return parse_config(text, apath, lookups=lookups, previous=previous)


def parse_config(text: str, path: str | None, *, lookups: bool = True, previous: Config | None = None) -> Config:
    """Check the TOML *text* of the file at *path* (None: the embedded default).

    Raises ``ConfigError`` (or ``NeedsLookup``) and nothing else: a failure
    no check foresaw still becomes one line naming the file, never a
    traceback in the CLI or an unretrieved exception in the master.
    """
    return _one_error(path, lambda: _Checker(path, lookups, previous).check(text))


def parse_config_doc(doc: dict[str, Any], path: str | None, source: str, *, lookups: bool = True) -> Config:
    """Check an already parsed TOML document (a fleet's: ``fleet.py`` joins
    the local ``[runtime]`` and the shared services); errors name *source*,
    relative paths are relative to *path*'s directory."""
    checker = _Checker(path, lookups)
    checker.source = source
    return _one_error(path, lambda: checker.check_doc(doc))


def _one_error(path: str | None, check: Callable[[], Config]) -> Config:
    """``check()``; anything it did not foresee becomes one ``ConfigError`` line naming the file.

    The cyclic garbage collector is off meanwhile: a file of 10,000 services
    makes some 400,000 objects, none of them garbage in a cycle, and the
    full collections their allocation triggers walk every object of the
    process again and again (in the CLI's ``check``, and in a master whose
    running config is not frozen yet: 1.4 s of a 2.0 s load in one
    measurement).  It is on again when the load ends, if it was before.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return check()
    except (ConfigError, NeedsLookup):
        raise
    except RecursionError:
        raise ConfigError(f"{path or DEFAULT_SOURCE}: nested too deeply to read") from None
    except Exception as exc:
        raise ConfigError(f"{path or DEFAULT_SOURCE}: cannot load: {describe(exc, typed=True)}") from exc
    finally:
        if was_enabled:
            gc.enable()


def no_services_error(source: str, hint: str) -> ConfigError:
    """The error for a config without services: it would stop serving everything,
    which is refused unless asked for on purpose (*hint* says how)."""
    return ConfigError(f"{source}: no services (expected at least one [services.NAME] table; "
                       f"a config that serves nothing is only accepted on purpose: {hint})")


class _Checker:
    """Checks one file; ``fail`` raises the one-line ``ConfigError``."""

    def __init__(self, path: str | None, lookups: bool = True, previous: Config | None = None) -> None:
        self.path = path
        self.source = path or DEFAULT_SOURCE
        self.lookups = lookups
        #: the running config's services, reused when their table is the same (``load_config``)
        self.previous: Mapping[str, ServiceConfig] = previous.services if previous is not None else {}
        #: the running config's ``token`` (``Config.base``)
        self.base: object | None = previous.token if previous is not None else None
        #: (host, port, passive) -> getaddrinfo's answer (a host is looked up once per file)
        self._infos: dict[tuple[str, int, bool], list[Any]] = {}
        #: host -> whether it is an address literal (``addresses.is_literal``)
        self._literal: dict[str, bool] = {}
        #: set when a host name (not a literal) is resolved: the service being
        #: checked depends on a lookup, and is not ``reusable``
        self.looked_up = False
        #: service name -> its listen key (see ``listen_key``)
        self._listen_keys: dict[str, tuple[Any, ...]] = {}
        #: id(spec) -> (spec, defaults, required keys, order) (``plan``)
        self._plans: dict[int, tuple[Mapping[str, Option], dict[str, Any], tuple[str, ...], dict[str, int]]] = {}
        #: service name -> its upstreams with their keys (``upstream_keys``)
        self._upstream_keys: dict[str, list[tuple[str, str]]] = {}
        #: the listen keys by ``_bucket`` (built on first use, after every key is known)
        self._by_bucket: dict[tuple[Any, ...], list[tuple[str, tuple[Any, ...]]]] | None = None
        #: ``runtime.metrics`` as a listener factory (None: off)
        self.metrics_listener: ListenerFactory | None = None
        #: address -> whether this host has it (wildcard listeners are reached through it)
        self._local: dict[str, bool] = {}
        #: kind name -> its keys with the common ones (``spec``)
        self._specs: dict[str, Mapping[str, Option]] = {}
        #: address literal -> (version, text, unspecified) a bind of it uses (``listen_key``)
        self._facts: dict[str, tuple[int, str, bool]] = {}
        #: an echo's options -> its built factory (``service``)
        self._echoes: dict[tuple[tuple[str, Any], ...], MakeService] = {}
        #: address literal -> the addresses a connect to it reaches (``reached_by``)
        self._reach: dict[str, set[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}

    def fail(self, key: str, expected: str) -> ConfigError:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        # one line whatever the file holds: a key with a newline is shown escaped
        return ConfigError(one_line(where + expected))

    def check(self, text: str) -> Config:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise self.fail("", f"TOML syntax error: {exc}") from None
        except RecursionError:
            raise self.fail("", "arrays or tables nested too deeply to read "
                                "(more than a few hundred levels)") from None
        except ValueError as exc:
            # int() refuses integers longer than sys.get_int_max_str_digits()
            if "digits" in str(exc):
                raise self.fail("", f"an integer too long to read (more than {sys.get_int_max_str_digits()} "
                                    "digits)") from None
            raise self.fail("", f"cannot parse: {exc}") from None
        return self.check_doc(doc)

    def check_doc(self, doc: dict[str, Any]) -> Config:
        for key in doc:
            if key not in ("runtime", "services"):
                raise self.fail(key, "unknown section (expected [runtime] or [services.NAME])")
        runtime = self.runtime(self.table(doc, "runtime"))
        services_doc = self.table(doc, "services")
        services: dict[str, ServiceConfig] = {}
        reused = 0
        fresh: list[str] = []
        for name, table in services_doc.items():
            if not _NAME_RE.fullmatch(name):
                raise self.fail(f"services.{name}", "a service name is 1-64 letters, digits, '_', '-' or '.'")
            if not isinstance(table, dict):
                raise self.fail(f"services.{name}", f"expected a table [services.{name}], got {type_name(table)}")
            before = self.previous.get(name)
            # the same table in the same file, nothing looked up: the same
            # service (a reload of 10,000 that changes one checks one)
            if before is not None and before.reusable and before.table is not None \
                    and before.table[0] == self.path and before.table[1] == table \
                    and _same_types(before.table[1], table):
                services[name] = before
                reused += 1
            else:
                services[name] = self.service(name, table)
                fresh.append(name)
        self.check_listen_conflicts(services)
        self.check_paths(runtime, services)
        self.check_proxy_loops(services)
        return Config(self.path, runtime, services, reused, base=self.base, fresh=tuple(fresh))

    def table(self, doc: dict[str, Any], key: str) -> dict[str, Any]:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table [{key}], got {type_name(value)}")
        return value

    def options(self, prefix: str, table: dict[str, Any], spec: Mapping[str, Option]) -> dict[str, Any]:
        """The values of *spec*'s keys in *table*, checked, defaults filled in.

        The defaults come as one dict copy; only the keys the table has (and
        the required ones it lacks) are looked at, in *spec*'s order, so the
        first error is the one a walk over every key would find first (a
        proxy has ~25 keys, a table sets 2 or 3: 10,000 services).
        """
        for key in table:
            if key not in spec:
                known = ", ".join(spec)
                raise self.fail(f"{prefix}.{key}", f"unknown key (expected one of: {known})")
        defaults, required, order = self.plan(spec)
        out = dict(defaults)
        keys = [key for key in required if key not in table]
        keys += table
        if len(keys) > 1:
            keys.sort(key=order.__getitem__)
        for key in keys:
            opt = spec[key]
            if key not in table:
                raise self.fail(f"{prefix}.{key}", f"missing (expected {expected(opt)})")
            if opt.type == "upstreams" and table[key] == [] and table.get("sni_routes"):
                out[key] = ()   # sni routing without a default: names that match no route are closed
                continue
            out[key] = self.value(f"{prefix}.{key}", table[key], opt)
        return out

    def plan(self, spec: Mapping[str, Option]) -> tuple[dict[str, Any], tuple[str, ...], dict[str, int]]:
        """(every key's default in order, the required keys, key -> its place) of *spec*, once per file."""
        found = self._plans.get(id(spec))
        if found is None or found[0] is not spec:
            found = self._plans[id(spec)] = (spec, {key: opt.default for key, opt in spec.items()},
                                             tuple(key for key, opt in spec.items() if opt.required),
                                             {key: i for i, key in enumerate(spec)})
        return found[1], found[2], found[3]

    def value(self, key: str, value: Any, opt: Option) -> Any:
        if opt.type == "upstreams":
            return self.upstreams(key, value)
        if opt.type == "routes":
            return self.sni_routes(key, value)
        if opt.type == "table" and isinstance(value, dict) and opt.fields is not None:
            # each key named in full: services.NAME.health_check.rise
            return self.options(key, value, opt.fields)
        try:
            value = check_value(value, opt)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None
        return _relative_to(value, self.path) if opt.type == "path" else value

    def runtime(self, table: dict[str, Any]) -> RuntimeConfig:
        opts = self.options("runtime", table, RUNTIME_OPTIONS)
        if opts["workers"] is None:
            opts["workers"] = os.cpu_count() or 1
        if opts["admin_socket"] is None:
            opts["admin_socket"] = default_admin_socket(self.path)
        elif len(os.fsencode(opts["admin_socket"])) > 100:
            raise self.fail("runtime.admin_socket", "expected a path shorter than 100 bytes (a Unix socket limit)")
        if opts["metrics"] is not None:
            self.metrics_listener = self.listener("runtime.metrics", opts["metrics"], 64)
            opts["metrics"] = self.metrics_listener.address
        return RuntimeConfig(**opts)

    def service(self, name: str, table: dict[str, Any]) -> ServiceConfig:
        prefix = f"services.{name}"
        kind_name = table.get("kind")
        if kind_name is None:
            raise self.fail(f"{prefix}.kind", f"missing (expected one of {', '.join(sorted(KINDS))})")
        kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            raise self.fail(f"{prefix}.kind", f"expected one of {', '.join(sorted(KINDS))}"
                            f"{lowercase_hint(kind_name, KINDS)}, got {show(kind_name)}")
        self.looked_up = False
        opts = self.options(prefix, table, self.spec(kind))
        listener = self.listener(f"{prefix}.listen", opts.pop("listen"), opts["backlog"])
        backlog = opts.pop("backlog")
        del opts["kind"]
        try:
            if kind is ECHO:
                factory = self.echo(name, opts)
            elif kind.build_named is not None:
                factory = kind.build_named(name, dict(opts))
            else:
                factory = kind.build(dict(opts)).named(name)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.fail(prefix, f"invalid {kind.name} service: {exc}") from None
        except ImportError as exc:
            raise self.fail(f"{prefix}.kind", f"the {kind.name} service is not available: {exc}") from None
        return ServiceConfig(name, kind.name, listener.address, listener, factory, {"backlog": backlog, **opts},
                             (self.path, table), reusable=not self.looked_up)

    def echo(self, name: str, opts: dict[str, Any]) -> MakeService:
        """An echo service's factory.  Equal options build equal factories
        (frozen, immutable), and one the name leaves as it is (``named``
        returns itself) is built once per file and shared: 5,000 echoes of
        one greeting are one build, not 5,000 (``hotproxy check``)."""
        key = tuple(opts.items())
        try:
            factory = self._echoes.get(key)
        except TypeError:   # an unhashable value: built every time
            return ECHO.build(dict(opts)).named(name)
        if factory is None:
            built = ECHO.build(dict(opts))
            factory = built.named(name)
            if factory is built:
                self._echoes[key] = factory
        return factory

    def spec(self, kind: ServiceKind) -> Mapping[str, Option]:
        """Every key a service of *kind* may have (the common ones first); one dict per kind and file."""
        spec = self._specs.get(kind.name)
        if spec is None:
            spec = self._specs[kind.name] = {**COMMON_OPTIONS, **kind.options}
        return spec

    def listener(self, key: str, text: str, backlog: int) -> ListenerFactory:
        addr = self.address(key, text, "listen address")
        if addr.path is not None:
            path = _relative_to(addr.path, self.path)
            if len(os.fsencode(path)) > 100:
                raise self.fail(key, "expected a socket path shorter than 100 bytes")
            return UnixListenerFactory(path, backlog=backlog)
        assert addr.host is not None and addr.port is not None
        if addr.port == 0:
            raise self.fail(key, f"expected a port 1-65535, got {show(text)} "
                                 "(port 0 would give each worker a different port)")
        self.resolve(key, addr.host, addr.port, passive=True)
        return TcpListenerFactory(addr.host, addr.port, backlog=backlog)

    def address(self, key: str, text: str, what: str) -> addresses.Address:
        """*text* parsed (``addresses.parse``); a bad one fails naming *key*."""
        try:
            return addresses.parse(text)
        except ValueError as exc:
            if text.startswith(addresses.UNIX):
                raise self.fail(key, f"expected unix:/path, got {show(text)}") from None
            raise self.fail(key, f"bad {what}: {_strip_bad_address(exc)}") from None

    def upstreams(self, key: str, value: Any) -> tuple[str | dict[str, Any], ...]:
        """The checked upstreams: an address string as it is (a Unix path made
        absolute); a table (``UPSTREAM_OPTIONS``) as a dict with every key,
        its address checked the same way."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"expected a non-empty list of addresses, got {show(value)}")
        out: list[str | dict[str, Any]] = []
        for i, item in enumerate(value):
            ikey = f"{key}[{i}]"
            if isinstance(item, dict):
                opts = self.options(ikey, item, UPSTREAM_OPTIONS)
                opts["address"] = self.upstream_address(f"{ikey}.address", opts["address"])
                out.append(opts)
                continue
            if not isinstance(item, str):
                raise self.fail(ikey, f"expected an address string or a table, got {show(item)}")
            out.append(self.upstream_address(ikey, item))
        return tuple(out)

    def sni_routes(self, key: str, value: Any) -> tuple[tuple[str, tuple[str | dict[str, Any], ...]], ...]:
        """The checked ``sni_routes``: ``(name, upstreams)`` pairs, each name
        lower-cased and listed once, each group checked as ``upstreams``."""
        from .clienthello import route_name

        if not isinstance(value, dict):
            raise self.fail(key, f"expected {ROUTES_TABLE}, got {show(value)}")
        if not value:
            raise self.fail(key, "expected at least one route (an empty table: leave sni_routes out)")
        out: list[tuple[str, tuple[str | dict[str, Any], ...]]] = []
        seen: dict[str, str] = {}
        for name, ups in value.items():
            rkey = f'{key}."{name}"'
            try:
                norm = route_name(name)
            except ValueError as exc:
                raise self.fail(rkey, str(exc)) from None
            if norm in seen:
                raise self.fail(rkey, f"the same name as \"{seen[norm]}\" (names compare without case); "
                                      "expected each name once")
            seen[norm] = name
            out.append((norm, self.upstreams(rkey, ups)))
        return tuple(out)

    def upstream_address(self, key: str, item: str) -> str:
        """One upstream address, checked (and resolved, if lookups are on)."""
        addr = self.address(key, item, "upstream address")
        if addr.path is not None:
            return addresses.unix_address(_relative_to(addr.path, self.path))
        assert addr.host is not None and addr.port is not None
        if addr.port == 0:
            raise self.fail(key, f"expected a port 1-65535, got {show(item)}")
        self.resolve(key, addr.host, addr.port, passive=False)
        return item

    def resolve(self, key: str, host: str, port: int, passive: bool) -> tuple[Any, ...]:
        """The address a bind (passive) or a connect uses: getaddrinfo's first."""
        return self.resolve_all(key, host, port, passive)[0][4]  # type: ignore[no-any-return]

    def resolve_all(self, key: str, host: str, port: int, passive: bool) -> list[Any]:
        literal = self._literal.get(host)
        if literal is None:
            literal = self._literal[host] = addresses.is_literal(host)
        if not literal:
            self.looked_up = True
            if not self.lookups:
                raise NeedsLookup(host)
        cached = self._infos.get((host, port, passive))
        if cached is not None:
            return cached
        try:
            # (an address literal is looked up once, whatever the port: ``_addrinfo``)
            infos = _addrinfo(host, port, passive)
        except (socket.gaierror, UnicodeError) as exc:
            raise self.fail(key, f"cannot resolve host {host!r}: {describe(exc)}") from None
        self._infos[(host, port, passive)] = infos
        return infos

    def check_listen_conflicts(self, services: Mapping[str, ServiceConfig]) -> None:
        """One service per address: with SO_REUSEPORT two services on one port
        would both bind and silently split its traffic, so it is caught here.
        A wildcard address (0.0.0.0, ::) overlaps every address of its family."""
        # Only keys in one bucket (a Unix path; a family and port) can
        # overlap: each service is compared with its bucket, not with all
        # (10,000 services: 10,000 comparisons, not 50 million).
        taken: dict[tuple[Any, ...], list[tuple[tuple[Any, ...], str]]] = {}
        if self.metrics_listener is not None:
            # (not a service: it never enters _listen_keys or the loop graph)
            metrics = self.listen_key("runtime.metrics", self.metrics_listener)
        for name, svc in services.items():
            key = self.listen_key(name, svc.listener)
            self._listen_keys[name] = key
            same = taken.setdefault(_bucket(key), [])
            for other_key, other in same:
                if _overlap(key, other_key):
                    raise self.fail(f"services.{name}.listen",
                                    f"address {svc.listen} overlaps services.{other}.listen "
                                    f"({services[other].listen}); expected one service per address")
            if self.metrics_listener is not None and _overlap(key, metrics):
                raise self.fail(f"services.{name}.listen", f"address {svc.listen} overlaps runtime.metrics "
                                f"({self.metrics_listener.address})")
            same.append((key, name))

    def listen_key(self, name: str, lf: ListenerFactory) -> tuple[Any, ...]:
        if isinstance(lf, UnixListenerFactory):
            return ("unix", os.path.realpath(lf.path))
        assert isinstance(lf, TcpListenerFactory)
        # an address literal's facts are the same whatever the port: one
        # look-up per host and file, not one per service
        facts = self._facts.get(lf.host)
        if facts is None:
            ip = str(self.resolve(f"services.{name}.listen", lf.host, lf.port, passive=True)[0])
            facts = _ip_facts(ip.split("%", 1)[0])
            if self._literal.get(lf.host):
                self._facts[lf.host] = facts
        version, text, unspecified = facts
        return ("tcp", version, lf.port, text, unspecified)

    def check_paths(self, runtime: RuntimeConfig, services: Mapping[str, ServiceConfig]) -> None:
        """No file hotproxy creates may be one it reads or another it creates:
        a Unix listener on the config file or the admin socket, a pidfile
        that is the config file (``run`` would overwrite it with a pid).  A
        proxy to the admin socket would hand its control to every client."""
        own: dict[str, str] = {}
        if self.path is not None:
            own[os.path.realpath(self.path)] = "the config file itself"
        admin = os.path.realpath(runtime.admin_socket)
        own.setdefault(admin, "the admin socket (runtime.admin_socket)")
        if runtime.pidfile is not None:
            pidfile = os.path.realpath(runtime.pidfile)
            if pidfile in own:
                raise self.fail("runtime.pidfile", f"{runtime.pidfile} is {own[pidfile]}; "
                                                   "expected a file of its own")
            own[pidfile] = "the pidfile (runtime.pidfile)"
        for name, svc in services.items():
            if isinstance(svc.listener, UnixListenerFactory):
                real = os.path.realpath(svc.listener.path)
                if real in own:
                    raise self.fail(f"services.{name}.listen", f"{svc.listen} is {own[real]}; "
                                                                "expected a socket path of its own")
            for key, up in self.upstream_keys(name, svc):
                if not up.startswith(addresses.UNIX):
                    continue   # (a TCP upstream: no path to compare)
                path = addresses.parse(up).path
                if path is not None and os.path.realpath(path) == admin:
                    raise self.fail(key, f"{up} is the admin socket: its clients could stop this hotproxy")

    def check_proxy_loops(self, services: Mapping[str, ServiceConfig]) -> None:
        """Refuse a proxy whose upstreams lead back to its own listen address.

        A graph with an edge from each service with upstreams to every
        service of this file whose listen address one of them reaches; any
        cycle (a self-loop included) would have each connection open another
        to itself until the descriptors run out.  A proxy in front of
        another service of the file (an echo, or a proxy that leads
        elsewhere) is fine.
        """
        edges: dict[str, list[tuple[str, str, str]]] = {}
        for name, svc in services.items():
            out = []
            for key, up in self.upstream_keys(name, svc):
                out += [(key, up, target) for target in self.reached_by(key, up, services)]
            edges[name] = out
        # depth first, in file order; reaching a node on the current path closes a loop
        done: set[str] = set()
        for root in services:
            if root in done:
                continue
            path = [root]
            via: list[tuple[str, str]] = []          # via[i]: the upstream from path[i] to path[i + 1]
            todo = [iter(edges[root])]
            while todo:
                step = next(todo[-1], None)
                if step is None:
                    done.add(path.pop())
                    todo.pop()
                    if via:
                        via.pop()
                    continue
                key, up, target = step
                if target in path:
                    start = path.index(target)
                    self.loop_error(path[start:], (via[start:] + [(key, up)])[0], services)
                if target not in done:
                    path.append(target)
                    via.append((key, up))
                    todo.append(iter(edges[target]))

    def loop_error(self, loop: list[str], first: tuple[str, str], services: Mapping[str, ServiceConfig]) -> None:
        key, up = first
        names = " -> ".join(loop + [loop[0]])
        if len(loop) == 1:
            raise self.fail(key, f"{up!r} leads back to this proxy's own listen address "
                                 f"({services[loop[0]].listen}): a proxy loop ({names}) would chain "
                                 "connections until the file descriptors run out; expected an upstream "
                                 "that is not this proxy")
        raise self.fail(key, f"{up!r} reaches services.{loop[1]} ({services[loop[1]].listen}), whose upstreams "
                             f"lead back to this proxy: a proxy loop ({names}) would chain connections until "
                             "the file descriptors run out; expected upstreams that leave the loop")

    def upstream_keys(self, name: str, svc: ServiceConfig) -> list[tuple[str, str]]:
        """``_upstream_keys`` of a service, worked out once per file (the path
        and the loop checks both walk them)."""
        keys = self._upstream_keys.get(name)
        if keys is None:
            keys = self._upstream_keys[name] = _upstream_keys(name, svc)
        return keys

    def reached_by(self, key: str, upstream: str, services: Mapping[str, ServiceConfig]) -> list[str]:
        """The services of this file whose listen address a connection to *upstream* reaches."""
        addr = addresses.parse(upstream)
        if addr.path is not None:
            real = os.path.realpath(addr.path)
            return [name for name, _ in self.listeners_on(("unix", real))]
        host, port = addr.host, addr.port
        assert host is not None and port is not None
        # (an address literal reaches the same addresses whatever the port)
        addrs = self._reach.get(host)
        if addrs is None:
            addrs = {_plain_ip(info[4][0]) for info in self.resolve_all(key, host, port, passive=False)}
            if self._literal.get(host):
                self._reach[host] = addrs
        found: list[str] = []
        for version in sorted({a.version for a in addrs}):
            found += [name for name, lk in self.listeners_on(("tcp", version, port))
                      if any(self.reaches(a, port, lk) for a in addrs)]
        return found

    def listeners_on(self, bucket: tuple[Any, ...]) -> list[tuple[str, tuple[Any, ...]]]:
        """The (service, listen key) pairs of one ``_bucket`` (the index is built once per file)."""
        if self._by_bucket is None:
            self._by_bucket = {}
            for name, lk in self._listen_keys.items():
                self._by_bucket.setdefault(_bucket(lk), []).append((name, lk))
        return self._by_bucket.get(bucket, [])

    def reaches(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, lk: tuple[Any, ...]) -> bool:
        """Does a connect(2) to *addr*:*port* land on the listener of listen key *lk*?"""
        _, version, lport, laddr, wildcard = lk
        if port != lport or addr.version != version:
            return False
        if wildcard:
            # 0.0.0.0:P / [::]:P (IPV6_V6ONLY) takes every local address of its family
            return addr.is_unspecified or addr.is_loopback or self.is_local(addr)
        if addr.is_unspecified:
            # Linux connects 0.0.0.0 to 127.0.0.1 and :: to ::1
            addr = _ip("127.0.0.1" if version == 4 else "::1")
        return addr == _ip(laddr)

    def is_local(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True if *addr* is an address of this host (it can be bound with port 0)."""
        text = str(addr)
        if text not in self._local:
            family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
            try:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.bind((text, 0))
                self._local[text] = True
            except OSError:
                self._local[text] = False
        return self._local[text]


def _upstreams(svc: ServiceConfig) -> tuple[str, ...]:
    """The checked ``upstreams`` of a service (a proxy's), or () for a kind without them."""
    ups = svc.options.get("upstreams")
    if not isinstance(ups, tuple):
        return ()
    addrs = tuple(u["address"] if isinstance(u, dict) else u for u in ups)
    return addrs if all(isinstance(u, str) for u in addrs) else ()


def _upstream_keys(name: str, svc: ServiceConfig) -> list[tuple[str, str]]:
    """Every upstream of a service with the key that names it: ``upstreams``'
    and each ``sni_routes`` group's (``services.NAME.sni_routes."a.example"[0]``)."""
    out = [(f"services.{name}.upstreams[{i}]", up) for i, up in enumerate(_upstreams(svc))]
    routes = svc.options.get("sni_routes")
    if isinstance(routes, tuple):
        for route, ups in routes:
            for i, u in enumerate(ups):
                addr = u["address"] if isinstance(u, dict) else u
                if isinstance(addr, str):
                    out.append((f'services.{name}.sni_routes."{route}"[{i}]', addr))
    return out


def _same_types(a: Any, b: Any) -> bool:
    """For two equal TOML values: is every number and boolean of the same type?

    Python's ``==`` has ``True == 1 == 1.0``; TOML's values do not (``retries
    = 2.0`` or ``= true`` is refused where ``2`` is fine), so a table equal
    to a checked one is only the same table if this holds too.  Strings,
    the common case, are skipped without a call.
    """
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        for key, value in a.items():
            if type(value) is not str and not _same_types(value, b[key]):
                return False
    elif type(a) is list:
        for x, y in zip(a, b):
            if type(x) is not str and not _same_types(x, y):
                return False
    return True


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``ipaddress.ip_address(text)``, remembered: 10,000 services on one
    address parse it once (the addresses are immutable values)."""
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=4096)
def _ip_facts(text: str) -> tuple[int, str, bool]:
    """(version, normal text, is unspecified) of an IP address (remembered, like ``_ip``)."""
    addr = _ip(text)
    return addr.version, str(addr), addr.is_unspecified


@functools.lru_cache(maxsize=4096)
def _plain_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address from getaddrinfo without its scope; IPv4-mapped IPv6 as the IPv4 it reaches."""
    addr = _ip(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _bucket(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """Listen keys that can overlap share a bucket: a Unix path, or a TCP family and port."""
    return key[:2] if key[0] == "unix" else key[:3]


def _overlap(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "unix":
        return bool(a[1] == b[1])
    # same family and port, and the same address or either a wildcard
    return bool(a[1:3] == b[1:3] and (a[3] == b[3] or a[4] or b[4]))


def _strip_bad_address(exc: ValueError) -> str:
    text = str(exc)
    return text[len("bad address "):] if text.startswith("bad address ") else text


# -- checks against this host (``hotproxy check``; a start or a reload finds the same) --


#: (host, passive) -> getaddrinfo's answer for an address literal with port 0
#: (``_addrinfo``); literals only, so it never goes stale
_LITERALS: dict[tuple[str, bool], list[Any]] = {}


def _addrinfo(host: str, port: int, passive: bool = True) -> list[Any]:
    """``socket.getaddrinfo(host, port, SOCK_STREAM)``; an address literal's
    answer is computed once and given the port (10,000 listeners on one
    address are not 10,000 calls); raises what getaddrinfo raises."""
    flags = socket.AI_PASSIVE if passive else 0
    infos = _LITERALS.get((host, passive))
    if infos is None:
        if len(_LITERALS) >= 1024 or not addresses.is_literal(host):
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
        infos = _LITERALS[(host, passive)] = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=flags)
    return [info[:4] + ((info[4][0], port) + tuple(info[4][2:]),) for info in infos]


def listen_sockaddrs(lf: TcpListenerFactory) -> set[tuple[Any, ...]]:
    """The (address, port) a bind of *lf* uses, as a set (empty if it does not resolve)."""
    try:
        infos = _addrinfo(lf.host, lf.port)
    except (OSError, UnicodeError):
        return set()
    return {info[4][:2] for info in infos[:1]}


def probe_bind(lf: TcpListenerFactory) -> str | None:
    """None if *lf*'s address can be bound without SO_REUSEPORT, else why not.

    Our workers bind with SO_REUSEPORT, which another program of the same
    user may also have set: then their binds would succeed and the port's
    traffic would be split with a stranger.  A plain bind fails on any
    listener, so it tells; the probe socket is closed at once.
    """
    try:
        infos = _addrinfo(lf.host, lf.port)
        family, _, _, _, sockaddr = infos[0]
        # ``_socket.socket``: the C type under ``socket.socket``, without its
        # Python-level constructor and context manager (10,000 probes)
        probe = _socket.socket(family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR: sockets in TIME_WAIT (of a listener that just moved) are no conflict
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(sockaddr)
        finally:
            probe.close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "address already in use"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "not an address of this host"
        return exc.strerror or str(exc)
    except UnicodeError as exc:
        return str(exc)
    return None


def inspect_pidfile(path: str) -> tuple[str | None, int | None]:
    """(why hotproxy must not write its pid to *path* or None, the pid it holds or None).

    A pidfile may be absent (in a directory that exists) or a regular file
    holding a process id and nothing else.  Anything else -- text (the
    config file, a README), a symlink, a directory -- is not hotproxy's to
    overwrite, and so not to delete either.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            return f"directory {parent} does not exist", None
        return None, None
    except OSError as exc:
        return exc.strerror or str(exc), None
    if not stat.S_ISREG(st.st_mode):
        return "exists and is not a regular file; refusing to replace it", None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            data = os.read(fd, 65)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc.strerror or str(exc), None
    text = data.strip()
    if len(data) > 64 or not re.fullmatch(rb"[0-9]{1,10}", text) or int(text) == 0:
        return ("exists and does not hold a process id; refusing to overwrite it "
                "(remove it if it is a stale pidfile)"), None
    return None, int(text)


def check_on_this_host(config: Config, held: Iterable[str] = (), running_pid: int | None = None) -> list[str]:
    """What starting or reloading *config* on this host would refuse: one line each.

    *held* are the listen addresses of the running instance of this same
    file (``status``): a reload keeps or moves them, so they count as free;
    *running_pid* is its pid (its pidfile holds it).  Every other TCP
    address is bind-probed as a reload does; a Unix listen path needs a
    directory that exists, and a live socket there is in use; the admin
    socket's directory must exist (the per-user default one is created on
    demand); the pidfile is inspected as the master does.  Nothing is
    created or removed.
    """
    source = config.source
    problems: list[str] = []
    held_tcp: set[tuple[Any, ...]] = set()
    held_unix: set[str] = set()
    for text in held:
        try:
            addr = addresses.parse(text)
        except ValueError:
            continue
        if addr.path is not None:
            held_unix.add(os.path.realpath(addr.path))
        elif addr.host is not None and addr.port is not None:
            held_tcp |= listen_sockaddrs(TcpListenerFactory(addr.host, addr.port))
    # the runtime first: a start fails on them before any listener
    error: str | None = _admin_socket_problem(config.runtime.admin_socket)
    if error is not None:
        problems.append(f"{source}: runtime.admin_socket: {config.runtime.admin_socket}: {error}")
    if config.runtime.pidfile is not None:
        error, pid = inspect_pidfile(config.runtime.pidfile)
        if error is None and pid is not None and pid != running_pid and pid_alive(pid):
            error = f"names the live process {pid} (another hotproxy?)"
        if error is not None:
            problems.append(f"{source}: runtime.pidfile: {config.runtime.pidfile}: {error}")
    for name, svc in config.services.items():
        lf = svc.listener
        error = None
        if isinstance(lf, TcpListenerFactory):
            if not held_tcp or not listen_sockaddrs(lf) & held_tcp:
                error = probe_bind(lf)
        elif isinstance(lf, UnixListenerFactory):
            error = _unix_listen_problem(lf.path, os.path.realpath(lf.path) in held_unix)
        if error is not None:
            problems.append(f"{source}: services.{name}.listen: cannot listen on {lf.address}: {error}")
    return problems


def _unix_listen_problem(path: str, held: bool) -> str | None:
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"directory {parent} does not exist"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot create a socket in {parent}: permission denied"
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISSOCK(st.st_mode):
        return "the path exists and is not a socket"
    if not held and _live_socket(path):
        return "in use by a live listener"
    return None   # a socket left by a dead process is replaced


def _admin_socket_problem(path: str) -> str | None:
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        if os.path.basename(parent) == f"hotproxy-{os.getuid()}" and not os.path.lexists(parent):
            return None   # our per-user default directory: created at start
        return f"directory {parent} does not exist"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink; hotproxy refuses to use it"
    if not stat.S_ISSOCK(st.st_mode):
        return "exists and is not a socket"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by us"
    return None


def _live_socket(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True


def pid_alive(pid: int) -> bool:
    """True if process *pid* exists (even if it is not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_options() -> list[tuple[str, str, str, str]]:
    """(table, key, default, doc) for every key, for the README and ``--help``."""
    rows = []
    for key, opt in RUNTIME_OPTIONS.items():
        rows.append(("runtime", key, default_text(opt), opt.doc))
    for key, opt in COMMON_OPTIONS.items():
        rows.append(("services.NAME", key, default_text(opt), opt.doc))
    for kind in KINDS.values():
        for key, opt in kind.options.items():
            rows.append((f"services.NAME ({kind.name})", key, default_text(opt), opt.doc))
            for sub, sub_opt in (opt.fields or {}).items():
                rows.append((f"services.NAME ({kind.name})", f"{key}.{sub}", default_text(sub_opt), sub_opt.doc))
    for key, opt in UPSTREAM_OPTIONS.items():
        rows.append(("services.NAME.upstreams[i] (a table)", key, default_text(opt), opt.doc))
    return rows


__all__ = [
    "COMMON_OPTIONS", "Config", "DEFAULT_SOURCE", "KINDS", "Option", "RUNTIME_OPTIONS", "RuntimeConfig",
    "ServiceConfig", "ServiceKind", "admin_socket_for", "check_on_this_host", "default_admin_socket",
    "default_config_text", "describe_options", "inspect_pidfile", "listen_sockaddrs", "load_config",
    "no_services_error", "parse_config", "pid_alive", "probe_bind", "register_kind",
]
