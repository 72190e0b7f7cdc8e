"""Weights, backups, per-upstream ``max_connections`` and consistent hashing (issue 17, items 3 and 4).

The table builder (``_balance``: Maglev) is checked on its own -- every
slot owned, only upstreams of weight >= 1, the same table whatever the
order or the core, shares by weight, and the fraction of keys that move
when one of 10 upstreams is added or removed (printed).  Everything else
runs the real ``hotproxy run`` program against upstreams in this process
(``test_proxy.Backend`` in ``tag`` mode: each connection is told which
upstream it reached): smooth weighted round robin exactly 3:1, backups
only while the primaries are down, an upstream's ``max_connections`` as
one limit over two workers, a reload that changes weights, backups,
limits and the policy under byte-checked traffic with no error, clients
that keep their upstream (``hash``) across a reload that adds one, and
``hotproxy check`` refusing each bad value in one line.  No assertion on
timing: every wait is for an event, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import eventually, free_port, run
from helpers_program import HOST, Program, Traffic, toml
from hotproxy import core
from hotproxy.proxy import ProxyFactory, UpstreamSpec, balance_module
from test_proxy import Backend

Start = Callable[..., Program]


# -- the table builder ------------------------------------------------------------------


def _modules() -> list[Any]:
    """``_balance`` of each core available (the compiled extension, the source as Python)."""
    previous = core.name()
    mods = []
    try:
        for name in (["compiled"] if core.COMPILED_AVAILABLE else []) + ["python"]:
            core.select(name)
            mods.append(balance_module())
    finally:
        core.select(previous)
    return mods


MODULES = _modules()

names_and_weights = st.dictionaries(
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=20),
    st.integers(min_value=0, max_value=256), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(names_and_weights, st.sampled_from([251, 1021, 4093]), st.randoms(use_true_random=False))
def test_table_owns_every_slot_with_positive_weights_only_and_is_deterministic(
        members: dict[str, int], size: int, rnd: random.Random) -> None:
    pairs = list(members.items())
    tables = []
    for mod in MODULES:
        rnd.shuffle(pairs)
        tables.append(mod.HashTable(tuple(pairs), size))
    positive = sorted(n for n, w in members.items() if w > 0)
    for table in tables:
        assert list(table.names) == positive
        if not positive:
            assert table.size == 0 and len(table.entries) == 0 and table.lookup(b"x") is None
            continue
        # every slot is owned, by a member of weight >= 1
        assert len(table.entries) == table.size == size
        assert all(0 <= e < len(positive) for e in table.entries)
        # each member gets about its weight's share (at least its weight's
        # first round of turns, unless the table filled before)
        total = sum(members[n] for n in positive)
        if total <= size:
            assert set(table.entries) == set(range(len(positive)))
    # the same table whatever the order of the members and the core that built it
    assert all(list(t.entries) == list(tables[0].entries) and t.names == tables[0].names for t in tables)
    key = b"203.0.113.7"
    assert len({mod.key_hash(key) for mod in MODULES}) == 1


def test_default_table_is_the_same_on_both_cores() -> None:
    members = tuple((f"127.0.0.1:{7000 + i}", 1 + i % 3) for i in range(7))
    tables = [mod.HashTable(members) for mod in MODULES]
    assert tables[0].size == MODULES[0].TABLE_SIZE == 65521
    assert all(list(t.entries) == list(tables[0].entries) for t in tables)


def test_table_shares_follow_the_weights() -> None:
    for mod in MODULES:
        table = mod.HashTable((("a", 3), ("b", 1), ("c", 0)))
        counts = [list(table.entries).count(i) for i in range(len(table.names))]
        assert table.names == ("a", "b")
        share = counts[0] / table.size
        print(f"weights 3:1 -> {counts[0]}:{counts[1]} of {table.size} slots ({share:.3f} for weight 3)")
        assert abs(share - 0.75) < 0.01


def _owners(table: Any, keys: list[bytes]) -> list[str]:
    return [table.lookup(k) for k in keys]


def test_adding_or_removing_one_of_ten_moves_about_a_tenth_of_the_keys() -> None:
    """100,000 client addresses over 10 upstreams: adding an 11th moves ~1/11 of
    them, removing one ~1/10 (within 1.5x); the modulo hash moved ~10/11."""
    mod = MODULES[0]
    keys = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}".encode() for i in range(100_000)]
    ten = [(f"127.0.0.1:{7000 + i}", 1) for i in range(10)]
    before = _owners(mod.HashTable(tuple(ten)), keys)
    added = _owners(mod.HashTable(tuple(ten + [("127.0.0.1:7010", 1)])), keys)
    removed = _owners(mod.HashTable(tuple(ten[:4] + ten[5:])), keys)
    moved_add = sum(a != b for a, b in zip(before, added)) / len(keys)
    moved_remove = sum(a != b for a, b in zip(before, removed)) / len(keys)
    # most of the keys that moved went to the new upstream / came from the removed one
    to_new = sum(a != b and a == "127.0.0.1:7010" for a, b in zip(added, before)) / len(keys)
    from_removed = sum(a != b and b == ten[4][0] for a, b in zip(removed, before)) / len(keys)
    # the spread: each of the 10 owns ~1/10 of the keys
    spread = [before.count(name) / len(keys) for name, _ in ten]
    print(f"moved fraction: add 1 to 10 -> {moved_add:.4f} (1/11 = {1 / 11:.4f}; {to_new:.4f} to the new one); "
          f"remove 1 of 10 -> {moved_remove:.4f} (1/10; {from_removed:.4f} from the removed one); "
          f"shares {min(spread):.4f}..{max(spread):.4f}")
    assert moved_add <= 1.5 / 11 and moved_remove <= 1.5 / 10
    assert to_new >= 0.9 * moved_add and from_removed >= 0.9 * moved_remove
    assert min(spread) > 0.08 and max(spread) < 0.12


# -- the config ----------------------------------------------------------------------------


def config(services: dict[str, dict[str, Any]], *, workers: int = 2, drain: float = 5.0) -> str:
    """A config file's text; upstream tables as TOML inline tables."""
    return toml(services, workers=workers, drain=drain)


