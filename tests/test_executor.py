"""The six commands on one ServiceExecutor, over real loopback sockets, on both cores."""

from __future__ import annotations

import asyncio
import errno
import gc
import pickle
import socket
import weakref
from dataclasses import dataclass, field
from typing import Any

import pytest

from hotproxy import (Abort, BuildListenerError, BuildServiceError, Commit, CountConnections, EchoFactory,
                      LimitConnections, NothingDeployedError, NothingStagedError, PrepareAndCommit, Precommit,
                      Remove, ServiceExecutor, SiteNotFoundError, TcpListenerFactory, Update, stack)

from hotproxy.listeners import BoundListener
from hotproxy.service import Service

from conftest import echo_roundtrip, eventually, free_port, run
from services import Gate, TaggedFactory, ask

HOST = "127.0.0.1"


def lf(port: int) -> TcpListenerFactory:
    return TcpListenerFactory(HOST, port)


def snapshot(ex: ServiceExecutor) -> dict:
    """Everything a failed command must leave unchanged."""
    return {name: (s.slot.current, s.staged, s.staged_listener, s.listener, s.generation, s.factory)
            for name, s in ex.sites.items()}


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port)


async def refused(port: int) -> bool:
    try:
        r, w = await connect(port)
    except ConnectionRefusedError:
        return True
    w.close()
    return False


def test_prepare_and_commit_serves(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port = free_port()
        res = await ex.execute(PrepareAndCommit("echo", EchoFactory(b"hi"), lf(port)))
        assert res["generation"] == 1
        assert await echo_roundtrip(HOST, port, b"abc", greeting=2) == b"hiabc"
        st = ex.status()["sites"]["echo"]
        assert st["generation"] == 1 and st["listen"] == f"{HOST}:{port}"
        await ex.shutdown(1)
        assert await refused(port)

    run(main())


def test_two_stage_new_site_and_update_carries_state(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port = free_port()
        await ex.execute(Precommit("t", stack(TaggedFactory(b"v1"), CountConnections())))
        assert await refused(port)          # staged, not serving
        await ex.execute(Commit("t", lf(port)))
        for _ in range(3):
            r, w = await connect(port)
            assert await ask(r, w, b"x") == b"v1:x"
            w.close()
        await ex.execute(Precommit("t", stack(TaggedFactory(b"v2"), CountConnections())))
        r, w = await connect(port)
        assert await ask(r, w, b"y") == b"v1:y"   # staged is not serving yet
        w.close()
        res = await ex.execute(Update("t"))
        assert res["generation"] == 2
        r, w = await connect(port)
        assert await ask(r, w, b"z") == b"v2:z"
        w.close()
        r, w = await connect(port)
        assert await ask(r, w, b"z") == b"v2:z"
        assert ex.status()["sites"]["t"]["versions"] == {2: 1}   # found through the layers
        w.close()
        await eventually(lambda: not ex.sites["t"].conns)
        stats = ex.status()["sites"]["t"]["stats"]
        # the counters kept counting through the update, in both layers
        assert stats["accepted"] == 6 and stats["connections"] == 6 and stats["tag"] == "v2"
        await ex.shutdown(1)

    run(main())


def test_open_connection_keeps_its_version(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port = free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"old"), lf(port)))
        r1, w1 = await connect(port)
        assert await ask(r1, w1, b"a") == b"old:a"
        await ex.execute(Precommit("t", TaggedFactory(b"new")))
        await ex.execute(Update("t"))
        r2, w2 = await connect(port)
        assert await ask(r2, w2, b"b") == b"new:b"
        assert await ask(r1, w1, b"c") == b"old:c"   # never cut, still the old version
        assert ex.status()["sites"]["t"]["old_versions"] == 1
        assert ex.status()["sites"]["t"]["versions"] == {1: 1, 2: 1}
        old_service = weakref.ref([c for c in ex.sites["t"].conns.snapshot()
                                   if c.service.tag == b"old"][0].service)
        w1.close()
        await eventually(lambda: len(ex.sites["t"].conns) == 1)
        gc.collect()
        assert old_service() is None                  # freed with its last connection
        assert ex.status()["sites"]["t"]["old_versions"] == 0
        assert ex.status()["sites"]["t"]["versions"] == {2: 1}
        w2.close()
        await ex.shutdown(1)

    run(main())


