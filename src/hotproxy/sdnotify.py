"""The systemd notify protocol, spoken directly: datagrams to ``$NOTIFY_SOCKET``.

Under ``Type=notify`` systemd waits for ``READY=1`` before it calls the
service started, shows ``STATUS=`` in ``systemctl status``, treats
``RELOADING=1`` ... ``READY=1`` as a reload in progress (systemd 253's
``Type=notify-reload`` needs ``MONOTONIC_USEC=`` with it), ``STOPPING=1``
as a stop in progress, and, with ``WatchdogSec=``, restarts a service that
stops sending ``WATCHDOG=1``.  No library is needed: each message is one
datagram of ``KEY=value`` lines on a Unix socket (a path, or an abstract
name written with a leading ``@``).

Without ``NOTIFY_SOCKET`` (not run by systemd) every call does nothing.  A
send that fails is logged once and never raised: systemd's bookkeeping
must not take the proxy down.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("hotproxy.systemd")


class Notifier:
    """Sends notify messages to the socket named by ``NOTIFY_SOCKET`` in *env*."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        path = env.get("NOTIFY_SOCKET") or ""
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        self._failed = False
        #: seconds between WATCHDOG=1 pings (None: no watchdog asked for, or not for us)
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2   # ping twice per period, as sd_watchdog_enabled advises

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        """One datagram of *lines* (``"READY=1"``, ``"STATUS=..."``)."""
        if not self.address:
            return
        data = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"),
                            exc.strerror or exc)
                self._failed = True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self, status: str = "reloading") -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


__all__ = ["Notifier"]
