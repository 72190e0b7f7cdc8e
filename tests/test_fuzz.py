"""Property-based tests (hypothesis): the config loader and the admin socket
protocol never raise anything but their one error type, never print a
traceback, never hang.  Bounded: a fixed number of examples, each with a
deadline, so the CI suite stays fast.  Plus the admin socket's path checks
that were not covered elsewhere (a foreign owner, a shared directory).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import string
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run
from hotproxy.admin import MAX_REQUEST, AdminClient, AdminError, AdminServer
from hotproxy.config import Config, ConfigError, parse_config

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
HERE = "/etc/hotproxy/fuzz.toml"


def _load(text: str) -> Config | None:
    """parse_config's contract: a Config, or a ConfigError of one line naming the file."""
    try:
        return parse_config(text, HERE)
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(HERE + ": "), msg
        assert "Traceback" not in msg
        return None


# -- the config loader -------------------------------------------------------------------------

@FAST
@given(st.text(max_size=400))
def test_any_text_is_a_config_or_one_error_line(text: str) -> None:
    _load(text)


# TOML values of every type; host names only from a fixed set, so no example
# waits on a DNS lookup
HOSTS = ["127.0.0.1", "[::1]", "::1", "localhost", "0.0.0.0", "256.1.1.1", "", "unix:/tmp/x.sock", "unix:"]
scalars = st.one_of(
    st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
    st.text(alphabet=string.printable, max_size=20),
    st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(HOSTS), st.integers(-5, 70000)),
    st.sampled_from(["round_robin", "random", "least_conn", "hash", "echo", "proxy", "info", ""]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
KEYS = ["kind", "listen", "upstreams", "balance", "connect_timeout", "idle_timeout", "max_connections",
        "retries", "max_fails", "fail_timeout", "keepalive", "access_log", "greeting", "backlog", "colour"]
RUNTIME_KEYS = ["workers", "cpu_affinity", "drain_timeout", "log_level", "pidfile", "admin_socket", "nope"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


@st.composite
def configs(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.booleans()):
        lines.append("[runtime]")
        for key in draw(st.lists(st.sampled_from(RUNTIME_KEYS), max_size=4, unique=True)):
            lines.append(f"{key} = {_toml_value(draw(values))}")
    for i in range(draw(st.integers(0, 3))):
        lines.append(f"[services.s{i}]")
        lines.append(f"kind = {json.dumps(draw(st.sampled_from(['echo', 'proxy', 'ftp'])))}")
        for key in draw(st.lists(st.sampled_from(KEYS[1:]), max_size=6, unique=True)):
            lines.append(f"{key} = {_toml_value(draw(values))}")
    return "\n".join(lines) + "\n"


@FAST
@given(configs())
def test_structured_configs_are_valid_or_one_error_line(text: str) -> None:
    cfg = _load(text)
    if cfg is not None:
        # what was accepted is usable: the numbers fit the C types and timers they go to
        assert 1 <= cfg.runtime.workers <= 1024
        for svc in cfg.services.values():
            for key, value in svc.options.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    assert value == value and abs(value) <= 365 * 24 * 3600 * 1000, (key, value)


# -- the admin socket protocol --------------------------------------------------------------------


async def _handler(request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    return {"ok": True, "cmd": request["cmd"]}, False


lines = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                st.dictionaries(st.sampled_from(["cmd", "graceful", "x"]), inner, max_size=3)),
        max_leaves=8)),
    st.builds(lambda c, extra: json.dumps({"cmd": c, **extra}).encode(),
              st.sampled_from(["status", "reload", "stop", "", "STATUS"]),
              st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)),
)


def test_admin_protocol_answers_every_line_with_one_json_reply(tmp_path: Path) -> None:
    """Every request line gets exactly one JSON reply ({"ok": ...}); the server lives on."""
    path = str(tmp_path / "admin.sock")

    @settings(max_examples=200, deadline=2000, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(lines, min_size=1, max_size=5))
    def check(batch: list[bytes]) -> None:
        async def main() -> None:
            server = AdminServer(path, _handler, ("status",))
            await server.start()
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REQUEST * 2)
                for raw in batch:
                    line = raw.replace(b"\n", b" ") + b"\n"
                    writer.write(line)
                    if not line.strip():
                        continue       # blank lines are skipped without a reply
                    reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
                    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
                writer.close()
                # the server still answers a good request on a new connection
                client = AdminClient(path)
                await client.connect()
                assert await asyncio.wait_for(client.request("status"), 5) == {"ok": True, "cmd": "status"}
                await client.close()
            finally:
                await server.close()

        run(main(), 20)

    check()


