"""Every option hotproxy has, declared once: type, default, range, choices, doc.

The config loader (``config.py``) checks a file's keys against these tables,
and the factories that the keys become (``ProxyFactory``, ``EchoFactory``,
``LimitConnections``) take their defaults from them and check their fields
with the same ``check_value``: a value the file may hold is exactly a value
the factory accepts, and both say what is wrong in the same words.

Rules of this module:

* One ``Option`` per fact.  A key two kinds share (``max_connections``) is
  one object in both tables.
* ``check_value`` returns the value (a float option turns an integer into a
  float) or raises ``ValueError("expected ..., got ...")``; the caller puts
  the key (and the file) in front, so the message stays one line.
* What needs more than the value -- a path relative to the config file, a
  host name that must resolve, an upstream listed twice -- is the caller's
  business; ``upstreams`` and ``path`` are only named here.
* It imports nothing of hotproxy and no asyncio, so ``hotproxy check`` and
  ``--keys`` read it as cheaply as a table.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class Option:
    """One option: its type, default and limits.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``, ``path`` (a
    non-empty string; the config loader takes a relative one relative to the
    file's directory), ``upstreams`` (a non-empty list of ``host:port`` /
    ``[v6]:port`` / ``unix:/path``; see ``config`` and ``proxy``), ``routes`` (a
    table of server name -> ``upstreams``; see ``config`` and ``proxy``), ``table``
    (an inline table of the keys ``fields`` declares, each checked by its
    own ``Option``; the default None: absent, off), ``networks`` (a
    non-empty list of IP networks, ``"127.0.0.1/32"``; checked here, given
    as a tuple).
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
    #: a ``table``'s keys
    fields: Mapping[str, Option] | None = None


#: the upper bound of every duration (seconds)
YEAR = 365 * 24 * 3600

#: the log levels ``log_level`` accepts
LOG_LEVELS = ("debug", "info", "warning", "error")

#: what ``sni_routes`` must be (the config loader and ``ProxyFactory`` say it in these words)
ROUTES_TABLE = 'a table { "a.example" = ["host:port", ...], ... }'

#: the balancing policies ``balance`` accepts (``proxy._Balancer`` has one ``_choose_*`` each)
BALANCE_POLICIES = ("round_robin", "random", "least_conn", "hash")


RUNTIME_OPTIONS: dict[str, Option] = {
    "workers": Option("int", None, min=1, max=1024, doc="worker processes (default: CPU count)"),
    "cpu_affinity": Option("bool", False, doc="pin worker i to CPU i mod ncpu"),
    "drain_timeout": Option("float", 30.0, min=0, max=YEAR, doc="seconds a removed or stopping service may drain"),
    "pidfile": Option("path", None, doc="write the master's pid here"),
    "admin_socket": Option("path", None, doc="the admin Unix socket (default: derived from the config path)"),
    "admin_idle_timeout": Option("float", 10.0, min=0, max=YEAR, above=True,
                                 doc="seconds an admin connection may stay without sending a complete request"),
    "log_level": Option("str", "info", choices=LOG_LEVELS, doc="master and worker log level"),
    "log_format": Option("str", "text", choices=("text", "json"),
                         doc="text, or json: one JSON object per line (applies on reload)"),
    "metrics": Option("str", None, doc="serve Prometheus metrics on GET /metrics at this address "
                      "(host:port, [v6]:port or unix:/path; default: off; restart to change)"),
    "reload_timeout": Option("float", 10.0, min=0, max=YEAR, above=True,
                             doc="seconds a worker may stay silent during a reload before it is killed "
                                 "and restarted (a reload that keeps making progress is never cut short)"),
    "upgrade_timeout": Option("float", 60.0, min=0, max=YEAR, above=True,
                              doc="seconds a new master started by hotproxy upgrade may take to serve "
                                  "before it is killed and the running one serves on"),
    "tcp_migrate_req": Option("bool", False, doc="at start, set the network-wide sysctl "
                              "net.ipv4.tcp_migrate_req=1 (if permitted), so that a killed worker's "
                              "queued connections move to another worker instead of being reset"),
    # a fleet (fleet.py): these stay in each instance's local file
    "config_source": Option("str", None, doc="etcd://HOST:PORT[,HOST:PORT]/PREFIX: the services come from "
                            "etcd, applied fleet-wide by hotproxy fleet apply (default: this file)"),
    "instance_id": Option("str", None, doc="this instance's id in its fleet (default: the host name and "
                          "the admin socket path)"),
    "listen_host": Option("str", None, doc="in a fleet: the host every shared TCP service listens on here, "
                          "instead of the host its listen key names"),
    "fleet_lease_ttl": Option("int", 5, min=2, max=3600, doc="seconds an instance that stopped answering "
                              "etcd stays a fleet member"),
    "etcd_ca": Option("path", None, doc="with an etcds:// config_source: the CA certificates (PEM) that "
                      "etcd's certificate must chain to (default: the system's)"),
    "etcd_cert": Option("path", None, doc="with etcds://: this instance's client certificate (PEM), for an "
                        "etcd started with --client-cert-auth (with etcd_key)"),
    "etcd_key": Option("path", None, doc="with etcds://: the private key (PEM) of etcd_cert"),
}

