"""One declaration per fact (issue 14, item 3).

* One option schema (``hotproxy.options``): the config file and the
  factories accept exactly the same values and refuse the others in the
  same words -- ``idle_timeout = 0`` means "never" in both (the real
  program runs it: a connection idle longer than a 1 s proxy's timeout
  still relays), ``fail_timeout = 0`` is refused by both.
* Connections counted once: ``hotproxy status`` of the real program shows
  each service's ``accepted`` (served) and ``refused`` (over
  ``max_connections``) as each was counted, once; before, a counting layer
  stacked over the limit counted a refused connection as accepted too.
* One address parser, one exception-to-line helper: the source says so
  (``test_interfaces.py`` guards what modules may reach for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
from typing import Any, Callable

import pytest

from conftest import eventually, free_port, run
from helpers_program import HOST, Program, toml
from hotproxy import ConfigError, LimitConnections, ProxyFactory
from hotproxy.config import parse_config
from hotproxy.options import ECHO_OPTIONS, PROXY_OPTIONS

Start = Callable[[str], Program]


# -- one schema: the file and the factories agree ----------------------------------------------

#: values to try on every option: (TOML text, the Python value it reads as)
PROBES: list[tuple[str, Any]] = [
    ("0", 0), ("-1", -1), ("0.5", 0.5), ("1", 1), ("2.0", 2.0), ("1e300", 1e300), ("inf", math.inf),
    ("nan", math.nan), ("true", True), ('"2"', "2"), ('"round_robin"', "round_robin"), ('"ROUND_ROBIN"', "ROUND_ROBIN"),
]

SOURCE = "/etc/hotproxy/schema.toml"


def _file_verdict(kind: str, key: str, toml_value: str) -> str | None:
    """None if the config file accepts ``key = value``, else what it says after the key."""
    extra = "upstreams = ['127.0.0.1:2']\n" if kind == "proxy" else ""
    text = f"[services.s]\nkind = '{kind}'\nlisten = '127.0.0.1:1'\n{extra}{key} = {toml_value}\n"
    try:
        parse_config(text, SOURCE)
    except ConfigError as exc:
        prefix = f"{SOURCE}: services.s.{key}: "
        assert str(exc).startswith(prefix), str(exc)   # one line naming the key, not "invalid proxy service"
        return str(exc)[len(prefix):]
    return None


def _factory_verdict(make: Callable[[], object], key: str) -> str | None:
    try:
        make()
    except ValueError as exc:
        assert str(exc).startswith(f"{key}: "), str(exc)
        return str(exc)[len(key) + 2:]
    return None


def test_the_schema_and_the_address_parser_import_without_asyncio_or_the_core() -> None:
    """What ``hotproxy check`` and ``--keys`` read is cheap to import: no
    asyncio, uvloop, core, config loader or services with it."""
    code = ("import sys, hotproxy.options, hotproxy.addresses, hotproxy.errors\n"
            "heavy = ('asyncio', 'uvloop', 'hotproxy._core', 'hotproxy._core_py', 'hotproxy.core', "
            "'hotproxy.config', 'hotproxy.service', 'hotproxy.listeners')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("key", [k for k in PROXY_OPTIONS if k != "upstreams"])
def test_the_file_and_the_proxy_factory_accept_the_same_values_in_the_same_words(key: str) -> None:
    disagree = []
    for text, value in PROBES:
        in_file = _file_verdict("proxy", key, text)
        in_factory = _factory_verdict(lambda: ProxyFactory(("127.0.0.1:2",), **{key: value}), key)
        if in_file != in_factory:
            disagree.append(f"{key} = {text}: file {in_file!r}, factory {in_factory!r}")
    assert disagree == []


def test_the_file_and_the_limit_layer_agree_on_max_connections() -> None:
    assert ECHO_OPTIONS["max_connections"] is PROXY_OPTIONS["max_connections"]   # one declaration
    disagree = []
    for text, value in PROBES:
        in_file = _file_verdict("echo", "max_connections", text)
        in_factory = _factory_verdict(lambda: LimitConnections(max_connections=value), "max_connections")
        if in_file != in_factory:
            disagree.append(f"max_connections = {text}: file {in_file!r}, layer {in_factory!r}")
    assert disagree == []
    # and the defaults are the declared ones
    assert LimitConnections().max_connections == ProxyFactory(("127.0.0.1:2",)).max_connections == \
        PROXY_OPTIONS["max_connections"].default


def test_idle_timeout_0_means_never_in_the_running_program(start: Start, core_name: str) -> None:
    """Two proxies to one echo, ``idle_timeout`` 0 and 1: the 1 s one closes
    its idle connection; the 0 one, idle for longer, still relays."""
    up, never, short = free_port(), free_port(), free_port()
    prog = start(toml({
        "up": {"kind": "echo", "listen": f"{HOST}:{up}"},
        "never": {"kind": "proxy", "listen": f"{HOST}:{never}", "upstreams": [f"{HOST}:{up}"], "idle_timeout": 0},
        "short": {"kind": "proxy", "listen": f"{HOST}:{short}", "upstreams": [f"{HOST}:{up}"], "idle_timeout": 1.0},
    }, workers=1))
    assert prog.config is not None

    async def say(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(data)), 10)

    async def main() -> None:
        await prog.wait_ready()
        code, out, err = await prog.cli("check", "-c", str(prog.config))
        assert code == 0, out + err
        r0, w0 = await asyncio.open_connection(HOST, never)
        r1, w1 = await asyncio.open_connection(HOST, short)
        try:
            assert await say(r0, w0, b"zero") == b"zero"
            assert await say(r1, w1, b"one") == b"one"
            # the 1 s proxy closes its connection once it has been idle 1 s
            # (bounded wait, no timing asserted) ...
            assert await asyncio.wait_for(r1.read(), 30) == b""
            # ... while the one opened before it, idle longer, is left open
            assert await say(r0, w0, b"still") == b"still"
        finally:
            for w in (w0, w1):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    run(main(), 90)


# -- counted once ------------------------------------------------------------------------------


LIMIT = 2


async def _open(port: int, greeting: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection with its greeting and one round trip, or None if it was refused (closed at once)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    try:
        if await asyncio.wait_for(reader.readexactly(len(greeting)), 10) == greeting:
            writer.write(b"ping")
            await writer.drain()
            if await asyncio.wait_for(reader.readexactly(4), 10) == b"ping":
                return reader, writer
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def test_each_service_counts_its_connections_once(start: Start, core_name: str) -> None:
    """An echo and a proxy with ``max_connections = 2``, 3 connections each
    held open: ``status`` shows 2 open, 2 accepted and 1 refused for each --
    every connection counted once, and no open count repeated in the totals."""
    up, echo, proxy = free_port(), free_port(), free_port()
    prog = start(toml({
        "up": {"kind": "echo", "listen": f"{HOST}:{up}", "greeting": "U"},
        "e": {"kind": "echo", "listen": f"{HOST}:{echo}", "greeting": "E", "max_connections": LIMIT},
        "p": {"kind": "proxy", "listen": f"{HOST}:{proxy}", "upstreams": [f"{HOST}:{up}"],
              "max_connections": LIMIT},
    }))
    assert prog.config is not None

    async def main() -> None:
        await prog.wait_ready()
        held = []
        try:
            for port, greeting in ((echo, b"E"), (proxy, b"U")):
                outcomes = [await _open(port, greeting) for _ in range(LIMIT + 1)]
                held += [c for c in outcomes if c is not None]
                assert sum(c is not None for c in outcomes) == LIMIT

            async def settled() -> dict[str, Any] | None:
                code, out, err = await prog.cli("status", "--json", "-c", str(prog.config))
                assert code == 0, out + err
                services = {s["name"]: s for s in json.loads(out)["services"]}
                done = all(services[n]["totals"].get("refused") == 1 for n in ("e", "p"))
                return services if done else None

            services = await eventually(settled, timeout=20)
            for name in ("e", "p"):
                s = services[name]
                print(f"{core_name}: {name}: active={s['active']} totals={s['totals']}")
                assert s["active"] == LIMIT
                assert (s["totals"]["accepted"], s["totals"]["refused"]) == (LIMIT, 1)
                assert not {"active", "limited_active", "limit"} & set(s["totals"])
            # the upstream echo served the proxy's two, nothing else
            assert services["up"]["totals"]["accepted"] == LIMIT and services["up"]["active"] == LIMIT
            code, out, err = await prog.cli("status", "-c", str(prog.config))
            assert code == 0 and "accepted=2" in out and "refused=1" in out, out + err
        finally:
            for _, w in held:
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    run(main(), 120)
