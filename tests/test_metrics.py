"""The Prometheus endpoint, scraped from a real ``hotproxy run`` over real sockets.

The values must match what the test did (connections made, an upstream
killed, reloads), the text must parse with ``prometheus_client``'s parser,
and a scrape must be answered even while a worker is stopped or reloads
storm under load.  Nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from pathlib import Path
from typing import Any, Callable


from conftest import eventually, free_port, run
from helpers_program import Program, ShortLoop, roundtrip, toml
from hotproxy.metrics import METRICS, parse

Start = Callable[..., Program]
ROOT = Path(__file__).resolve().parent.parent


async def http(port: int, path: str = "/metrics", *, method: str = "GET",
               accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 request to 127.0.0.1:*port*."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if accept is not None:
            head += f"Accept: {accept}\r\n"
        writer.write((head + "\r\n").encode())
        data = await asyncio.wait_for(reader.read(), 30)   # the server closes after the response
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    code, headers, body = await http(port)
    assert code == 200, (code, body[:200])
    assert headers["content-type"].startswith("text/plain")
    return parse(body.decode())


def value(samples: dict[str, Any], name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


def test_metrics_count_what_happened(start: Start) -> None:
    e, p, q, m, dead = (free_port() for _ in range(5))
    services = {"e": {"kind": "echo", "listen": f"127.0.0.1:{e}"},
                "p": {"kind": "proxy", "listen": f"127.0.0.1:{p}", "upstreams": [f"127.0.0.1:{e}"]},
                "q": {"kind": "proxy", "listen": f"127.0.0.1:{q}", "upstreams": [f"127.0.0.1:{dead}"],
                      "max_fails": 1, "fail_timeout": 600.0, "retries": 0}}
    prog = start(toml(services, metrics=f"127.0.0.1:{m}"))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        samples = await scrape(m)
        # every family of the reference is there (counters with their _total samples)
        code, _, body = await http(m)
        from prometheus_client.parser import text_string_to_metric_families

        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert set(METRICS) <= names, sorted(set(METRICS) - names)
        assert value(samples, "hotproxy_reloads_total", result="ok") == 1
        assert value(samples, "hotproxy_workers") == 2 and value(samples, "hotproxy_workers_alive") == 2
        assert value(samples, "hotproxy_upstream_up", service="p", upstream=f"127.0.0.1:{e}") == 1

        for i in range(7):
            assert await roundtrip(p, 0, b"x" * (i + 1)) == b"x" * (i + 1)

        async def counted() -> bool:
            s = await scrape(m)
            return (value(s, "hotproxy_service_connections_total", service="p") == 7
                    and value(s, "hotproxy_service_received_bytes_total", service="p") == 28
                    and value(s, "hotproxy_upstream_connections_total", service="p",
                              upstream=f"127.0.0.1:{e}") == 7
                    and value(s, "hotproxy_service_connections_active", service="p") == 0)

        await eventually(counted)

        # an upstream that refuses: one failed connect ejects it (max_fails = 1)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            await roundtrip(q, 0, b"y")

        async def ejected() -> bool:
            s = await scrape(m)
            return (value(s, "hotproxy_upstream_up", service="q", upstream=f"127.0.0.1:{dead}") == 0
                    and (value(s, "hotproxy_upstream_connect_failures_total", service="q",
                               upstream=f"127.0.0.1:{dead}") or 0) >= 1)

        await eventually(ejected)
        assert f"service q: upstream 127.0.0.1:{dead} ejected" in prog.log()   # the line names its service

        # a reload that applies, then one that fails
        good = toml(dict(services, e=dict(services["e"], greeting="v2\n")), metrics=f"127.0.0.1:{m}")
        cfg.write_text(good)
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err
        sock = prog.socket_path()
        cfg.write_text("this is not toml [")
        code, out, err = await prog.cli("reload", "--socket", sock)
        assert code == 1 and "TOML" in err, out + err
        cfg.write_text(good)   # (not reloaded: the helpers find the admin socket in it)
        s = await scrape(m)
        assert value(s, "hotproxy_reloads_total", result="ok") == 2
        assert value(s, "hotproxy_reloads_total", result="failed") == 1
        assert value(s, "hotproxy_last_reload_success") == 0
        assert value(s, "hotproxy_service_generation", service="e") == 2
        assert value(s, "hotproxy_config_generation") == 2

        # OpenMetrics when asked; other paths and methods refused
        code, headers, body = await http(m, accept="application/openmetrics-text; version=1.0.0")
        assert code == 200 and headers["content-type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
        assert (await http(m, "/nope"))[0] == 404
        assert (await http(m, method="POST"))[0] == 405
        assert (await http(m, method="HEAD"))[2] == b""

        # a stopped worker: the scrape is answered, partial, and says so
        pids = [w["pid"] for w in (await prog.status())["workers"]]
        os.kill(pids[0], signal.SIGSTOP)
        try:
            s = await scrape(m)
            assert value(s, "hotproxy_worker_up", worker="0") == 0
            assert value(s, "hotproxy_worker_up", worker="1") == 1
        finally:
            os.kill(pids[0], signal.SIGCONT)

    run(main(), 120)


def test_scrapes_are_answered_during_a_reload_storm_under_load(start: Start) -> None:
    e, p, m = free_port(), free_port(), free_port()

    def text(greeting: str) -> str:
        return toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{e}", "greeting": greeting},
                     "p": {"kind": "proxy", "listen": f"127.0.0.1:{p}", "upstreams": [f"127.0.0.1:{e}"]}},
                    metrics=f"127.0.0.1:{m}")

    prog = start(text("a\n"))
    cfg = prog.config
    assert cfg is not None

    async def main() -> None:
        await prog.wait_ready()
        load = ShortLoop({e: {b"a\n", b"b\n"}}).start()
        scrapes, errors = 0, []
        try:
            for i in range(60):   # 20 a second for 3 s, a reload every other scrape
                if i % 2 == 0:
                    cfg.write_text(text("b\n" if i % 4 else "a\n"))
                    prog.signal(signal.SIGHUP)
                try:
                    code, _, body = await http(m)
                    if code != 200 or b"hotproxy_reloads_total" not in body:
                        errors.append(f"scrape {i}: {code}")
                    scrapes += 1
                except Exception as exc:   # every failure counts
                    errors.append(f"scrape {i}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)
        finally:
            await load.stop()
        samples = await scrape(m)
        print(f"{scrapes} scrapes, {len(errors)} errors; {load.ok} connections, {len(load.failures)} failed; "
              f"{samples['hotproxy_reloads_total']} reloads")
        assert errors == [] and scrapes == 60
        assert load.failures == [] and load.ok > 0
        assert (value(samples, "hotproxy_reloads_total", result="ok") or 0) >= 2

    run(main(), 120)


def test_the_config_digest_follows_each_reload(start: Start) -> None:
    """``hotproxy_config_info``'s digest (computed once per config, not per
    scrape): the same after a reload of the unchanged file, another after a
    change, the first again once the change is undone."""
    e, m = free_port(), free_port()

    def text(greeting: str) -> str:
        return toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{e}", "greeting": greeting}},
                    metrics=f"127.0.0.1:{m}")

    prog = start(text("a\n"))
    cfg = prog.config
    assert cfg is not None

    async def digest() -> str:
        (labels,) = (await scrape(m))["hotproxy_config_info"]
        return dict(labels)["digest"]

    async def reload(greeting: str) -> None:
        cfg.write_text(text(greeting))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err

    async def main() -> None:
        await prog.wait_ready()
        first = await digest()
        assert first == await digest()
        await reload("a\n")
        assert await digest() == first
        await reload("b\n")
        second = await digest()
        await reload("a\n")
        print(f"digests: {first} -> {second} -> {await digest()}")
        assert second != first and await digest() == first

    run(main(), 60)


def test_a_metrics_address_in_use_or_clashing_is_one_line(start: Start, tmp_path: Path) -> None:
    e, m = free_port(), free_port()
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", m))
        holder.listen(1)
        prog = start(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{e}"}}, metrics=f"127.0.0.1:{m}"))
        assert run(prog.wait_exit(60), 70) == 1
        assert "cannot start: runtime.metrics 127.0.0.1:" in prog.log()
        assert "Traceback" not in prog.log()
    clash = tmp_path / "clash.toml"
    clash.write_text(toml({"e": {"kind": "echo", "listen": f"127.0.0.1:{e}"}}, metrics=f"127.0.0.1:{e}"))
    code, out, err = run(prog.cli("check", "-c", str(clash)), 60)
    assert code == 1 and "overlaps runtime.metrics" in err and len(err.splitlines()) == 1, err


def _buckets(samples: dict[str, Any], name: str, **labels: str) -> list[tuple[float, float]]:
    """A histogram's (le, cumulative count) samples for *labels*, by bound."""
    want = set(labels.items())
    out = [(float(dict(key)["le"]), v) for key, v in samples.get(name + "_bucket", {}).items()
           if want <= set(key)]
    return sorted(out)


