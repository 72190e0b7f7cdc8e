"""The proxy service as deployed: balancing, passive health, connect
timeouts and retries, and state that survives every update -- in-process
on both cores, and through real worker processes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import socket
import struct

import pytest

from conftest import eventually, free_port, run
from hotproxy.errors import DeployError
from hotproxy.commands import Abort, PrepareAndCommit, Precommit, Update
from hotproxy.listeners import TcpListenerFactory
from hotproxy.manager import WorkerManager
from hotproxy.proxy import ProxyFactory
from test_proxy import (Backend, Blackhole, close, connect, drained, proxy_site, request, service,
                        site_address)


async def tag_of(address: str, source_ip: str | None = None) -> str:
    """Connect (from *source_ip*, if given), read the backend's name, close."""
    if source_ip is None:
        reader, writer = await connect(address)
    else:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source_ip, 0))
    try:
        return (await reader.readline()).decode().strip()
    finally:
        await close(writer)


async def held_connection(address: str) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection, read the backend's name; leave it open."""
    reader, writer = await connect(address)
    name = (await reader.readline()).decode().strip()
    return name, reader, writer


async def tagged_backends(n: int) -> list[Backend]:
    return [await Backend(name=f"b{i}", mode="tag").start() for i in range(n)]


async def stop_all(backends: list[Backend]) -> None:
    for b in backends:
        await b.stop()


# -- balancing -------------------------------------------------------------------


def test_round_robin_distribution(core_name: str) -> None:
    async def main() -> None:
        bs = await tagged_backends(3)
        async with proxy_site(ProxyFactory(tuple(b.address for b in bs))) as ex:
            tags = [await tag_of(site_address(ex)) for _ in range(30)]
            assert tags[:6] == ["b0", "b1", "b2", "b0", "b1", "b2"]
            assert collections.Counter(tags) == {"b0": 10, "b1": 10, "b2": 10}
            await drained(ex)
        await stop_all(bs)

    run(main())


def test_random_distribution(core_name: str) -> None:
    async def main() -> None:
        bs = await tagged_backends(3)
        random.seed(1234)
        async with proxy_site(ProxyFactory(tuple(b.address for b in bs), balance="random")) as ex:
            tags = await asyncio.gather(*(tag_of(site_address(ex)) for _ in range(150)))
            counts = collections.Counter(tags)
            # expected 50 each; 20 is over 5 standard deviations away
            assert set(counts) == {"b0", "b1", "b2"} and min(counts.values()) > 20, counts
            await drained(ex)
        await stop_all(bs)

    run(main())


def test_least_conn_distribution(core_name: str) -> None:
    async def main() -> None:
        bs = await tagged_backends(3)
        async with proxy_site(ProxyFactory(tuple(b.address for b in bs), balance="least_conn")) as ex:
            address = site_address(ex)
            held = [await held_connection(address) for _ in range(6)]
            assert collections.Counter(h[0] for h in held) == {"b0": 2, "b1": 2, "b2": 2}
            # free both of b1's: the next two go there
            for name, _, w in held:
                if name == "b1":
                    await close(w)
            await eventually(lambda: service(ex).upstream_states[bs[1].address].active == 0)
            more = [await held_connection(address) for _ in range(2)]
            assert [m[0] for m in more] == ["b1", "b1"]
            states = service(ex).upstream_states
            assert [states[b.address].active for b in bs] == [2, 2, 2]
            for _, _, w in held + more:
                await close(w)
            await drained(ex)
        await stop_all(bs)

    run(main())


def test_hash_is_sticky_per_client_ip(core_name: str) -> None:
    """Clients from 127.0.0.2..127.0.0.41 always reach the same upstream, and
    they spread over all of them."""
    async def main() -> None:
        bs = await tagged_backends(3)
        async with proxy_site(ProxyFactory(tuple(b.address for b in bs), balance="hash")) as ex:
            address = site_address(ex)
            first = {}
            for i in range(2, 42):
                ip = f"127.0.0.{i}"
                first[ip] = await tag_of(address, ip)
            for ip, tag in first.items():
                assert await tag_of(address, ip) == tag
            assert set(first.values()) == {"b0", "b1", "b2"}
            # an ejected upstream's clients move; the others' stay put
            victim = bs[0].address
            service(ex).upstream_states[victim].ejected_until = float("inf")
            for ip, tag in first.items():
                now = await tag_of(address, ip)
                assert now != "b0" and (tag == "b0" or now == tag)
            await drained(ex)
        await stop_all(bs)

    run(main())