@pytest.mark.parametrize("line, expected", [
    (b"[" * 50000 + b"\n", "malformed request: not JSON"),                 # deeper than the parser's stack
    (b'{"cmd": "status", "n": ' + b"9" * 5000 + b"}\n", "malformed request: not JSON"),   # int too long
    (b'{"cmd": "status"' + b"\x00" + b"}\n", "malformed request: not JSON"),
    (b"\xc3\x28\n", "malformed request: not JSON"),
], ids=["nested-50000", "int-5000-digits", "nul-byte", "bad-utf8"])
def test_admin_requests_that_break_the_json_parser_are_answered(tmp_path: Path, line: bytes, expected: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "admin.sock")

    async def main() -> None:
        server = AdminServer(path, _handler, ("status",))
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(line)
            reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert reply["ok"] is False and reply["error"].startswith(expected), reply
            writer.write(b'{"cmd": "status"}\n')          # the same connection goes on
            assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == {"ok": True, "cmd": "status"}
            writer.close()
        finally:
            await server.close()

    run(main(), 20)
    assert "Traceback" not in caplog.text and "admin request failed" not in caplog.text


# -- the admin socket's path: gaps in test_config's checks -------------------------------------------


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a file owned by someone else")
def test_admin_socket_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    os.chown(path, 65534, 65534)

    async def main() -> None:
        with pytest.raises(AdminError, match="owned by uid 65534, not by us; refusing"):
            await AdminServer(str(path), _handler, ()).start()

    run(main(), 10)
    assert path.exists()   # not removed either