def proxy(port: int, upstreams: list[Any], **opts: Any) -> dict[str, Any]:
    return {"kind": "proxy", "listen": f"{HOST}:{port}", "upstreams": upstreams, **opts}


async def tag_of(port: int, local: str | None = None) -> str | None:
    """Connect to the proxy; the name of the upstream it reached (None: closed without one)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, local_addr=(local, 0) if local else None), 10)
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
        return line.decode().strip() or None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def upstreams_of(prog: Program, name: str) -> dict[str, Any]:
    for s in (await prog.status())["services"]:
        if s["name"] == name:
            return s["upstreams"]  # type: ignore[no-any-return]
    raise KeyError(name)


async def reload(prog: Program, text: str) -> None:
    assert prog.config is not None
    prog.config.write_text(text)
    code, out, err = await prog.cli("reload", "-c", str(prog.config))
    assert code == 0, out + err


# -- weights ----------------------------------------------------------------------------------


def test_weights_3_to_1_give_exactly_300_and_100_of_400_spread_evenly(start: Start, core_name: str) -> None:
    """One worker, smooth weighted round robin: 400 connections, 300 to the
    weight-3 upstream and 100 to the other, never two of the light one in a
    row and never more than three of the heavy one; status shows the weights."""
    px = free_port()

    async def main() -> None:
        a, b = await Backend("a", "tag").start(), await Backend("b", "tag").start()
        prog = start(config({"px": proxy(px, [{"address": a.address, "weight": 3}, b.address])}, workers=1))
        try:
            await prog.wait_ready()
            seq = [await tag_of(px) for _ in range(400)]
            print(f"{core_name}: weights 3:1 over 400 connections -> a={seq.count('a')} b={seq.count('b')}; "
                  f"first 12: {''.join(s or '-' for s in seq[:12])}")
            assert (seq.count("a"), seq.count("b")) == (300, 100)
            assert (a.accepted, b.accepted) == (300, 100)
            text = "".join(s or "-" for s in seq)
            assert "bb" not in text and "aaaa" not in text
            ups = await upstreams_of(prog, "px")
            assert (ups[a.address]["weight"], ups[b.address]["weight"]) == (3, 1)
            assert ups[a.address]["backup"] is False and ups[a.address]["max_connections"] == 0
            code, out, err = await prog.cli("status", "--json", "-c", str(prog.config))
            assert code == 0, err
            assert json.loads(out)["services"][0]["upstreams"][a.address]["weight"] == 3
            # a reload to 1:3 goes on from the current weights (kept by address): 1:3 from the start
            await reload(prog, config({"px": proxy(px, [a.address, {"address": b.address, "weight": 3}])},
                                      workers=1))
            seq = [await tag_of(px) for _ in range(400)]
            text = "".join(s or "-" for s in seq)
            print(f"{core_name}: after a reload to 1:3 -> a={seq.count('a')} b={seq.count('b')}; first 12: {text[:12]}")
            assert abs(seq.count("a") - 100) <= 1 and seq.count("a") + seq.count("b") == 400
            assert "aa" not in text and "bbbb" not in text
        finally:
            prog.kill()
            await a.stop()
            await b.stop()

    run(main(), 120)


def test_weighted_least_conn_fills_by_weight(start: Start) -> None:
    """least_conn with weights 3:1 and held connections: 8 held split 6:2
    (fewest active per unit of weight)."""
    px = free_port()

    async def main() -> None:
        a, b = await Backend("a", "tag").start(), await Backend("b", "tag").start()
        prog = start(config({"px": proxy(px, [{"address": a.address, "weight": 3}, b.address],
                                         balance="least_conn")}, workers=1))
        held = []
        try:
            await prog.wait_ready()
            for _ in range(8):
                r, w = await asyncio.open_connection(HOST, px)
                held.append(w)
                assert (await asyncio.wait_for(r.readline(), 10)).strip() in (b"a", b"b")
            print(f"least_conn 3:1, 8 held -> a={len(a.open)} b={len(b.open)}")
            assert (len(a.open), len(b.open)) == (6, 2)
        finally:
            for w in held:
                w.close()
            prog.kill()
            await a.stop()
            await b.stop()

    run(main(), 120)


# -- backups ------------------------------------------------------------------------------------


def test_backup_gets_connections_only_while_every_primary_is_down(start: Start, core_name: str) -> None:
    """Two workers, primaries p1 p2 and a backup: the backup gets nothing while
    a primary is up; with both primaries' backends gone every connection is
    served by the backup; when a primary is back it takes them again."""
    px = free_port()

    async def main() -> None:
        p1, p2, bk = (await Backend("p1", "tag").start(), await Backend("p2", "tag").start(),
                      await Backend("bk", "tag").start())
        ups = [p1.address, p2.address, {"address": bk.address, "backup": True}]
        prog = start(config({"px": proxy(px, ups, fail_timeout=0.5)}))
        try:
            await prog.wait_ready()
            first = [await tag_of(px) for _ in range(40)]
            assert set(first) == {"p1", "p2"} and bk.accepted == 0
            port1 = int(p1.address.rpartition(":")[2])
            await p1.stop()
            await p2.stop()
            down = [await tag_of(px) for _ in range(40)]
            print(f"{core_name}: primaries up -> {sorted(set(first))}; both down -> {sorted(set(down))} "
                  f"({bk.accepted} on the backup)")
            assert down == ["bk"] * 40
            ups_status = await upstreams_of(prog, "px")
            assert ups_status[bk.address]["backup"] is True
            await p1.start(port=port1)
            # once p1's ejection ends (fail_timeout) it takes the connections again
            await eventually(lambda: _next_is(px, "p1"), timeout=30, interval=0.1)
            after = bk.accepted
            back = [await tag_of(px) for _ in range(20)]
            assert back == ["p1"] * 20 and bk.accepted == after
        finally:
            prog.kill()
            for b in (p1, p2, bk):
                await b.stop()

    run(main(), 150)


async def _next_is(port: int, name: str) -> bool:
    return await tag_of(port) == name


# -- per-upstream max_connections ----------------------------------------------------------------


def test_upstream_max_connections_is_one_limit_over_two_workers(start: Start, core_name: str) -> None:
    """a (max 3) and b (max 2) behind 2 workers: of 16 connections held at
    once exactly 5 reach an upstream, 3 on a and 2 on b, whichever worker
    took them; the rest are closed without one (``no_upstream``).  Closing
    one on a makes room for exactly one more."""
    px = free_port()

    async def main() -> None:
        a, b = await Backend("a", "hold").start(), await Backend("b", "hold").start()
        a.mode = b.mode = "tag"
        ups = [{"address": a.address, "max_connections": 3}, {"address": b.address, "max_connections": 2}]
        prog = start(config({"px": proxy(px, ups)}))
        held: list[tuple[str, Any]] = []
        try:
            await prog.wait_ready()
            refused = 0
            for _ in range(16):
                r, w = await asyncio.open_connection(HOST, px)
                line = await asyncio.wait_for(r.readline(), 10)
                if line:
                    held.append((line.decode().strip(), w))
                else:
                    refused += 1
                    w.close()
            status = await prog.status()
            ups_status = await upstreams_of(prog, "px")
            svc = next(s for s in status["services"] if s["name"] == "px")
            print(f"{core_name}: 16 held over 2 workers -> served a={len(a.open)} b={len(b.open)}, "
                  f"closed {refused}; instance_active a={ups_status[a.address].get('instance_active')} "
                  f"b={ups_status[b.address].get('instance_active')}; totals {svc.get('totals')}")
            assert (len(a.open), len(b.open), refused) == (3, 2, 11)
            assert ups_status[a.address]["max_connections"] == 3
            assert ups_status[a.address]["instance_active"] == 3 and ups_status[b.address]["instance_active"] == 2
            # both workers took some of the 16 (else this would not show an instance-wide limit)
            # both workers turned connections away at the limit (so the 5 are the instance's, not a worker's)
            await eventually(lambda: all(f"worker[{i}] WARNING hotproxy.proxy: service px: every upstream left is "
                                         f"at its max_connections" in prog.log() for i in (0, 1)))
            # the counts carry over a reload (the held connections stay on the old
            # version; the new one with other weights counts them): still full
            await reload(prog, config({"px": proxy(px, [{**ups[0], "weight": 2}, {**ups[1], "weight": 3}])}))
            assert await tag_of_held(px, held) is None
            # one on a closes: exactly one more fits
            name, w = next(x for x in held if x[0] == "a")
            held.remove((name, w))
            w.close()
            await eventually(lambda: len(a.open) == 2)
            await eventually(lambda: _instance_active(prog, a.address, 2))
            assert await tag_of_held(px, held) == "a"
            assert await tag_of_held(px, held) is None
            # kill -9 a worker: its connections' counts come back once the master has seen it die
            status = await prog.status()
            prog.worker_pids += [w["pid"] for w in status["workers"]]
            victim = status["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)

            async def back() -> bool:
                st = await prog.status()
                return st["restarts"] == 1 and all(w["alive"] and "px" in w["sites"] for w in st["workers"])

            await eventually(back, timeout=30)
            prog.worker_pids += [w["pid"] for w in (await prog.status())["workers"]]

            async def settled() -> bool:
                # the instance's counts are the upstream connections still open (none leaked)
                ups = await upstreams_of(prog, "px")
                return bool(ups[a.address]["instance_active"] == len(a.open)
                            and ups[b.address]["instance_active"] == len(b.open))

            await eventually(settled, timeout=30)
            left = (len(a.open), len(b.open))
            more = [await tag_of_held(px, held) for _ in range(16)]
            print(f"{core_name}: killed worker {victim}; {left} still on a, b; of 16 new: "
                  f"a={more.count('a')} b={more.count('b')}")
            assert (more.count("a"), more.count("b")) == (3 - left[0], 2 - left[1])
            assert (len(a.open), len(b.open)) == (3, 2)
        finally:
            for _, w in held:
                w.close()
            prog.kill()
            await a.stop()
            await b.stop()

    run(main(), 120)


async def _instance_active(prog: Program, addr: str, n: int) -> bool:
    return bool((await upstreams_of(prog, "px"))[addr].get("instance_active") == n)


async def tag_of_held(port: int, held: list[tuple[str, Any]]) -> str | None:
    """Like ``tag_of`` but a served connection is kept open (in *held*)."""
    r, w = await asyncio.open_connection(HOST, port)
    line = (await asyncio.wait_for(r.readline(), 10)).decode().strip()
    if line:
        held.append((line, w))
        return line
    w.close()
    return None


# -- hash ---------------------------------------------------------------------------------------


def test_hash_keeps_clients_on_their_upstream_across_workers_and_a_reload_that_adds_one(
        start: Start, core_name: str) -> None:
    """200 client addresses (127.0.1.x, 127.0.2.x) over 5 upstreams and 2
    workers: each client reaches the same upstream every time, whichever
    worker takes it; a reload that adds a 6th upstream moves about 1/6 of
    them (the rest, the large majority, keep theirs)."""
    px = free_port()
    clients = [f"127.0.{1 + i // 100}.{1 + i % 100}" for i in range(200)]

    async def main() -> None:
        bs = [await Backend(f"u{i}", "tag").start() for i in range(6)]
        five = config({"px": proxy(px, [b.address for b in bs[:5]], balance="hash")})
        prog = start(five)
        try:
            await prog.wait_ready()
            first = [await tag_of(px, c) for c in clients]
            again = [await tag_of(px, c) for c in clients]
            assert first == again and None not in first
            await reload(prog, config({"px": proxy(px, [b.address for b in bs], balance="hash")}))
            after = [await tag_of(px, c) for c in clients]
            kept = sum(a == b for a, b in zip(first, after)) / len(clients)
            to_new = sum(a != b and a == "u5" for a, b in zip(after, first)) / len(clients)
            print(f"{core_name}: hash, 200 clients, 5 -> 6 upstreams: {kept:.3f} kept their upstream, "
                  f"{to_new:.3f} moved to the new one (ideal 5/6 = {5 / 6:.3f} kept); spread before: "
                  f"{sorted(first.count(f'u{i}') for i in range(5))}")
            assert kept >= 0.7 and to_new > 0
        finally:
            prog.kill()
            for b in bs:
                await b.stop()

    run(main(), 150)


# -- a reload under traffic ---------------------------------------------------------------------


def test_reloads_that_change_weights_backups_limits_and_policy_lose_no_byte(
        start: Start, traffic: Callable[..., Traffic]) -> None:
    """Byte-checked echo traffic through the proxy while 8 reloads change its
    upstreams' weights, backups and limits and its policy: no error."""
    px, e1, e2, e3 = free_port(), free_port(), free_port(), free_port()
    echoes = {f"e{i}": {"kind": "echo", "listen": f"{HOST}:{p}"} for i, p in enumerate((e1, e2, e3), 1)}
    a1, a2, a3 = (f"{HOST}:{p}" for p in (e1, e2, e3))
    versions = [
        proxy(px, [a1, a2]),
        proxy(px, [{"address": a1, "weight": 5}, a2]),
        proxy(px, [{"address": a1, "weight": 1}, {"address": a2, "weight": 7}, {"address": a3, "backup": True}]),
        proxy(px, [a1, {"address": a2, "max_connections": 1000}, a3], balance="least_conn"),
        proxy(px, [{"address": a1, "weight": 2}, {"address": a3, "weight": 3}], balance="random"),
        proxy(px, [a1, a2, a3], balance="hash"),
        proxy(px, [{"address": a1, "weight": 4}, a2, a3], balance="hash"),
        proxy(px, [{"address": a2, "weight": 256, "max_connections": 500}, {"address": a1, "backup": True}]),
        proxy(px, [a1, a2]),
    ]
    prog = start(config({**echoes, "px": versions[0]}))

    async def main() -> None:
        await prog.wait_ready()
        load = traffic([f"{HOST}:{px}"], long=2, short=3, seed=17)
        for v in versions[1:]:
            await reload(prog, config({**echoes, "px": v}))
            await asyncio.sleep(0.3)   # let traffic run on this version (not a timed assertion)
        totals = await load.finish()
        print("reloads under traffic:", json.dumps(totals))
        assert totals["long_failed"] == 0 and totals["short_failed"] == 0, totals
        assert totals["long_ok"] == 2 and totals["short_ok"] > 0
        assert "Traceback" not in prog.log()

    run(main(), 150)