# -- connect failures, retries, health ------------------------------------------------


def test_refused_upstream_retries_on_the_next(core_name: str) -> None:
    async def main() -> None:
        dead = f"127.0.0.1:{free_port()}"     # nobody listens: connection refused
        b = await Backend(name="good", mode="tag").start()
        factory = ProxyFactory((dead, b.address), retries=1, max_fails=100)
        async with proxy_site(factory) as ex:
            for _ in range(4):
                assert await tag_of(site_address(ex)) == "good"
            svc = service(ex)
            # round robin starts on the dead one every other connection
            assert svc.counters.connect_failures == 2
            assert svc.upstream_states[dead].failures == 2
            assert svc.upstream_states[dead].active == 0
            await drained(ex)
        await b.stop()

    run(main())


def test_no_retries_means_one_attempt(core_name: str) -> None:
    async def main() -> None:
        dead = f"127.0.0.1:{free_port()}"
        b = await Backend(name="good", mode="tag").start()
        async with proxy_site(ProxyFactory((dead, b.address), retries=0)) as ex:
            with contextlib.suppress(ConnectionError):
                assert await tag_of(site_address(ex)) == ""    # closed: no upstream
            assert await tag_of(site_address(ex)) == "good"
            c = service(ex).counters
            await drained(ex)
            assert (c.connect_failures, c.no_upstream, c.accepted) == (1, 1, 2)
        await b.stop()

    run(main())


def test_connect_timeout_then_retry(core_name: str) -> None:
    async def main() -> None:
        hole = Blackhole()
        b = await Backend(name="good", mode="tag").start()
        factory = ProxyFactory((hole.address, b.address), connect_timeout=0.2, retries=1)
        async with proxy_site(factory) as ex:
            assert await tag_of(site_address(ex)) == "good"
            svc = service(ex)
            assert svc.counters.connect_failures == 1
            assert svc.upstream_states[hole.address].active == 0
            await drained(ex)
        async with proxy_site(ProxyFactory((hole.address,), connect_timeout=0.2)) as ex:
            assert await request(site_address(ex), b"lost") == b""   # closed: no upstream
            await drained(ex)
            c = service(ex).counters
            assert (c.connect_failures, c.no_upstream) == (1, 1)
        await b.stop()
        hole.close()

    run(main())


def test_no_upstream_ends_with_eof_not_reset(core_name: str) -> None:
    """A client whose upstream cannot be reached gets an EOF, not a reset,
    even while it is still sending; a client that never sends its own EOF
    is closed after the linger time."""
    async def main() -> None:
        dead = f"127.0.0.1:{free_port()}"
        async with proxy_site(ProxyFactory((dead,), retries=0)) as ex:
            svc = service(ex)
            reader, writer = await connect(site_address(ex))
            # bytes in flight when the connect fails, and more after it
            writer.write(b"q" * 200_000)
            assert await reader.read() == b""          # an EOF, no ConnectionResetError
            writer.write(b"late bytes are read and dropped")
            await writer.drain()
            await close(writer)
            await drained(ex)
            assert (svc.counters.no_upstream, svc.counters.active) == (1, 0)
            # a client that keeps its side open: closed by the proxy after lingering
            reader, writer = await connect(site_address(ex))
            assert await reader.read() == b""
            await drained(ex)                            # no help from the client
            assert svc.counters.no_upstream == 2
            await close(writer)

    run(main())


