"""The relay's state machine and timer wheel without sockets, then through them.

``hotproxy/_core_machine.py`` is the one source of each direction's state
machine and of the timer wheel: the compiled core builds it into an
extension, the pure-Python core runs it as Python.  The first tests drive
both builds with scripted events, as a protocol is tested without a network
(each transition the relay relies on; a model relay over random reads,
writes and EOFs that must deliver every byte and exactly one EOF after
them; the wheel's arming and expiry).  The last ones look at the same
machine through real sockets on both cores: the states a half-close and
back-pressure put a connection's directions in, and timer runs that look
only at the connections that are due.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import eventually, run
from hotproxy import _core_py, core
from hotproxy.proxy import ProxyFactory
from test_proxy import (Backend, close, connect, connect_not_reading, drained, proxy_site, service,
                        site_address)

# names of states, events and actions: the pure build's module globals (the
# compiled build keeps them as C variables)
M = _core_py._machine

BUILDS = ["python"]
try:
    import hotproxy._core_machine as _compiled_machine

    if _compiled_machine.__file__.endswith(".so"):
        BUILDS.insert(0, "compiled")
except ImportError:  # pragma: no cover - no compiler
    pass


@pytest.fixture(params=BUILDS)
def machine(request: pytest.FixtureRequest) -> ModuleType:
    """The machine as compiled, and as the pure-Python core runs it."""
    return _compiled_machine if request.param == "compiled" else M


def walk(machine: ModuleType, state: int, *events: int) -> list[tuple[str, str]]:
    """Drive a Direction from *state* through *events*: (state, action) names after each."""
    d = machine.Direction(state, 1024)
    out = []
    for ev in events:
        act = d.step(ev)
        out.append((M.STATE_NAMES[d.state], M.ACTION_NAMES[act]))
    return out


# -- the direction machine ------------------------------------------------------


def test_both_builds_have_the_same_table() -> None:
    if "compiled" not in BUILDS:
        pytest.skip("extension not built")
    for s in range(M.N_STATES):
        for e in range(M.N_EVENTS):
            assert _compiled_machine.transition(s, e) == M.transition(s, e), (s, e)
            d1, d2 = _compiled_machine.Direction(s, 1), M.Direction(s, 1)
            assert d1.step(e) == d2.step(e) and d1.state == d2.state, (s, e)


def test_half_close_passes_the_eof_on(machine: ModuleType) -> None:
    """Bytes flow; the source's EOF with nothing pending shuts the destination."""
    assert walk(machine, M.D_OPEN, M.EV_READ, M.EV_READ, M.EV_EOF) == [
        ("open", "none"), ("open", "none"), ("shut", "shut")]
    # the other way's close then closes the destination
    assert walk(machine, M.D_SHUT, M.EV_CLOSE) == [("closed", "close")]


def test_back_pressure_blocks_then_drains(machine: ModuleType) -> None:
    """A destination that takes less blocks the source until it is drained."""
    assert walk(machine, M.D_OPEN, M.EV_FULL, M.EV_FULL, M.EV_DRAINED, M.EV_READ) == [
        ("blocked", "none"), ("blocked", "none"), ("open", "none"), ("open", "none")]


def test_eof_waits_for_the_pending_bytes(machine: ModuleType) -> None:
    """The EOF of a blocked direction is passed on only after its bytes."""
    assert walk(machine, M.D_OPEN, M.EV_FULL, M.EV_EOF, M.EV_FULL, M.EV_DRAINED) == [
        ("blocked", "none"), ("eof_pend", "none"), ("eof_pend", "none"), ("shut", "shut")]


def test_held_bytes_and_eof_while_connecting(machine: ModuleType) -> None:
    """Before the destination exists bytes and the EOF are held; once it is
    connected the bytes go first, then the EOF."""
    assert walk(machine, M.D_HOLD, M.EV_READ, M.EV_EOF, M.EV_CONNECTED, M.EV_DRAINED) == [
        ("hold", "none"), ("hold_eof", "none"), ("eof_pend", "none"), ("shut", "shut")]
    assert walk(machine, M.D_HOLD, M.EV_READ, M.EV_CONNECTED, M.EV_FULL, M.EV_DRAINED) == [
        ("hold", "none"), ("open", "none"), ("blocked", "none"), ("open", "none")]