# -- hotproxy check --------------------------------------------------------------------------------


BAD_UPSTREAMS = [
    ('{ address = "127.0.0.1:9", weight = 0 }', "services.px.upstreams[0].weight: expected an integer >= 1, got 0"),
    ('{ address = "127.0.0.1:9", weight = 257 }',
     "services.px.upstreams[0].weight: expected an integer <= 256, got 257"),
    ('{ address = "127.0.0.1:9", weight = 1.5 }',
     "services.px.upstreams[0].weight: expected an integer >= 1, got 1.5"),
    ('{ address = "127.0.0.1:9", backup = "yes" }',
     "services.px.upstreams[0].backup: expected true or false, got 'yes'"),
    ('{ address = "127.0.0.1:9", max_connections = -1 }',
     "services.px.upstreams[0].max_connections: expected an integer >= 0, got -1"),
    ('{ address = "127.0.0.1:9", wieght = 2 }', "services.px.upstreams[0].wieght: unknown key (expected one of: "
                                                "address, weight, backup, max_connections)"),
    ('{ weight = 2 }', "services.px.upstreams[0].address: missing"),
    ('{ address = "127.0.0.1" }', "services.px.upstreams[0].address: bad upstream address"),
    ('{ address = "127.0.0.1:9", backup = true }',
     "services.px: invalid proxy service: upstreams: every upstream is a backup; expected at least one that is not"),
    ('"127.0.0.1:9", { address = "127.0.0.1:9", weight = 2 }',
     "services.px: invalid proxy service: upstreams[1]: '127.0.0.1:9' is listed twice"),
    ('3', "services.px.upstreams[0]: expected an address string or a table, got 3"),
]