def test_upstream_host_name_is_resolved(core_name: str) -> None:
    """``localhost:port`` works; a name that does not resolve is refused when
    the service is built, and the running one keeps serving."""
    async def main() -> None:
        b = await Backend(name="named", mode="tag").start()
        port = int(b.address.rpartition(":")[2])
        async with proxy_site(ProxyFactory((f"localhost:{port}",))) as ex:
            assert await tag_of(site_address(ex)) == "named"
            bad = ProxyFactory(("no-such-host.invalid:80",))
            with pytest.raises(DeployError) as info:
                await ex.execute(Precommit("p", bad))
            assert "cannot resolve 'no-such-host.invalid'" in str(info.value)
            assert "\n" not in str(info.value)
            assert await tag_of(site_address(ex)) == "named"
            await drained(ex)
        await b.stop()

    run(main())


def test_client_leaves_while_connecting(core_name: str) -> None:
    """A client that goes away while its upstream connect hangs: the attempt
    is cancelled at once (not left to the connect timeout), is not counted as
    a connect failure, and every count is released."""
    async def main() -> None:
        hole = Blackhole()
        async with proxy_site(ProxyFactory((hole.address,), connect_timeout=30.0)) as ex:
            svc = service(ex)
            reader, writer = await connect(site_address(ex))
            await eventually(lambda: svc.upstream_states[hole.address].active == 1)
            # a reset, not a FIN (an EOF keeps the connection half-open)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await drained(ex)     # well before connect_timeout
            c = svc.counters
            assert (c.accepted, c.connect_failures, c.no_upstream) == (1, 0, 0)
            st = svc.upstream_states[hole.address]
            assert (st.active, st.fails, st.failures) == (0, 0, 0)
        hole.close()

    run(main())


def test_ejection_and_recovery(core_name: str) -> None:
    """Two failures in a row eject an upstream (it gets no attempts); once
    fail_timeout has passed it is tried again: a failure ejects it again,
    an answer brings it back.  (The passing of fail_timeout is simulated by
    moving ``ejected_until``, so nothing depends on timing.)"""
    import time

    async def main() -> None:
        port = free_port()
        flaky = f"127.0.0.1:{port}"
        good = await Backend(name="good", mode="tag").start()
        factory = ProxyFactory((flaky, good.address), retries=1, max_fails=2, fail_timeout=30)
        async with proxy_site(factory) as ex:
            svc = service(ex)
            st = svc.upstream_states[flaky]
            for _ in range(4):
                assert await tag_of(site_address(ex)) == "good"
            assert st.fails == 2 and st.ejected_until > time.monotonic() + 20
            assert svc.counters.connect_failures == 2
            for _ in range(6):      # ejected: not even tried
                assert await tag_of(site_address(ex)) == "good"
            assert svc.counters.connect_failures == 2
            assert svc.stats()["upstreams"][flaky]["ejected_for"] > 20
            # fail_timeout passes; still down: one attempt, ejected again
            st.ejected_until = time.monotonic() - 0.001
            tags = [await tag_of(site_address(ex)) for _ in range(2)]
            assert tags == ["good", "good"] and svc.counters.connect_failures == 3
            assert st.fails == 3 and st.ejected_until > time.monotonic() + 20
            # it comes back; after fail_timeout the next try reaches it
            back = await Backend(name="flaky", mode="tag").start(port=port)
            st.ejected_until = time.monotonic() - 0.001
            tags = [await tag_of(site_address(ex)) for _ in range(2)]
            assert sorted(tags) == ["flaky", "good"]
            assert st.fails == 0 and st.ejected_until == 0
            stats = svc.stats()["upstreams"][flaky]
            assert stats["failures"] == 3 and stats["ejected_for"] == 0 and stats["connections"] == 1
            await drained(ex)
            await back.stop()
        await good.stop()

    run(main())


def test_all_ejected_still_tried(core_name: str) -> None:
    async def main() -> None:
        port = free_port()
        only = f"127.0.0.1:{port}"
        async with proxy_site(ProxyFactory((only,), max_fails=1, fail_timeout=60)) as ex:
            svc = service(ex)
            assert await request(site_address(ex), b"x") == b""
            assert svc.upstream_states[only].ejected_until > 0
            b = await Backend(name="only", mode="tag").start(port=port)
            # ejected, but the only one: tried anyway, and it works
            assert await tag_of(site_address(ex)) == "only"
            assert svc.upstream_states[only].fails == 0
            await drained(ex)
            await b.stop()

    run(main())


# -- state across updates ------------------------------------------------------------