def test_graceful_close_flushes_first(machine: ModuleType) -> None:
    """Closing with bytes pending closes the destination once they are written;
    with none pending, at once."""
    assert walk(machine, M.D_OPEN, M.EV_FULL, M.EV_CLOSE, M.EV_FULL, M.EV_DRAINED) == [
        ("blocked", "none"), ("closing", "none"), ("closing", "none"), ("closed", "close")]
    assert walk(machine, M.D_OPEN, M.EV_CLOSE) == [("closed", "close")]
    assert walk(machine, M.D_EOF_PEND, M.EV_CLOSE, M.EV_DRAINED) == [
        ("closing", "none"), ("closed", "close")]


def test_errors_abort_and_closed_is_final(machine: ModuleType) -> None:
    for s in range(M.N_STATES):
        if s != M.D_CLOSED:
            assert machine.transition(s, M.EV_ERROR) == (M.D_CLOSED, M.ACT_ABORT)
    for e in range(M.N_EVENTS):
        assert machine.transition(M.D_CLOSED, e) == (M.D_CLOSED, M.ACT_NONE)
    with pytest.raises(ValueError):
        machine.transition(M.N_STATES, 0)


def test_table_invariants(machine: ModuleType) -> None:
    """SHUT and CLOSE are asked for only on entering SHUT and CLOSED; the
    source is read only in HOLD and OPEN; the EOF is known in the EOF states."""
    for s in range(M.N_STATES):
        for e in range(M.N_EVENTS):
            nxt, act = machine.transition(s, e)
            if act == M.ACT_SHUT:
                assert nxt == M.D_SHUT and s != M.D_SHUT
            if act == M.ACT_CLOSE:
                assert nxt == M.D_CLOSED and s != M.D_CLOSED
        assert bool(machine.may_read(s)) == (s in (M.D_HOLD, M.D_OPEN))
        assert bool(machine.eof_seen(s)) == (s in (M.D_HOLD_EOF, M.D_EOF_PEND, M.D_SHUT))
        assert bool(machine.Direction(s, 1).eof()) == bool(machine.eof_seen(s))
    # every state can be reached from where a direction starts
    seen, todo = {M.D_HOLD, M.D_OPEN}, [M.D_HOLD, M.D_OPEN]
    while todo:
        s = todo.pop()
        for e in range(M.N_EVENTS):
            nxt = machine.transition(s, e)[0]
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(range(M.N_STATES))


def test_direction_fields(machine: ModuleType) -> None:
    d = machine.Direction(M.D_OPEN, 4096)
    assert (d.state, d.mode, d.next, d.size, d.nbytes, d.pend_off, d.pend_end) == (
        M.D_OPEN, M.M_COPY, 4096, 0, 0, 0, 0)
    assert (d.readable, d.rdhup, d.buf, d.pipe_r, d.pipe_w) == (False, False, None, -1, -1)
    assert d.state_name == "open" and "open" in repr(d)


# A model of one direction of the relay: what _read/_send/_flush do, over a
# scripted source and destination instead of sockets.

class ModelRelay:
    def __init__(self, machine: ModuleType, connected: bool) -> None:
        self.d = machine.Direction(M.D_OPEN if connected else M.D_HOLD, 8)
        self.connected = connected
        self.pending = b""      # read but not written (or held)
        self.written = b""
        self.eofs = 0           # EOFs passed on to the destination
        self.closed = False

    def act(self, action: int) -> None:
        if action == M.ACT_SHUT:
            self.eofs += 1
        elif action == M.ACT_CLOSE:
            self.closed = True

    def read(self, data: bytes, room: int) -> None:
        """The source gave *data*; the destination takes up to *room* bytes."""
        if not M.may_read(self.d.state):
            return
        if not self.connected:
            self.pending += data
            self.act(self.d.step(M.EV_READ))
            return
        took = min(len(data), room)
        self.written += data[:took]
        self.pending = data[took:]
        self.act(self.d.step(M.EV_READ if took == len(data) else M.EV_FULL))

    def writable(self, room: int) -> None:
        """The destination can take *room* bytes of what is pending."""
        if not self.connected or not self.pending:
            return
        took = min(len(self.pending), room)
        self.written += self.pending[:took]
        self.pending = self.pending[took:]
        self.act(self.d.step(M.EV_FULL if self.pending else M.EV_DRAINED))

    def connect(self) -> None:
        if self.connected:
            return
        self.connected = True
        self.act(self.d.step(M.EV_CONNECTED))
        self.writable(1 << 30)
        if not self.pending:
            self.act(self.d.step(M.EV_DRAINED))

    def eof(self) -> None:
        self.act(self.d.step(M.EV_EOF))


