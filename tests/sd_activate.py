"""Start ``hotproxy`` the way systemd's socket activation does (``sd_listen_fds(3)``).

``python -m sd_activate ARGS...`` with ``SD_ACTIVATE_FDS="7,9"`` (descriptors
this process inherited) and optionally ``SD_ACTIVATE_NAMES="a:b"``: moves the
descriptors to 3, 4, ... in that order, sets ``LISTEN_FDS``,
``LISTEN_FDNAMES`` and ``LISTEN_PID`` (this process's pid, which ``exec``
keeps), and execs ``python -m hotproxy.cli ARGS...``.
"""

from __future__ import annotations

import fcntl
import os
import sys


def main() -> None:
    fds = [int(f) for f in os.environ.pop("SD_ACTIVATE_FDS").split(",") if f]
    names = os.environ.pop("SD_ACTIVATE_NAMES", None)
    # out of the way first: a source may sit where another one goes
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_PID"] = str(os.getpid())
    if names is not None:
        os.environ["LISTEN_FDNAMES"] = names
    os.execv(sys.executable, [sys.executable, "-m", "hotproxy.cli", *sys.argv[1:]])


if __name__ == "__main__":
    main()