def test_update_carries_counts_and_least_conn(core_name: str) -> None:
    """Connections held on v1 count for least_conn in v2; a removed upstream
    gets nothing new while its connections finish; an aborted precommit
    leaves no trace."""
    async def main() -> None:
        bs = await tagged_backends(3)
        a, b, c = (x.address for x in bs)
        async with proxy_site(ProxyFactory((a, b), balance="least_conn")) as ex:
            address = site_address(ex)
            held = [await held_connection(address) for _ in range(4)]     # 2 on a, 2 on b
            v1 = service(ex)
            await ex.execute(Precommit("p", ProxyFactory((a, b, c), balance="least_conn")))
            await ex.execute(Update("p"))
            v2 = service(ex)
            assert v2 is not v1 and v2.counters is v1.counters
            assert v2.upstream_states[a] is v1.upstream_states[a]
            more = [await held_connection(address) for _ in range(2)]
            assert [m[0] for m in more] == ["b2", "b2"]                    # c had none
            # drop a; its two connections stay open and counted
            await ex.execute(Precommit("p", ProxyFactory((b, c), balance="least_conn")))
            await ex.execute(Abort("p"))
            assert service(ex) is v2
            await ex.execute(Precommit("p", ProxyFactory((b, c), balance="least_conn")))
            await ex.execute(Update("p"))
            v3 = service(ex)
            a_stats = v3.stats()["upstreams"][a]
            assert a_stats["active"] == 2 and a_stats["removed"] is True
            newer = [await held_connection(address) for _ in range(2)]
            assert sorted(n[0] for n in newer) == ["b1", "b2"]      # never the removed b0
            states = v3.all_states()
            for x in bs:
                assert states[x.address].active == len(x.open)
            for _, _, w in held + more + newer:
                await close(w)
            await drained(ex)
            assert v3.counters.accepted == 8 and v3.counters.active == 0
            assert all(s.active == 0 for s in states.values())
            # a is retired and idle now: the next version forgets it
            await ex.execute(Precommit("p", ProxyFactory((b, c))))
            await ex.execute(Update("p"))
            assert a not in service(ex).all_states()
        await stop_all(bs)

    run(main())


def test_traffic_through_many_updates(core_name: str) -> None:
    """Clients talk without pause while the service is updated 30 times
    (Precommit + Update, changing upstreams and policy): no connection
    fails, and every counter carries over exactly."""
    rounds = 30

    async def main() -> None:
        bs = [await Backend(name=f"e{i}", mode="echo").start() for i in range(3)]
        addrs = [b.address for b in bs]
        stop = asyncio.Event()
        totals = {"conns": 0, "bytes": 0}

        async def long_client(address: str) -> None:
            # one connection, many round trips, across every update
            reader, writer = await connect(address)
            totals["conns"] += 1
            i = 0
            while not stop.is_set():
                msg = os.urandom(1 + (i * 997) % 4000)
                writer.write(msg)
                assert await reader.readexactly(len(msg)) == msg
                totals["bytes"] += len(msg)
                i += 1
                await asyncio.sleep(0)
            await close(writer)

        async def short_client(address: str) -> None:
            # a new connection each time, so every version serves some
            while not stop.is_set():
                msg = os.urandom(100)
                totals["conns"] += 1
                assert await request(address, msg) == msg
                totals["bytes"] += len(msg)

        policies = ["least_conn", "round_robin", "random", "hash"]
        async with proxy_site(ProxyFactory(tuple(addrs), balance="least_conn")) as ex:
            address = site_address(ex)
            v1 = service(ex)
            clients = [asyncio.ensure_future(long_client(address)) for _ in range(6)]
            clients += [asyncio.ensure_future(short_client(address)) for _ in range(3)]
            try:
                for i in range(rounds):
                    ups = tuple(addrs[j] for j in range(3) if (i + j) % 4 != 0) or tuple(addrs)
                    await ex.execute(Precommit("p", ProxyFactory(ups, balance=policies[i % 4])))
                    await ex.execute(Update("p"))
                    await asyncio.sleep(0.01)
                    if any(t.done() for t in clients):
                        break
            finally:
                stop.set()
            await asyncio.gather(*clients)     # raises if any connection failed
            await drained(ex)
            svc = service(ex)
            assert ex.sites["p"].generation == rounds + 1
            c = svc.counters
            assert c is v1.counters
            assert c.accepted == totals["conns"] and c.active == 0
            assert c.bytes_in == c.bytes_out == totals["bytes"]
            assert (c.connect_failures, c.refused, c.no_upstream) == (0, 0, 0)
            states = svc.all_states()
            assert all(s.active == 0 for s in states.values())
            assert sum(b.accepted for b in bs) == totals["conns"]
        await stop_all(bs)

    run(main(), timeout=90)