steps = st.lists(st.one_of(
    st.tuples(st.just("read"), st.binary(min_size=1, max_size=20), st.integers(0, 25)),
    st.tuples(st.just("writable"), st.integers(0, 25)),
    st.tuples(st.just("connect")),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(script=steps, connected=st.booleans(), eof_at=st.integers(0, 40))
def test_model_relay_delivers_every_byte_then_one_eof(script: list[Any], connected: bool,
                                                     eof_at: int) -> None:
    """Whatever the reads, the destination's room and when it connects: the
    destination gets every byte the source gave, in order, then one EOF."""
    for machine in [_compiled_machine, M] if "compiled" in BUILDS else [M]:
        relay = ModelRelay(machine, connected)
        sent = b""
        for i, step in enumerate(script + [("connect",)]):
            if i == eof_at:
                relay.eof()
            if step[0] == "read" and i < eof_at and M.may_read(relay.d.state):
                sent += step[1]
                relay.read(step[1], step[2])
            elif step[0] == "writable":
                relay.writable(step[1])
            elif step[0] == "connect":
                relay.connect()
        if eof_at > len(script):
            relay.eof()
        for _ in range(len(sent) + 2):   # the destination drains, eventually
            relay.writable(7)
        assert relay.written == sent
        assert relay.eofs == 1 and relay.d.state == M.D_SHUT and not relay.closed


# -- the timer wheel --------------------------------------------------------------


def test_wheel_expires_only_what_is_due(machine: ModuleType) -> None:
    w = machine.TimerWheel(0.05)
    far = [object() for _ in range(10000)]
    for obj in far:
        w.arm(obj, 1000.0)
    soon = object()
    assert w.arm(soon, 10.0) == pytest.approx(10.0)
    assert len(w) == 10001 and soon in w
    assert w.next_at() == pytest.approx(10.0)
    assert w.expire(9.9) == []
    assert w.expire(10.0) == [soon]           # the 10,000 others are not looked at
    assert len(w) == 10000 and soon not in w
    assert w.next_at() == pytest.approx(1000.0)


def test_wheel_earlier_arming_stands(machine: ModuleType) -> None:
    w = machine.TimerWheel(0.05)
    obj = object()
    w.arm(obj, 5.0)
    assert w.arm(obj, 7.0) == pytest.approx(5.0)   # later: the earlier one stands
    assert w.arm(obj, 2.0) == pytest.approx(2.0)   # earlier: moved
    assert len(w) == 1
    assert w.expire(2.0) == [obj] and w.expire(5.0) == []
    # buckets round up: never due before the time asked for
    w.arm(obj, 3.01)
    assert w.expire(3.01) == [] and w.next_at() >= 3.01
    assert w.expire(w.next_at()) == [obj]


def test_wheel_discard(machine: ModuleType) -> None:
    w = machine.TimerWheel(0.05)
    a, b = object(), object()
    w.arm(a, 1.0)
    w.arm(b, 2.0)
    w.discard(a)
    w.discard(a)   # twice is harmless
    assert w.next_at() == pytest.approx(2.0)   # a's emptied bucket is skipped
    assert w.objects() == [b]
    assert w.expire(3.0) == [b] and w.next_at() == 0.0 and len(w) == 0
    with pytest.raises(ValueError):
        machine.TimerWheel(0)


# -- through real sockets, on both cores ---------------------------------------------


def find_conn(ex: Any, name: str) -> Any:
    (conn,) = ex.sites[name].conns.snapshot()
    return conn


def test_directions_through_a_half_close(core_name: str) -> None:
    """A connection's directions, as a half-close each way moves them."""
    async def main() -> None:
        b = await Backend(mode="greet").start()   # sends b"hello" and its EOF at once
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            r, w = await connect(site_address(ex))
            assert await r.read() == b"hello"      # the upstream's EOF arrived
            conn = find_conn(ex, "p")
            assert conn.directions == ("open", "open", "shut")
            w.write(b"bye")
            w.write_eof()
            await drained(ex)
            assert conn.directions == ("finished", "closed", "closed")
            assert conn.end == "eof" and (conn.bytes_in, conn.bytes_out) == (3, 5)
            await close(w)
        await eventually(lambda: b.results == [b"bye"] or not b.open)
        await b.stop()

    run(main())


def test_directions_under_back_pressure(core_name: str) -> None:
    """A client that does not read blocks the upstream-to-client direction;
    once it reads, everything arrives and the connection ends."""
    async def main() -> None:
        payload = bytes(range(256)) * 65536   # 16 MiB: more than the kernel buffers hold
        b = await Backend(mode="stream", payload=payload).start()
        async with proxy_site(ProxyFactory((b.address,))) as ex:
            r, w = await connect_not_reading(ex)
            await eventually(lambda: len(ex.sites["p"].conns) == 1)
            conn = find_conn(ex, "p")
            # not reading: the proxy stops reading the upstream (the EOF, if
            # it got that far, waits for the bytes before it)
            await eventually(lambda: conn.directions[2] in ("blocked", "eof_pend"))
            assert conn.directions[:2] == ("open", "open")
            got = b""
            while True:
                chunk = await asyncio.wait_for(r.read(1 << 20), 10)
                if not chunk:
                    break
                got += chunk
            assert got == payload
            assert conn.directions[2] == "shut"
            w.write_eof()
            await drained(ex)
            assert conn.end == "eof"
            await close(w)
        await b.stop()

    run(main())


def test_timer_runs_look_only_at_due_connections(core_name: str) -> None:
    """200 connections with a long idle timeout and one with a short one: the
    timer runs that close the short one take out only it (the connections
    that are not due cost a tick nothing); a connection that stays active
    is looked at once per idle period, not per chunk."""
    async def main() -> None:
        b = await Backend(mode="echo").start()
        async with proxy_site(ProxyFactory((b.address,), idle_timeout=600.0), name="long") as lx, \
                proxy_site(ProxyFactory((b.address,), idle_timeout=0.5), name="short") as sx:
            idle = [await connect(site_address(lx, "long")) for _ in range(200)]
            for r, w in idle:
                w.write(b"x")
            for r, w in idle:
                assert await r.readexactly(1) == b"x"
            stats = core.impl.engine_stats()
            assert stats["connections"] >= 200 and stats["armed"] >= 200
            before = stats

            # an idle connection, and a busy one: 40 round trips, one every 50 ms
            ir, iw = await connect(site_address(sx, "short"))
            iw.write(b"once")
            assert await ir.readexactly(4) == b"once"
            br, bw = await connect(site_address(sx, "short"))
            started = time.monotonic()
            for _ in range(40):
                bw.write(b"ping")
                assert await br.readexactly(4) == b"ping"
                await asyncio.sleep(0.05)
            busy_for = time.monotonic() - started
            # the idle one was closed by the proxy meanwhile, the busy one not
            with contextlib.suppress(ConnectionError):
                assert await ir.read() == b""
            assert service(sx, "short").counters.idle_closed == 1
            after = core.impl.engine_stats()
            ticks = after["ticks"] - before["ticks"]
            checked = after["checked"] - before["checked"]
            print(f"\n{core_name}: {ticks} timer runs looked at {checked} connections "
                  f"(201 open, 80 chunks relayed by the busy one in {busy_for:.2f}s)")
            assert ticks >= 1
            # the busy one: once per idle period it was open (plus the last);
            # the idle one: at most twice; the 200 others: never
            assert checked <= busy_for / 0.5 + 2 + 2
            await close(bw)
            await close(iw)
            for r, w in idle:
                await close(w)
            await drained(lx, "long")
            await drained(sx, "short")
        await b.stop()

    run(main(), timeout=120)