@pytest.mark.parametrize("ups, message", BAD_UPSTREAMS)
def test_check_rejects_each_bad_upstream_value_in_one_line(tmp_path: Any, ups: str, message: str) -> None:
    cfg = tmp_path / "hotproxy.toml"
    cfg.write_text(f'[services.px]\nkind = "proxy"\nlisten = "127.0.0.1:{free_port()}"\nupstreams = [{ups}]\n')
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "hotproxy.cli", "check", "-c", str(cfg)], capture_output=True,
                          text=True, timeout=60, env={**os.environ})
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1, out
    assert len(out.splitlines()) == 1 and "Traceback" not in out, out
    assert message in out and str(cfg) in out, out


def test_factory_in_code_takes_both_forms() -> None:
    f = ProxyFactory(("127.0.0.1:1", {"address": "127.0.0.1:2", "weight": 3},
                      UpstreamSpec("127.0.0.1:3", backup=True, max_connections=7)))
    assert f.upstreams == ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    assert [(s.weight, s.backup, s.max_connections) for s in f.upstream_specs] == [(1, False, 0), (3, False, 0),
                                                                                  (1, True, 7)]
    assert f.named("x").upstream_specs == f.upstream_specs     # replace() keeps them
    with pytest.raises(ValueError, match=r"upstreams\[1\]: weight: expected an integer <= 256, got 300"):
        ProxyFactory(("127.0.0.1:1", {"address": "127.0.0.1:2", "weight": 300}))