#: keys every service has, whatever its kind
COMMON_OPTIONS: dict[str, Option] = {
    "kind": Option("str", None, required=True, doc="the service kind: proxy or echo"),
    "listen": Option("str", None, required=True, doc="127.0.0.1:80, [::1]:80 or unix:/path"),
    "backlog": Option("int", 1024, min=1, max=65535, doc="listen backlog"),
}

#: a service's open connections over the whole instance (the echo's limit layer, the proxy)
MAX_CONNECTIONS = Option("int", 10000, min=1, max=10_000_000,
                         doc="open connections at most, over all workers and versions (more are closed at once)")

ECHO_OPTIONS: dict[str, Option] = {
    "greeting": Option("str", "", doc="sent first on every connection (tells versions apart)"),
    "max_connections": MAX_CONNECTIONS,
}

#: the keys of a proxy service's ``health_check = { ... }`` (``health.HealthCheck``)
HEALTH_CHECK_OPTIONS: dict[str, Option] = {
    "interval": Option("float", 2.0, min=0.01, max=YEAR, doc="seconds between two checks of an upstream"),
    "timeout": Option("float", 1.0, min=0, max=YEAR, above=True,
                      doc="seconds a check may take: connect, send, and the expected reply"),
    "rise": Option("int", 2, min=1, max=1_000_000, doc="passing checks in a row that bring a down upstream up"),
    "fall": Option("int", 3, min=1, max=1_000_000, doc="failing checks in a row that take an upstream down"),
    "send": Option("str", "", max=4096, doc="written after connecting (UTF-8; TOML escapes like \\r\\n)"),
    "expect": Option("str", "", max=4096, doc="the reply must start with these bytes (UTF-8; empty: connecting is enough)"),
}