def test_histograms_count_every_connection_and_survive_a_reload(start: Start) -> None:
    """Connect time per upstream, connection duration per service, ejections:
    the counts match the connections made, summed over two workers, and a
    reload that makes a new version of the service keeps them."""
    e, p, q, m, dead = (free_port() for _ in range(5))
    up, gone = f"127.0.0.1:{e}", f"127.0.0.1:{dead}"
    services = {"e": {"kind": "echo", "listen": f"127.0.0.1:{e}"},
                "p": {"kind": "proxy", "listen": f"127.0.0.1:{p}", "upstreams": [up]},
                "q": {"kind": "proxy", "listen": f"127.0.0.1:{q}", "upstreams": [gone],
                      "max_fails": 1, "fail_timeout": 600.0, "retries": 0}}
    prog = start(toml(services, metrics=f"127.0.0.1:{m}"))
    cfg = prog.config
    assert cfg is not None

    def check(s: dict[str, Any], n: int) -> bool:
        # n connections through p: n connects to its upstream, n durations
        connect = _buckets(s, "hotproxy_upstream_connect_seconds", service="p", upstream=up)
        duration = _buckets(s, "hotproxy_connection_duration_seconds", service="p")
        if value(s, "hotproxy_upstream_connect_seconds_count", service="p", upstream=up) != n:
            return False
        if value(s, "hotproxy_connection_duration_seconds_count", service="p") != n:
            return False
        for buckets in (connect, duration):
            # cumulative, ending with +Inf = the count
            assert [c for _, c in buckets] == sorted(c for _, c in buckets), buckets
            assert buckets[-1] == (float("inf"), n), buckets
        assert (value(s, "hotproxy_upstream_connect_seconds_sum", service="p", upstream=up) or 0) >= 0
        assert ((value(s, "hotproxy_connection_duration_seconds_sum", service="p") or 0) > 0) == (n > 0)
        return True

    async def main() -> None:
        await prog.wait_ready()
        s = await scrape(m)
        assert check(s, 0)
        for i in range(6):
            assert await roundtrip(p, 0, b"h" * (i + 1)) == b"h" * (i + 1)

        async def six() -> bool:
            return check(await scrape(m), 6)

        await eventually(six)
        s = await scrape(m)
        print(f"\nconnect time buckets (le, cumulative) after 6 connections: "
              f"{_buckets(s, 'hotproxy_upstream_connect_seconds', service='p', upstream=up)}")
        print(f"duration buckets: {_buckets(s, 'hotproxy_connection_duration_seconds', service='p')}")

        # one failed connect ejects q's upstream (max_fails = 1): one ejection, no connect time
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            await roundtrip(q, 0, b"y")

        async def ejected() -> bool:
            s = await scrape(m)
            return value(s, "hotproxy_upstream_ejections_total", service="q", upstream=gone) == 1

        await eventually(ejected)
        s = await scrape(m)
        assert value(s, "hotproxy_upstream_connect_seconds_count", service="q", upstream=gone) == 0
        assert value(s, "hotproxy_upstream_ejections_total", service="p", upstream=up) == 0

        # a reload that makes new versions of p and q: the counts carry over
        cfg.write_text(toml(dict(services, p=dict(services["p"], idle_timeout=123.0),
                                 q=dict(services["q"], idle_timeout=123.0)), metrics=f"127.0.0.1:{m}"))
        code, out, err = await prog.cli("reload", "-c", str(cfg))
        assert code == 0, out + err
        s = await scrape(m)
        assert check(s, 6)
        assert value(s, "hotproxy_upstream_ejections_total", service="q", upstream=gone) == 1
        assert value(s, "hotproxy_service_generation", service="p") == 2
        for i in range(3):
            assert await roundtrip(p, 0, b"after") == b"after"

        async def nine() -> bool:
            return check(await scrape(m), 9)

        await eventually(nine)

    run(main(), 120)


def test_the_readme_documents_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    table = {m.group(1) for m in re.finditer(r"^\| `(hotproxy_[a-z_]+)`", readme, re.M)}
    assert table == set(METRICS), (sorted(set(METRICS) - table), sorted(table - set(METRICS)))
