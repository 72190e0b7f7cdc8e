"""A closing listener hands its queued connections to its siblings.

Every worker binds its own socket on a TCP service's address with
``SO_REUSEPORT``; the kernel spreads new connections over the sockets of
that group.  When one of them closes -- an upgrade's old worker stops
accepting, a worker exits or is killed, a reload replaces a listener --
the connections still queued on it (handshake done, not yet accepted) and
the ones half-way through their handshake on it are *reset*, unless the
kernel may migrate them to another socket of the group.  Accepting what is
queued before ``close()`` (``BoundListener.close``) narrows that window but
cannot shut it: a handshake can complete between the last ``accept()`` and
``close()``.

Linux (5.14 and later) migrates them when the group carries an eBPF
program of type ``BPF_PROG_TYPE_SK_REUSEPORT`` loaded for
``BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`` (or when the sysctl
``net.ipv4.tcp_migrate_req`` is 1, for every group of the network
namespace).  Ours is two instructions -- ``return SK_PASS`` -- so the kernel
keeps choosing a socket by the connection's hash, as without a program, and
on a close it migrates to a socket chosen the same way: the program only
says "migration allowed".  A program is the group's, not one socket's;
every worker attaches it to each listener it binds, so a group that lives
across an upgrade (old and new workers' sockets) carries it throughout.

The program goes on a socket once it listens: on a socket bound but not
listening yet, the attach makes it a group of its own, and the next
worker's ``listen()`` on the address fails with "address in use".

Loading a program needs ``CAP_BPF`` (or ``CAP_SYS_ADMIN``).  Without it
nothing fails: ``status()`` says why, the master logs it once at start, and
hotproxy serves as before -- with the sysctl set, the kernel migrates
anyway.  ``HOTPROXY_NO_REUSEPORT_PROGRAM=1`` turns the program off (to
measure without it).

Rules of this module:

* Never raises: ``attach()`` returns whether the program is on the socket.
* One program per process, loaded on first use and kept (its descriptor is
  close-on-exec); a forked child loads its own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from typing import Any

#: ``__NR_bpf`` by machine (``os.uname().machine``)
_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
#: ``BPF_PROG_LOAD``, ``BPF_PROG_TYPE_SK_REUSEPORT``, ``BPF_SK_REUSEPORT_SELECT_OR_MIGRATE``
_PROG_LOAD, _PROG_TYPE_SK_REUSEPORT, _ATTACH_SELECT_OR_MIGRATE = 5, 21, 40
#: ``BPF_F_...`` none; ``SO_ATTACH_REUSEPORT_EBPF`` (``SOL_SOCKET``)
SO_ATTACH_REUSEPORT_EBPF = 52
#: ``r0 = SK_PASS (1); exit`` -- two ``struct bpf_insn`` (code, dst/src regs, offset, imm)
_PROGRAM = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)
#: the ``union bpf_attr`` prefix ``BPF_PROG_LOAD`` reads, up to ``expected_attach_type``
_ATTR_SIZE = 72
_NAME = b"hotproxy_migr"
SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"

#: (pid, program fd or None, why not) -- per process: a child loads its own
_loaded: tuple[int, int | None, str | None] | None = None


def _load() -> tuple[int | None, str | None]:
    if os.environ.get("HOTPROXY_NO_REUSEPORT_PROGRAM") == "1":
        return None, "turned off by HOTPROXY_NO_REUSEPORT_PROGRAM=1"
    nr = _SYSCALL_BPF.get(os.uname().machine)
    if nr is None:
        return None, f"no bpf() system call number known for {os.uname().machine}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:   # pragma: no cover - a libc is always there on Linux
        return None, f"no libc: {exc}"
    insns = ctypes.create_string_buffer(_PROGRAM, len(_PROGRAM))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, _PROG_TYPE_SK_REUSEPORT, len(_PROGRAM) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_))
    attr[48:48 + len(_NAME)] = _NAME   # prog_name: what `bpftool prog` shows
    struct.pack_into("<I", attr, 68, _ATTACH_SELECT_OR_MIGRATE)
    buf = (ctypes.c_char * _ATTR_SIZE).from_buffer(attr)
    # syscall(2) is variadic and reads each argument as a long: pass longs
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(_PROG_LOAD), buf, ctypes.c_long(_ATTR_SIZE))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            return None, f"loading an eBPF program needs CAP_BPF ({os.strerror(err)})"
        if err == errno.EINVAL:
            return None, "the kernel cannot migrate a closing listener's connections (Linux 5.14 or later can)"
        return None, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}"
    os.set_inheritable(fd, False)
    return fd, None


def program() -> tuple[int | None, str | None]:
    """This process's program descriptor, or (None, why it cannot have one)."""
    global _loaded
    if _loaded is None or _loaded[0] != os.getpid():
        fd, why = _load()
        _loaded = (os.getpid(), fd, why)
    return _loaded[1], _loaded[2]


def sysctl_on() -> bool:
    """Whether ``net.ipv4.tcp_migrate_req`` migrates for every group already."""
    try:
        with open(SYSCTL, encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def attach(sock: Any) -> bool:
    """Put the program on *sock*'s reuseport group (a TCP socket with
    ``SO_REUSEPORT``, bound or not); False if it cannot be (the reason is
    ``status()``'s)."""
    fd, _ = program()
    if fd is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("i", fd))
    except OSError:
        return False
    return True


def status() -> str | None:
    """None when a closing listener's connections migrate (the program, or
    the sysctl); else one line saying why not and what it costs."""
    fd, why = program()
    if fd is not None or sysctl_on():
        return None
    return (f"a closing listener's queued connections cannot move to its siblings: {why}; "
            f"a connection arriving as a worker's listener closes (upgrade, worker exit) may be reset "
            f"(give hotproxy CAP_BPF, or set net.ipv4.tcp_migrate_req = 1)")


__all__ = ["SO_ATTACH_REUSEPORT_EBPF", "attach", "program", "status", "sysctl_on"]