# -- the core's count of an upstream's connections (in process, on both cores) ---------------------


def test_upstream_count_is_released_by_a_failed_attempt_and_by_the_end_of_the_connection(core_name: str) -> None:
    """A limited upstream that refuses: each attempt takes a count and gives it
    back when it fails (the next connection may try it again); a connection
    that reached a limited upstream holds one count until it ends; a single
    limited upstream at its limit closes the connection (no_upstream)."""
    from test_proxy import close, connect, drained, proxy_site, request, service, site_address

    async def main() -> None:
        good = await Backend("g", "echo").start()
        dead = f"127.0.0.1:{free_port()}"   # nothing listens: connects are refused
        f = ProxyFactory(({"address": dead, "max_connections": 1}, {"address": good.address, "max_connections": 1}),
                         max_fails=0)
        async with proxy_site(f) as ex:
            limits = {t.up.text: t.limit for t in service(ex).targets}
            for i in range(4):
                assert await request(site_address(ex), b"x%d" % i) == b"x%d" % i
                await drained(ex)
                assert (limits[dead].value, limits[good.address].value) == (0, 0)
            assert service(ex).counters.connect_failures >= 1
            r, w = await connect(site_address(ex))
            w.write(b"held")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"held"
            assert limits[good.address].value == 1
            # the good one is full and the other refuses: no upstream for the next one
            assert await request(site_address(ex), b"no") == b""
            await close(w)
            await drained(ex)
            assert (limits[dead].value, limits[good.address].value) == (0, 0)
        single = ProxyFactory(({"address": good.address, "max_connections": 1},))
        async with proxy_site(single) as ex:
            r, w = await connect(site_address(ex))
            w.write(b"one")
            assert await asyncio.wait_for(r.readexactly(3), 10) == b"one"
            assert await request(site_address(ex), b"two") == b""
            assert service(ex).counters.no_upstream == 1
            await close(w)
            await drained(ex)
            assert await request(site_address(ex), b"three") == b"three"
        await good.stop()

    run(main(), 60)


