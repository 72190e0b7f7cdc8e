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
import sys
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import eventually, free_port, run
from helpers_program import HOST, Program, Traffic
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


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v)


def config(services: dict[str, dict[str, Any]], *, workers: int = 2, drain: float = 5.0) -> str:
    """A config file's text; upstream tables as TOML inline tables."""
    lines = ["[runtime]", f"workers = {workers}", f"drain_timeout = {drain}", 'admin_socket = "admin.sock"',
             'log_level = "info"']
    for name, opts in services.items():
        lines.append(f"\n[services.{name}]")
        lines += [f"{k} = {_value(v)}" for k, v in opts.items()]
    return "\n".join(lines) + "\n"


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
            gens = svc["generations"]
            assert len(gens) == 2
            # one on a closes: exactly one more fits
            name, w = next(x for x in held if x[0] == "a")
            held.remove((name, w))
            w.close()
            await eventually(lambda: len(a.open) == 2)
            await eventually(lambda: _instance_active(prog, a.address, 2))
            assert await tag_of_held(px, held) == "a"
            assert await tag_of_held(px, held) is None
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