PROXY_OPTIONS: dict[str, Option] = {
    "upstreams": Option("upstreams", None, required=True,
                        doc="where to connect: addresses, or tables (see UPSTREAM_OPTIONS)"),
    "balance": Option("str", "round_robin", choices=BALANCE_POLICIES,
                      doc="how to pick an upstream: smooth weighted round robin, weighted random, "
                          "weighted least connections, or hash (consistent, by client IP)"),
    "connect_timeout": Option("float", 2.0, min=0, max=YEAR, above=True, doc="seconds per connect attempt"),
    "idle_timeout": Option("float", 300.0, min=0, max=YEAR,
                           doc="close a connection with no traffic either way for this many seconds (0: never)"),
    "max_connections": MAX_CONNECTIONS,
    "retries": Option("int", 2, min=0, max=100, doc="other upstreams to try when a connect is refused or times out"),
    "max_fails": Option("int", 3, min=0, max=1_000_000,
                        doc="consecutive connect failures that eject an upstream (0: never)"),
    "fail_timeout": Option("float", 10.0, min=0, max=YEAR, above=True,
                           doc="seconds an ejected upstream gets no connections"),
    "keepalive": Option("bool", False, doc="TCP keepalive on both sides"),
    "access_log": Option("bool", False, doc="log one line per closed connection (the hotproxy.access logger)"),
    "health_check": Option("table", None, fields=HEALTH_CHECK_OPTIONS,
                           doc="active checks, run once per instance: { interval, timeout, rise, fall, send, "
                               "expect } (default: off, passive checks only)"),
    "send_proxy": Option("str", "off", choices=("off", "v1", "v2"),
                         doc="write a PROXY protocol header of this version to the upstream before any "
                             "client byte, with the client's address (or the one accept_proxy received)"),
    "accept_proxy": Option("bool", False, doc="every client must start with a PROXY protocol header "
                           "(v1 or v2); its address is the client's for logs, hash and send_proxy"),
    "proxy_from": Option("networks", ("127.0.0.1/32", "::1/128"),
                         doc="with accept_proxy, the networks of the peers that may send a header "
                             "(others are closed at once; a Unix socket's peers always may)"),
    "proxy_timeout": Option("float", 5.0, min=0, max=YEAR, above=True,
                            doc="with accept_proxy, seconds a client has to send its whole header"),
    "sni_routes": Option("routes", None,
                         doc="route TLS by the ClientHello's server name, without terminating it: "
                             "{ \"a.example\" = [upstreams], \"*.example\" = [...] }; exact name, then the "
                             "longest *.suffix (any depth), then upstreams (may be [] : close) (default: off)"),
    "sni_timeout": Option("float", 5.0, min=0, max=YEAR, above=True,
                          doc="with sni_routes, seconds a client has to send its whole ClientHello"),
}


#: the keys of an upstream written as a table, ``{ address = "...", weight = 3, ... }``
#: (a plain string is the address with every default)
UPSTREAM_OPTIONS: dict[str, Option] = {
    "address": Option("str", None, required=True, doc="host:port, [v6]:port or unix:/path"),
    "weight": Option("int", 1, min=1, max=256, doc="its share of the connections, relative to the others'"),
    "backup": Option("bool", False, doc="gets connections only when no primary (non-backup) upstream is "
                                        "available (all down, ejected or at their max_connections)"),
    "max_connections": Option("int", 0, min=0, max=10_000_000,
                              doc="open connections to it at most, over all workers and versions (0: no limit)"),
}


def check_value(value: Any, opt: Option) -> Any:
    """*value* checked against *opt* (an int given for a float option becomes a
    float); ``ValueError("expected ..., got ...")`` if it does not fit.

    ``upstreams`` values are left to the caller (only their container is a
    matter of type: see ``config`` and ``proxy``).
    """
    t = opt.type
    if t == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {show(value)}")
        return value
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer{_range(opt)}, got {show(value)}")
        _check_range(value, opt)
        return value
    if t == "float":
        # NaN compares false with every bound: refused here; inf by ``max``
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"expected a number{_range(opt)}, got {show(value)}")
        _check_range(value, opt)
        return float(value)
    if t in ("str", "path"):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {show(value)}")
        if opt.choices is not None and value not in opt.choices:
            raise ValueError(f"expected one of {', '.join(opt.choices)}{lowercase_hint(value, opt.choices)}, "
                             f"got {show(value)}")
        if t == "path" and not value:
            raise ValueError("expected a path, got an empty string")
        if opt.max is not None and len(value.encode()) > opt.max:
            raise ValueError(f"expected at most {int(opt.max)} bytes, got {len(value.encode())}")
        return value
    if t == "table":
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(f"expected an inline table {{ key = value, ... }}, got {show(value)}")
        fields = opt.fields or {}
        out = {}
        for key in value:
            if key not in fields:
                raise ValueError(f"{key}: unknown key (expected one of: {', '.join(fields)})")
        for key, field_opt in fields.items():
            try:
                out[key] = check_value(value[key], field_opt) if key in value else field_opt.default
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return out
    if t in ("upstreams", "routes"):
        return value
    if t == "networks":
        return _networks(value)
    raise AssertionError(f"unknown option type {t!r}")  # pragma: no cover - a bug in a table


