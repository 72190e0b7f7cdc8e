"""systemd socket activation: listening sockets passed to the master at start.

systemd (a ``.socket`` unit) binds the listen addresses itself and starts
hotproxy with them open from descriptor 3 on, saying so in the environment
(``sd_listen_fds(3)``): ``LISTEN_PID`` (the pid they are for: ours, else they
are not), ``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES`` (their names,
``:``-separated; only logged here).  A service whose listen address is the
address of one of them (``getsockname``: the same IP and port, or the same
Unix path) is served on that socket instead of one hotproxy binds, so the
connections queued on it before hotproxy started are served, not refused.

The master keeps every passed socket for its whole life, used or not (a
reload that adds a service on its address uses it then; one that removes the
service leaves it listening, as systemd does), shares it with its workers as
it shares the Unix sockets it binds (``sharedsockets``), and hands it over to
the new master on an upgrade.  The variables are removed from the
environment once read, so no process started later takes them as its own.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Any

from .addresses import format_host_port, unix_address

log = logging.getLogger("hotproxy.activation")

#: the first descriptor systemd passes (``SD_LISTEN_FDS_START``)
LISTEN_FDS_START = 3
#: more than this many passed descriptors is not believed (a garbled variable)
MAX_LISTEN_FDS = 4096

#: a listen address as both sides of a match see it: ("tcp", ip, port) or ("unix", path)
Key = tuple[Any, ...]


def listen_fds(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """The listening stream sockets systemd passed to this process, in order.

    Empty when none were passed or they are another process's (``LISTEN_PID``
    is not ours).  The three variables are removed from *environ*
    (``os.environ``) in every case.  A descriptor that is not a listening
    stream socket is left alone, with a warning.
    """
    env: Any = os.environ if environ is None else environ
    pid, count, names = (env.pop(k, None) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
        if not 0 <= n <= MAX_LISTEN_FDS:
            raise ValueError(count)
    except ValueError:
        log.warning("socket activation: LISTEN_PID=%s LISTEN_FDS=%s are not numbers: no socket taken", pid, count)
        return []
    labels = names.split(":") if names else []
    out: list[socket.socket] = []
    for i, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + n)):
        label = labels[i] if i < len(labels) else str(fd)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("socket activation: descriptor %d (%s) is not a socket (%s): ignored", fd, label, exc)
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 0
        if sock.type != socket.SOCK_STREAM or not listening:
            log.warning("socket activation: descriptor %d (%s) is not a listening stream socket: ignored", fd, label)
            sock.detach()
            continue
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        log.info("socket activation: descriptor %d (%s) listens on %s", fd, label, address_of(sock))
        out.append(sock)
    return out


def key_of(sock: socket.socket) -> Key | None:
    """What *sock* is bound to, as ``key_of_address`` sees a listen address."""
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):
            name = name.decode(errors="surrogateescape")
        return ("unix", name) if name and not name.startswith("\0") else None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return ("tcp", ipaddress.ip_address(name[0].split("%")[0]).compressed, int(name[1]))
    return None


def key_of_sockaddr(sockaddr: tuple[Any, ...]) -> Key:
    """The key of a TCP bind address (``getaddrinfo``'s sockaddr)."""
    return ("tcp", ipaddress.ip_address(str(sockaddr[0]).split("%")[0]).compressed, int(sockaddr[1]))


def address_of(sock: socket.socket) -> str:
    """*sock*'s address as a config writes it (``127.0.0.1:80``, ``unix:/p``), or ``?``."""
    key = key_of(sock)
    if key is None:
        return "?"
    if key[0] == "unix":
        return unix_address(key[1])
    return format_host_port(key[1], key[2])


__all__ = ["Key", "LISTEN_FDS_START", "address_of", "key_of", "key_of_sockaddr", "listen_fds"]