def test_a_version_with_the_same_upstreams_and_weights_reuses_the_hash_table(core_name: str) -> None:
    """Same addresses and weights: the next version takes the previous one's
    table object (not rebuilt); a weight changed: a new table."""
    from hotproxy.commands import Precommit, Update
    from test_proxy import proxy_site, service

    async def main() -> None:
        ups = ("127.0.0.1:7001", {"address": "127.0.0.1:7002", "weight": 2})
        async with proxy_site(ProxyFactory(ups, balance="hash")) as ex:
            first = dict(service(ex).balancer.tables)
            await ex.execute(Precommit("p", ProxyFactory(ups, balance="hash", retries=1)))
            await ex.execute(Update("p"))
            same = service(ex).balancer.tables
            assert list(same) == list(first) and all(same[k] is first[k] for k in first)
            await ex.execute(Precommit("p", ProxyFactory(("127.0.0.1:7001", "127.0.0.1:7002"), balance="hash")))
            await ex.execute(Update("p"))
            other = service(ex).balancer.tables
            assert list(other) != list(first)

    run(main(), 30)


def test_upstream_counter_slots_are_kept_by_address_and_survive_an_adoption() -> None:
    """``next_slot(key)`` names a slot by upstream address: the same slot for
    every version, whatever the order, and kept by an upgrade's ``adopt``."""
    from hotproxy.commands import Precommit
    from hotproxy.limits import Segment

    seg = Segment.create(1, worker=0, slots=16, generations=2)
    try:
        def stamp(ups: tuple[Any, ...]) -> ProxyFactory:
            f = seg.stamp(Precommit("p", ProxyFactory(ups))).factory
            assert isinstance(f, ProxyFactory)
            return f
        one = stamp(({"address": "127.0.0.1:1", "max_connections": 3}, "127.0.0.1:2"))
        two = stamp(("127.0.0.1:3", {"address": "127.0.0.1:2", "max_connections": 5},
                     {"address": "127.0.0.1:1", "max_connections": 4}))
        assert one.counter == two.counter
        slots1, slots2 = dict(one.upstream_counters), dict(two.upstream_counters)
        assert list(slots1) == ["127.0.0.1:1"] and slots2["127.0.0.1:1"] == slots1["127.0.0.1:1"]
        assert len({one.counter, *slots2.values()}) == 3
        adopted = Segment.adopt(os.dup(seg.fd), 1, {0}, seg.slot_names())
        try:
            assert adopted.slot_for("p", "upstream 127.0.0.1:1").slot == slots1["127.0.0.1:1"].slot
        finally:
            adopted.close()
    finally:
        seg.close()
