"""A closing listener's queued connections move to its siblings (``reuseport``).

Every worker binds its own ``SO_REUSEPORT`` socket per TCP service; when
one closes with connections queued on it (a worker killed, an upgrade's old
worker stopping), the kernel resets them -- unless the group carries the
migration program ``reuseport`` attaches.  Here two sockets of one group,
connections queued on both, one closed: the other accepts them all
(without the program, and with ``net.ipv4.tcp_migrate_req`` at 0, about
half are reset).  The same through real workers, one killed -9 with its
queue full: ``test_reliability.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import free_port
from hotproxy import reuseport
from hotproxy.listeners import TcpListenerFactory

needs_migration = pytest.mark.skipif(
    reuseport.status() is not None and os.environ.get("HOTPROXY_REQUIRE_PEERS") != "1",
    reason=f"{reuseport.status()}")


@needs_migration
def test_connections_queued_on_a_closed_listener_are_accepted_by_its_sibling() -> None:
    port = free_port()
    factory = TcpListenerFactory("127.0.0.1", port)
    first, second = factory.bind(), factory.bind()
    try:
        for bound in (first, second):
            bound.sock.listen(128)   # as BoundListener.listen does, then:
            assert reuseport.attach(bound.sock)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]
        first.sock.close()   # 60 handshakes done, none accepted: ~half were queued here
        second.sock.settimeout(5)
        served = []
        for _ in clients:
            conn, peer = second.sock.accept()
            served.append(peer)
            conn.close()
        assert sorted(served) == sorted(c.getsockname() for c in clients)
        for c in clients:
            c.close()
    finally:
        second.sock.close()


def test_the_program_can_be_turned_off_and_says_why() -> None:
    env = dict(os.environ, HOTPROXY_NO_REUSEPORT_PROGRAM="1")
    code = ("from hotproxy import reuseport; import socket; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); s.bind(('127.0.0.1', 0)); s.listen(); "
            "print(reuseport.attach(s)); print(reuseport.program()[1])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["False", "turned off by HOTPROXY_NO_REUSEPORT_PROGRAM=1"], out
