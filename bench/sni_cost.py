"""The per-connection cost of SNI routing, in instructions (run under callgrind).

One process holds everything, as ``bench/test_relay.py`` does: an echo
upstream, a proxy service (``--sni``: with ``sni_routes``, the name of the
ClientHello picks the route; without, a plain proxy to the same upstream)
on the chosen core, and a client that opens *N* connections one after the
other, each sending a real ClientHello (made once by Python's ``ssl``),
reading it back through the proxy and closing.  The connections are
sequential so the work per connection is the same every run.

Instructions, not wall clock (the machine is shared)::

    for n in 200 400; do
      valgrind --tool=callgrind --callgrind-out-file=cg.sni.$n \
          python bench/sni_cost.py --sni --connections $n
    done
    # Ir per connection: (Ir(400) - Ir(200)) / 200; where they go:
    callgrind_annotate --inclusive=yes cg.sni.400 | head -60

``--core python`` runs the pure-Python core instead of the compiled one.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from typing import Any


def client_hello(host: str) -> bytes:
    """The first flight of a real TLS client (Python's ``ssl``) asking for *host*."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def main(n: int, sni: bool, host: str) -> None:
    from hotproxy.commands import PrepareAndCommit
    from hotproxy.executor import ServiceExecutor
    from hotproxy.listeners import TcpListenerFactory
    from hotproxy.proxy import ProxyFactory

    loop = asyncio.get_running_loop()
    backend = await loop.create_server(_Echo, "127.0.0.1", 0)
    up = f"127.0.0.1:{backend.sockets[0].getsockname()[1]}"
    if sni:
        # a few routes of each kind, as an operator would have; *host* takes the wildcard
        routes = {f"site{i}.example": [up] for i in range(8)}
        routes.update({f"*.zone{i}.example": [up] for i in range(4)})
        factory = ProxyFactory((up,), sni_routes=routes)
    else:
        factory = ProxyFactory((up,))
    ex = ServiceExecutor()
    await ex.execute(PrepareAndCommit("p", factory, TcpListenerFactory("127.0.0.1", 0)))
    listener = ex.sites["p"].listener
    assert listener is not None and listener.mode == "core"
    port = listener.sock.getsockname()[1]
    hello = client_hello(host)
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello)
        assert await reader.readexactly(len(hello)) == hello
        writer.close()
        await writer.wait_closed()
    await ex.shutdown(2.0)
    backend.close()


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--sni", action="store_true", help="route by the ClientHello's name (else a plain proxy)")
    p.add_argument("--host", default="www.zone2.example", help="the name the ClientHello asks for")
    p.add_argument("--core", choices=("compiled", "python"), default="compiled")
    a = p.parse_args()
    if a.core == "python":
        from hotproxy import core
        core.select("python")
    import uvloop
    uvloop.run(main(a.connections, a.sni, a.host))


if __name__ == "__main__":
    cli()