def test_a_shared_default_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-user default directory must be ours and private (not a 0777 one someone planted)."""
    d = tmp_path / f"hotproxy-{os.getuid()}"
    d.mkdir()
    d.chmod(0o777)

    async def main() -> None:
        with pytest.raises(AdminError, match="not a private directory of ours; refusing"):
            await AdminServer(str(d / "x.sock"), _handler, ()).start()
        d.rmdir()
        d.symlink_to(tmp_path)
        with pytest.raises(AdminError, match="not a private directory of ours; refusing"):
            await AdminServer(str(d / "x.sock"), _handler, ()).start()

    run(main(), 10)


# -- the PROXY protocol header parser (hotproxy reads it from the network) ----------------------

def _machines() -> list[Any]:
    """_core_machine as each core runs it: compiled (if built) and as plain Python."""
    from hotproxy import _core_py, core
    mods = [_core_py._machine]
    if core.COMPILED_AVAILABLE:
        import hotproxy._core_machine as compiled
        mods.append(compiled)
    return mods


_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 65535)


def _parse_one(m: Any, data: bytes) -> Any:
    """m.parse_proxy_header(data), or ("error", message) for its own error (and only that)."""
    try:
        return m.parse_proxy_header(data)
    except Exception as exc:  # pylint: disable=broad-except
        assert type(exc).__name__ == "ProxyHeaderError" and isinstance(exc, ValueError), repr(exc)
        assert "\n" not in str(exc)
        return ("error", str(exc))


def _check_parse(data: bytes) -> Any:
    """parse_proxy_header's contract on both cores: the same answer; only
    its own error; never more than the data or PROXY_HEADER_MAX; decided by
    the first PROXY_HEADER_MAX bytes (never looks past them)."""
    answers = []
    for m in _machines():
        got = _parse_one(m, data)
        if got is None:
            assert len(data) < m.PROXY_HEADER_MAX   # with that many bytes it always decides
        elif got[0] != "error":
            assert 0 < got[0] <= min(len(data), m.PROXY_HEADER_MAX)
            # bytes after the header change nothing
            assert _parse_one(m, data[:got[0]]) == got
        assert _parse_one(m, data[:m.PROXY_HEADER_MAX]) == got
        answers.append(got)
    assert all(a == answers[0] for a in answers), answers
    return answers[0]


@FAST
@given(st.binary(max_size=600))
def test_proxy_header_parser_on_any_bytes(data: bytes) -> None:
    _check_parse(data)


@FAST
@given(st.sampled_from([b"PROXY ", _V2_SIG, b"PROXY TCP4 ", b"PROXY TCP6 ", _V2_SIG + b"\x21\x11",
                        _V2_SIG + b"\x21\x21", _V2_SIG + b"\x20"]), st.binary(max_size=300))
def test_proxy_header_parser_on_bytes_after_a_signature(start: bytes, rest: bytes) -> None:
    _check_parse(start + rest)


@FAST
@given(st.integers(1, 2), st.one_of(st.tuples(_ipv4, _ipv4), st.tuples(_ipv6, _ipv6), st.tuples(_ipv4, _ipv6)),
       _port, _port, st.binary(max_size=64), st.data())
def test_proxy_header_round_trip_and_prefixes(version: int, hosts: tuple[str, str], sport: int, dport: int,
                                              after: bytes, data: Any) -> None:
    """What proxy_header builds parses back to the same addresses (an IPv4
    one beside an IPv6 one becomes IPv4-mapped); every proper prefix asks
    for more; bytes after the header are not looked at."""
    import ipaddress

    m = _machines()[-1]
    src, dst = (hosts[0], sport), (hosts[1], dport)
    hdr = m.proxy_header(version, src, dst)
    n, psrc, pdst = _check_parse(hdr + after)
    assert n == len(hdr)

    def same(a: str, b: str) -> bool:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
        return x == y or getattr(y, "ipv4_mapped", None) == x

    assert same(src[0], psrc[0]) and same(dst[0], pdst[0]) and (psrc[1], pdst[1]) == (sport, dport)
    k = data.draw(st.integers(0, len(hdr) - 1))
    assert _check_parse(hdr[:k]) is None


@FAST
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=6), st.integers(0, 4))
def test_proxy_header_v2_tlvs_are_skipped_or_refused(tlvs: list[tuple[int, bytes]], cut: int) -> None:
    """Well-formed TLVs are skipped (same addresses); a TLV cut short is refused."""
    body = bytes((1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2))
    raw = b"".join(bytes((t, len(v) >> 8, len(v) & 255)) + v for t, v in tlvs)
    if cut and raw:
        raw = raw[:-min(cut, len(raw))]
        tlv_ok = False
    else:
        tlv_ok = True
    full = body + raw
    hdr = _V2_SIG + b"\x21\x11" + struct.pack("!H", len(full)) + full
    got = _check_parse(hdr + b"data")
    if tlv_ok:
        assert got == (len(hdr), ("1.2.3.4", 1), ("5.6.7.8", 2))
    else:
        # a cut may still end on a TLV boundary: then it is well-formed
        assert got[0] == "error" or got[0] == len(hdr)


@settings(max_examples=40, deadline=2000, derandomize=True)
@given(st.sampled_from([b"PROXY ", _V2_SIG + b"\x21\x11"]), st.integers(0, 70000), st.binary(max_size=64),
       st.integers(0, 255))
def test_proxy_header_parser_is_bounded(start: bytes, length: int, some: bytes, fill: int) -> None:
    """Past PROXY_HEADER_MAX (4096) bytes: decided, never waiting for more; a v2
    header's declared length decides at once whether it fits."""
    rest = some + bytes((fill,)) * 4100
    if start.startswith(_V2_SIG):
        start += struct.pack("!H", length & 0xFFFF)
    got = _check_parse(start + rest)
    assert got is not None
    m = _machines()[0]
    fits = V2_MAX_BODY = m.PROXY_HEADER_MAX - 16
    body = bytes(12) + bytes((0xEE, (fits - 15) >> 8, (fits - 15) & 255)) + bytes(fits - 15)
    assert len(body) == V2_MAX_BODY
    ok = _V2_SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body
    assert _check_parse(ok + rest)[0] == m.PROXY_HEADER_MAX
    over = _V2_SIG + b"\x21\x11" + struct.pack("!H", len(body) + 1) + body
    assert _check_parse(over[:20])[0] == "error"