def _networks(value: Any) -> tuple[str, ...]:
    # a non-empty list of IP networks, each exactly as written (no host bits)
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError("expected at least one network like \"127.0.0.1/32\", got an empty array")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of networks like \"127.0.0.1/32\", got {show(value)}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ValueError(f"[{i}]: expected a network like \"127.0.0.1/32\", got {show(text)}")
        error = _network_error(text)
        if error is not None:
            raise ValueError(f"[{i}]: expected a network like \"127.0.0.1/32\", got {show(text)} ({error})")
    return tuple(value)


@functools.lru_cache(maxsize=1024)
def _network_error(text: str) -> str | None:
    # remembered: every proxy checks its proxy_from, most of them the default
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        return str(exc)
    return None


def check_fields(obj: Any, options: Mapping[str, Option], skip: Iterable[str] = ()) -> None:
    """Check the attributes of *obj* (a factory) named like *options*' keys;
    ``ValueError("key: expected ..., got ...")`` for the first that does not fit.

    A value that is the option's default object is valid without a check
    (most of a factory's fields are: 10,000 proxies check their other keys
    only)."""
    for key, opt in options.items():
        if key in skip:
            continue
        value = getattr(obj, key)
        if value is opt.default:
            continue
        try:
            check_value(value, opt)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None


def _check_range(value: float, opt: Option) -> None:
    what = "an integer" if opt.type == "int" else "a number"
    if opt.max is not None and value > opt.max:
        raise ValueError(f"expected {what} <= {int(opt.max)}, got {show(value)}")
    if opt.min is not None and (value < opt.min or (opt.above and value == opt.min)):
        raise ValueError(f"expected {what}{_range(opt)}, got {show(value)}")


def _range(opt: Option) -> str:
    if opt.min is None:
        return ""
    return f" > {opt.min:g}" if opt.above else f" >= {opt.min:g}"


def lowercase_hint(value: Any, choices: Iterable[str]) -> str:
    """`` (lowercase)`` when *value* differs from one of *choices* only in case (one rule: exact lowercase)."""
    if isinstance(value, str) and value.lower() in choices:
        return " (lowercase)"
    return ""


def expected(opt: Option) -> str:
    """What a missing *opt* should have been, for "missing (expected ...)"."""
    if opt.choices:
        return "one of " + ", ".join(opt.choices)
    return {"upstreams": "a list of addresses", "routes": "a table of server names", "networks": "a list of networks", "table": "a table",
            "str": "a string", "path": "a path", "int": "an integer",
            "float": "a number", "bool": "true or false"}.get(opt.type, opt.type) + \
        (f" ({opt.doc})" if opt.doc else "")


def type_name(value: Any) -> str:
    """How a TOML value's type is called in messages: "a table", "an integer" ..."""
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def show(value: Any) -> str:
    """*value* as a message shows it: TOML's words for booleans, tables and
    arrays by their type, anything else by its (shortened) repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return type_name(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def default_text(opt: Option) -> str:
    """The default as ``--keys`` and the README show it."""
    if opt.required:
        return "required"
    if opt.default is None:
        return "-"
    if isinstance(opt.default, tuple):
        return "[" + ", ".join(f'"{v}"' for v in opt.default) + "]"
    return show(opt.default)


__all__ = [
    "BALANCE_POLICIES", "COMMON_OPTIONS", "ECHO_OPTIONS", "HEALTH_CHECK_OPTIONS", "LOG_LEVELS", "MAX_CONNECTIONS",
    "Option", "PROXY_OPTIONS", "ROUTES_TABLE", "RUNTIME_OPTIONS", "UPSTREAM_OPTIONS", "YEAR", "check_fields", "check_value",
    "default_text", "expected", "lowercase_hint", "show", "type_name",
]