# -- real worker processes -------------------------------------------------------------


def test_through_worker_processes(core_name: str) -> None:
    """Two worker processes serve the proxy; traffic goes on while it is updated;
    the summed counters add up."""
    async def main() -> None:
        bs = [await Backend(name=f"w{i}", mode="echo").start() for i in range(2)]
        port = free_port()
        lf = TcpListenerFactory("127.0.0.1", port)
        stop = asyncio.Event()
        sent = {"conns": 0, "bytes": 0}

        async def client() -> None:
            while not stop.is_set():
                msg = os.urandom(2000)
                sent["conns"] += 1
                assert await request(f"127.0.0.1:{port}", msg) == msg
                sent["bytes"] += len(msg)

        async with WorkerManager(2, core=core_name, drain_timeout=5.0) as m:
            (await m.dispatch(PrepareAndCommit(
                "p", ProxyFactory((bs[0].address,), balance="least_conn"), lf))).raise_for_errors()
            clients = [asyncio.ensure_future(client()) for _ in range(4)]
            try:
                for i in range(6):
                    ups = (bs[0].address, bs[1].address) if i % 2 == 0 else (bs[1].address,)
                    (await m.dispatch(Precommit("p", ProxyFactory(ups, balance="least_conn")))).raise_for_errors()
                    (await m.dispatch(Update("p"))).raise_for_errors()
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
            await asyncio.gather(*clients)

            async def totals() -> dict[str, int] | None:
                out: dict[str, int] = collections.Counter()
                for w in await m.status():
                    stats = w["sites"]["p"]["stats"]
                    for key in ("accepted", "bytes_in", "bytes_out", "connect_failures"):
                        out[key] += stats[key]
                    out["active"] += w["sites"]["p"]["active"]   # the site's count, not the service's
                return out if out["active"] == 0 else None

            t = await eventually(totals)
            assert t["accepted"] == sent["conns"] and t["bytes_in"] == t["bytes_out"] == sent["bytes"]
            assert t["connect_failures"] == 0
            statuses = await m.status()
            assert all(w["sites"]["p"]["generation"] == 7 for w in statuses)
        for b in bs:
            await b.stop()

    run(main(), timeout=90)


def test_factory_pickles_into_workers_with_every_option() -> None:
    import pickle

    f = ProxyFactory(("127.0.0.1:1", "[::1]:2", "unix:/x"), balance="hash", connect_timeout=0.5,
                     idle_timeout=0, max_connections=5, retries=0, max_fails=0, fail_timeout=1.5,
                     keepalive=True, access_log=True)
    assert pickle.loads(pickle.dumps(f)) == f
    svc = f.make()
    assert svc.stats()["balance"] == "hash" and set(svc.stats()["upstreams"]) == set(f.upstreams)


def test_old_versions_freed_by_their_last_connection(core_name: str) -> None:
    """An old version lives while its connections do and is freed (no GC pass
    needed) when the last one finishes."""
    import gc

    async def main() -> None:
        b = await Backend(name="e", mode="tag").start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            site = ex.sites["p"]
            held = [await held_connection(site_address(ex)) for _ in range(2)]
            for _ in range(3):
                await ex.execute(Precommit("p", ProxyFactory((b.address,), retries=1)))
                await ex.execute(Update("p"))
            assert len(site.versions) == 2          # the current one and the held one
            gc.disable()
            try:
                for _, _, w in held:
                    await close(w)
                await drained(ex)
                await eventually(lambda: len(site.versions) == 1)
            finally:
                gc.enable()
        await b.stop()

    run(main())