def test_async_factory_old_version_serves_while_building(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port = free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v1"), lf(port)))
        gate = Gate()
        building = asyncio.create_task(ex.execute(Precommit("t", TaggedFactory(b"v2", gate=gate))))
        await asyncio.wait_for(gate.entered.wait(), 10)   # v2 is being built...
        for _ in range(5):
            r, w = await connect(port)
            assert await ask(r, w, b"q") == b"v1:q"      # ...and v1 serves meanwhile
            w.close()
        assert not building.done()
        gate.open()
        await building
        await ex.execute(Update("t"))
        r, w = await connect(port)
        assert await ask(r, w, b"q") == b"v2:q"
        w.close()
        await ex.shutdown(1)

    run(main())


def test_commit_moves_listener_without_cutting(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        p1, p2 = free_port(), free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v1"), lf(p1)))
        r, w = await connect(p1)
        assert await ask(r, w, b"a") == b"v1:a"
        await ex.execute(Precommit("t", TaggedFactory(b"v2"), lf(p2)))
        assert await refused(p2)             # bound, not listening, until Commit
        res = await ex.execute(Commit("t"))
        assert res["listen"] == f"{HOST}:{p2}"
        assert await refused(p1)             # the old listener stopped accepting
        r2, w2 = await connect(p2)
        assert await ask(r2, w2, b"b") == b"v2:b"
        assert await ask(r, w, b"c") == b"v1:c"   # its connection goes on
        w.close()
        w2.close()
        await ex.shutdown(1)

    run(main())


def test_abort_drops_staged(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port, p2 = free_port(), free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v1"), lf(port)))
        await ex.execute(Precommit("t", TaggedFactory(b"v2"), lf(p2)))
        assert (await ex.execute(Abort("t")))["aborted"]
        with pytest.raises(NothingStagedError):
            await ex.execute(Update("t"))
        # the staged listener was released: the port can be bound again
        with socket.socket() as s:
            s.bind((HOST, p2))
        r, w = await connect(port)
        assert await ask(r, w, b"a") == b"v1:a"
        w.close()
        # a site that was only precommitted disappears on Abort
        await ex.execute(Precommit("new", TaggedFactory(b"n")))
        await ex.execute(Abort("new"))
        assert "new" not in ex.sites
        await ex.shutdown(1)

    run(main())


def test_remove_drains_then_closes(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor(drain_timeout=0.5)
        port = free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v1"), lf(port)))
        r, w = await connect(port)
        assert await ask(r, w, b"a") == b"v1:a"
        res = await ex.execute(Remove("t"))
        assert res == {"draining": 1}
        assert "t" not in ex.sites
        assert await refused(port)
        assert await ask(r, w, b"b") == b"v1:b"   # still served while draining
        # after the drain timeout the connection is closed
        assert await asyncio.wait_for(r.read(), 5) == b""
        await ex.wait_drained()
        w.close()

    run(main())


def test_remove_finishes_early_when_connections_end(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor(drain_timeout=30)
        port = free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v1"), lf(port)))
        r, w = await connect(port)
        await ask(r, w, b"a")
        await ex.execute(Remove("t"))
        w.close()
        await asyncio.wait_for(ex.wait_drained(), 5)

    run(main())


# -- failures leave the site exactly as it was ---------------------------------


def test_failures_name_the_site_and_change_nothing(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor(worker_id=7)
        port = free_port()

        async def fails(cmd, exc_type, text):  # type: ignore[no-untyped-def]
            before = snapshot(ex)
            with pytest.raises(exc_type) as info:
                await ex.execute(cmd)
            assert snapshot(ex) == before
            msg = str(info.value)
            assert "worker 7" in msg and repr(cmd.name) in msg and text in msg, msg
            assert "\n" not in msg

        await fails(Update("nope"), SiteNotFoundError, "site not found")
        await fails(Commit("nope", lf(port)), SiteNotFoundError, "site not found")
        await fails(Abort("nope"), SiteNotFoundError, "site not found")
        await fails(Remove("nope"), SiteNotFoundError, "site not found")
        await fails(Precommit("t", TaggedFactory(b"x", fail=True)), BuildServiceError, "refusing to build")
        assert "t" not in ex.sites
        await fails(PrepareAndCommit("t", TaggedFactory(b"x", fail=True), lf(port)), BuildServiceError, "refusing")

        # a port held by someone else (no SO_REUSEPORT): a listener error, nothing changes
        blocker = socket.socket()
        blocker.bind((HOST, port))
        blocker.listen()
        try:
            await fails(PrepareAndCommit("t", TaggedFactory(b"x"), lf(port)), BuildListenerError,
                        f"{HOST}:{port}")
            assert "t" not in ex.sites
            await ex.execute(Precommit("t", TaggedFactory(b"x")))
            await fails(Update("t"), NothingDeployedError, "nothing deployed")
            await fails(Commit("t", lf(port)), BuildListenerError, "Address already in use")
            assert ex.sites["t"].staged is not None and ex.sites["t"].service is None
            p2 = free_port()
            await ex.execute(Commit("t", lf(p2)))
            await fails(Update("t"), NothingStagedError, "nothing staged")
            await fails(Commit("t", lf(port)), NothingStagedError, "nothing staged")
            await ex.execute(Precommit("t", TaggedFactory(b"y")))
            await fails(Precommit("t", TaggedFactory(b"z"), lf(port)), BuildListenerError, "in use")
            await fails(Precommit("t", TaggedFactory(b"z", fail=True)), BuildServiceError, "refusing")
            # the good staged version survived both failures
            await ex.execute(Update("t"))
            r, w = await connect(p2)
            assert await ask(r, w, b"k") == b"y:k"
            w.close()
        finally:
            blocker.close()
        await ex.shutdown(1)

    run(main())


def test_commands_run_in_order() -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port = free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v0"), lf(port)))
        # a Precommit held in its build, then an Update sent right after: the
        # Update must wait for it (run at once, it would find nothing staged)
        gate = Gate()

        async def open_once_both_are_sent() -> None:
            await gate.entered.wait()
            gate.open()

        results = await asyncio.gather(
            ex.execute(Precommit("t", TaggedFactory(b"v1", gate=gate))),
            ex.execute(Update("t")),
            open_once_both_are_sent())
        assert results[1]["generation"] == 2
        r, w = await connect(port)
        assert await ask(r, w, b"a") == b"v1:a"
        w.close()
        await ex.shutdown(1)

    run(main())


def test_limit_layer_counts_across_versions(core_name: str) -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port = free_port()
        await ex.execute(PrepareAndCommit("t", stack(TaggedFactory(b"v1"), LimitConnections(max_connections=2)),
                                          lf(port)))
        held = [await connect(port) for _ in range(2)]
        for r, w in held:
            assert (await ask(r, w, b"a")).startswith(b"v1")
        await ex.execute(Precommit("t", stack(TaggedFactory(b"v2"), LimitConnections(max_connections=2))))
        await ex.execute(Update("t"))
        # two old-version connections are still open: a third is refused
        r, w = await connect(port)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        assert ex.status()["sites"]["t"]["stats"]["refused"] == 1
        held[0][1].close()
        await eventually(lambda: ex.status()["sites"]["t"]["active"] == 1)
        r, w = await connect(port)
        assert await ask(r, w, b"b") == b"v2:b"
        w.close()
        held[1][1].close()
        await ex.shutdown(1)

    run(main())


def test_commands_pickle() -> None:
    cmds = [Precommit("a", stack(EchoFactory(b"g"), CountConnections(), LimitConnections(max_connections=3)),
                      lf(9)), Update("a"), Commit("a", lf(10)), PrepareAndCommit("a", EchoFactory(), lf(11)),
            Abort("a"), Remove("a", 1.0)]
    for cmd in cmds:
        assert pickle.loads(pickle.dumps(cmd)) == cmd


def test_errors_pickle() -> None:
    err = BuildListenerError("web", "127.0.0.1:80: Address already in use", 3)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is BuildListenerError and str(back) == str(err)
    assert isinstance(back, OSError)


def test_closing_a_listener_serves_what_the_kernel_queued(core_name: str) -> None:
    """Connections already in the accept queue when a listener closes (Remove,
    a moved listener) are served, not reset."""

    async def main() -> None:
        ex = ServiceExecutor(drain_timeout=10)
        p1, p2 = free_port(), free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v1"), lf(p1)))
        await ex.execute(Precommit("t", TaggedFactory(b"v2"), lf(p2)))
        # The loop does not run while we connect: the kernel completes the
        # handshakes and queues them on the listener nobody accepts from yet.
        queued = [socket.create_connection((HOST, p1)) for _ in range(5)]
        await ex.execute(Commit("t"))          # the p1 listener closes now
        for s in queued:
            s.setblocking(False)
        async def talk(s: socket.socket) -> bytes:
            r, w = await asyncio.open_connection(sock=s)
            try:
                return await asyncio.wait_for(ask(r, w, b"q"), 5)
            finally:
                w.close()
        answers = await asyncio.gather(*(talk(s) for s in queued))
        assert answers == [b"v2:q"] * 5        # served by the site's new version
        # and the same on Remove
        queued = [socket.create_connection((HOST, p2)) for _ in range(3)]
        await ex.execute(Remove("t"))
        for s in queued:
            s.setblocking(False)
        answers = await asyncio.gather(*(talk(s) for s in queued))
        assert answers == [b"v2:q"] * 3
        await asyncio.wait_for(ex.wait_drained(), 10)

    run(main())


class _FlakyService(Service):
    """Raises in new_connection every other time (a buggy service)."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = EchoFactory().make()

    def new_connection(self, conns):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("bug in the service")
        return self.inner.new_connection(conns)


class _FlakyFactory(EchoFactory):
    def make_via_ref(self, old):  # type: ignore[no-untyped-def, override]
        return _FlakyService()


def test_a_service_raising_on_accept_does_not_take_the_listener_down(
        core_name: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        ex = ServiceExecutor()
        port = free_port()
        await ex.execute(PrepareAndCommit("f", _FlakyFactory(), lf(port)))
        served = dropped = 0
        for _ in range(6):
            r, w = await connect(port)
            w.write(b"x")
            try:
                got = await asyncio.wait_for(r.read(1), 5)
            except ConnectionResetError:
                got = b""
            served += got == b"x"
            dropped += got == b""
            w.close()
        assert served == 3 and dropped == 3        # the listener stayed up
        assert ex.status()["sites"]["f"]["accept_errors"] == 3
        await ex.shutdown(1)

    run(main())
    logged = [r for r in caplog.records if r.name == "hotproxy.accept"]
    assert len(logged) == 1 and "bug in the service" in logged[0].getMessage()   # rate-limited


# -- a listener that cannot listen: nothing is published ---------------------------


@dataclass(frozen=True)
class ListenFailsFactory(TcpListenerFactory):
    """Binds as usual; its listener, asked to listen, first has a client served
    by the site's *old* listener on ``old_port`` (recording the answer in
    ``served``), then fails -- a failure that comes after the loop ran."""

    old_port: int = 0
    served: list[bytes] = field(default_factory=list, compare=False, hash=False)

    def bind(self) -> BoundListener:
        return ListenFails(super().bind().sock, self)

    async def make(self) -> BoundListener:
        return ListenFails((await super().make()).sock, self)


class ListenFails(BoundListener):
    factory: ListenFailsFactory

    async def listen(self, protocol_factory: Any, service: Any = None) -> None:
        await self._served_then_fail()

    async def serve(self, protocol_factory: Any) -> None:   # the one step before listen/start
        await self._served_then_fail()

    async def _served_then_fail(self) -> None:
        r, w = await connect(self.factory.old_port)
        try:
            self.factory.served.append(await asyncio.wait_for(ask(r, w, b"during"), 10))
        finally:
            w.close()
        raise OSError(errno.EADDRNOTAVAIL, "injected listen failure")


def test_a_listener_that_cannot_listen_publishes_nothing(core_name: str) -> None:
    """Commit and PrepareAndCommit listen before they publish: a listen that
    fails (after a client was accepted meanwhile) leaves the old version
    serving, that client served by it, the generation unchanged."""
    async def main() -> None:
        ex = ServiceExecutor(worker_id=3)
        p1, p2, p3 = free_port(), free_port(), free_port()
        await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v1"), lf(p1)))
        held_r, held_w = await connect(p1)
        assert await ask(held_r, held_w, b"a") == b"v1:a"

        # Commit of a move, on a listener staged by Precommit
        failing = ListenFailsFactory(HOST, p2, old_port=p1)
        await ex.execute(Precommit("t", TaggedFactory(b"v2"), failing))
        before = snapshot(ex)
        with pytest.raises(BuildListenerError, match="injected listen failure") as info:
            await ex.execute(Commit("t"))
        assert "worker 3" in str(info.value) and "\n" not in str(info.value)
        assert failing.served == [b"v1:during"]      # served by the version that serves on
        assert snapshot(ex) == before
        assert ex.status()["sites"]["t"]["generation"] == 1
        r, w = await connect(p1)
        assert await ask(r, w, b"b") == b"v1:b"
        w.close()
        assert await ask(held_r, held_w, b"c") == b"v1:c"
        assert await refused(p2)
        await ex.execute(Abort("t"))

        # PrepareAndCommit onto a running site, with a new listener
        failing = ListenFailsFactory(HOST, p3, old_port=p1)
        before = snapshot(ex)
        with pytest.raises(BuildListenerError, match="injected listen failure"):
            await ex.execute(PrepareAndCommit("t", TaggedFactory(b"v3"), failing))
        assert failing.served == [b"v1:during"]
        assert snapshot(ex) == before
        assert ex.status()["sites"]["t"]["generation"] == 1
        r, w = await connect(p1)
        assert await ask(r, w, b"d") == b"v1:d"
        w.close()

        # A real listen() failure (a socket bound with SO_REUSEADDR beside
        # ours starts listening first) leaves the staged listener bound and
        # not listening: once the other one is gone, the same Commit works.
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind((HOST, p2))
        try:
            await ex.execute(Precommit("t", TaggedFactory(b"v4"), TcpListenerFactory(HOST, p2, reuse_port=False)))
            other.listen()
            before = snapshot(ex)
            with pytest.raises(BuildListenerError, match="Address already in use"):
                await ex.execute(Commit("t"))
            assert snapshot(ex) == before
        finally:
            other.close()
        assert (await ex.execute(Commit("t")))["generation"] == 2
        r, w = await connect(p2)
        assert await ask(r, w, b"e") == b"v4:e"
        w.close()
        assert await refused(p1)
        assert await ask(held_r, held_w, b"f") == b"v1:f"   # never cut
        held_w.close()
        await ex.shutdown(1)

    run(main())
