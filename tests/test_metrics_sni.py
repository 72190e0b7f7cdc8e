"""Per-route counts of TLS SNI routing in ``/metrics``, from a real
``hotproxy run`` over real sockets: real ClientHellos (Python's ``ssl``)
sent through a service with ``sni_routes`` to echo services, each route's
``hotproxy_sni_route_connections_total`` scraped.  Nothing here asserts on
timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from conftest import eventually, free_port, run
from helpers_program import Program, toml
from test_clienthello import client_hello
from test_metrics import scrape, value

Start = Callable[..., Program]


async def hello_through(port: int, host: str | None) -> bytes:
    """Send a ClientHello for *host* through the proxy: the echo service's
    3-byte greeting that came back (the hello is echoed untouched)."""
    hello = client_hello(host)
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(hello)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(3 + len(hello)), 10)
        assert got[3:] == hello
        return got[:3]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def test_each_route_counts_its_connections_in_metrics(start: Start) -> None:
    a, w, d, s, m = (free_port() for _ in range(5))
    # three echo services, told apart by their greeting, behind one sni service
    echoes = {"ea": {"kind": "echo", "listen": f"127.0.0.1:{a}", "greeting": "ea\n"},
              "ew": {"kind": "echo", "listen": f"127.0.0.1:{w}", "greeting": "ew\n"},
              "ed": {"kind": "echo", "listen": f"127.0.0.1:{d}", "greeting": "ed\n"}}

    def config(default: bool) -> str:
        return (toml(echoes, metrics=f"127.0.0.1:{m}")
                + f'\n[services.s]\nkind = "proxy"\nlisten = "127.0.0.1:{s}"\n'
                + (f'upstreams = ["127.0.0.1:{d}"]\n' if default else "upstreams = []\n")
                + f'sni_routes = {{ "a.example" = ["127.0.0.1:{a}"], "*.example" = ["127.0.0.1:{w}"] }}\n')

    prog = start(config(True))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        sent = [("a.example", b"ea\n"), ("A.Example", b"ea\n"), ("x.example", b"ew\n"),
                ("b.c.example", b"ew\n"), ("x.other", b"ed\n"), (None, b"ed\n"), ("a.example", b"ea\n")]
        for host, greeting in sent:
            assert await hello_through(s, host) == greeting, host

        def routes(samples: dict[str, object]) -> dict[str, float]:
            fam = samples.get("hotproxy_sni_route_connections_total") or {}
            assert isinstance(fam, dict)
            return {dict(labels)["route"]: v for labels, v in fam.items() if dict(labels).get("service") == "s"}

        async def counted() -> bool:
            return routes(await scrape(m)) == {"a.example": 3, "*.example": 2, "*": 2}

        await eventually(counted)
        samples = await scrape(m)
        print("per-route counts after 7 hellos:", routes(samples))
        # the other echo services have no routes: no series for them
        assert value(samples, "hotproxy_sni_route_connections_total", service="ea", route="*") is None

        # a reload that drops the default group: the routes' counts carry over,
        # the default's series stays at what it took (status keeps it as 0 + taken)
        cfg.write_text(config(False))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err
        assert await hello_through(s, "z.example") == b"ew\n"

        async def carried() -> bool:
            got = routes(await scrape(m))
            return got.get("a.example") == 3 and got.get("*.example") == 3

        await eventually(carried)
        print("after a reload and one more hello:", routes(await scrape(m)))

    run(main(), 120)
