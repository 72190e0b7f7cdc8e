"""Addresses as an operator writes them: ``host:port``, ``[v6addr]:port``, ``unix:/path``.

One parser for every place that reads one: listen addresses and upstreams in
the config loader, ``listeners.parse_address``, the proxy's upstreams, the
listen addresses ``hotproxy check`` reads from a running instance.

Rules of this module:

* ``unix:`` followed by a non-empty path is a Unix socket; the path is taken
  as it is (the config loader makes a relative one relative to its file).
* Anything else is ``host:port``; an IPv6 address is written in brackets.
  Host and port are ASCII, the port a decimal number 0-65535 matched whole
  (``str.isdigit`` would take full-width digits, which ``int`` reads).
  Port 0 parses: refusing it (a listener, an upstream) is the caller's rule.
* A bad address raises ``ValueError("bad address '...': expected ...")``.
* It imports no asyncio and nothing of hotproxy.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

#: what starts a Unix socket address
UNIX = "unix:"

_PORT_RE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Address:
    """One parsed address: TCP (``host`` and ``port``) or Unix (``path``)."""

    #: the address as written
    text: str
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return self.text


def parse(text: str) -> Address:
    """``"host:port"``, ``"[v6]:port"`` or ``"unix:/path"`` -> an ``Address``; ``ValueError`` if bad."""
    if not isinstance(text, str):
        raise ValueError(f"bad address {text!r}: expected a string")
    if text.startswith(UNIX):
        path = text[len(UNIX):]
        if not path:
            raise ValueError(f"bad address {text!r}: expected unix:/path")
        return Address(text, path=path)
    host, port = parse_host_port(text)
    return Address(text, host=host, port=port)


def parse_host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port), checked."""
    if not isinstance(text, str):
        raise ValueError(f"bad address {text!r}: expected a string 'host:port'")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ValueError(f"bad address {text!r}: expected '[v6addr]:port'")
        host, port_s = text[1:end], text[end + 2:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {text!r}: expected 'host:port'")
        if ":" in host:
            raise ValueError(f"bad address {text!r}: write IPv6 addresses as '[v6addr]:port'")
    # ASCII only, matched whole: str.isdigit() would take '２００２０' (and int()
    # read it as 20020), and a resolver maps full-width host names to ASCII
    if not _PORT_RE.fullmatch(port_s) or int(port_s) > 65535:
        raise ValueError(f"bad address {text!r}: port must be a number 0-65535")
    if not host.isascii():
        raise ValueError(f"bad address {text!r}: the host must be ASCII "
                         "(write an international name in its xn-- form)")
    return host, int(port_s)


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unix_address(path: str) -> str:
    """``unix:/path``."""
    return UNIX + path


def is_literal(host: str) -> bool:
    """True for an IP address (``127.0.0.1``, ``::1``, ``fe80::1%eth0``): no lookup needed."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


__all__ = ["UNIX", "Address", "format_host_port", "is_literal", "parse", "parse_host_port", "unix_address"]
