"""The ClientHello parser (``hotproxy.clienthello``) on real ClientHellos
made by Python's ``ssl`` module, and fuzzed (hypothesis): it answers
"need more", a name, or one ``ClientHelloError`` line -- never another
exception, never an answer that needs more than ``MAX_BUFFERED`` bytes.
"""

from __future__ import annotations

import ssl
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotproxy.clienthello import MAX_BUFFERED, MAX_HELLO, MAX_RECORDS, ClientHelloError, server_name

FAST = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def client_hello(host: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl) asking for *host*."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def records(message: bytes, sizes: list[int]) -> bytes:
    """*message* (a handshake message) split into TLS records of *sizes* bytes (the rest in the last)."""
    out, pos = bytearray(), 0
    for size in sizes + [len(message)]:
        part = message[pos:pos + size]
        if not part:
            break
        out += struct.pack("!BHH", 22, 0x0301, len(part)) + part
        pos += len(part)
    return bytes(out)


def hello_message(host: str | None) -> bytes:
    data = client_hello(host)
    length = struct.unpack("!H", data[3:5])[0]
    return data[5:5 + length]


def answer(data: bytes) -> str | None | ClientHelloError:
    try:
        return server_name(data)
    except ClientHelloError as exc:
        assert "\n" not in str(exc) and str(exc)
        return exc


@pytest.mark.parametrize("host, expect", [
    ("example.com", "example.com"), ("API.Example.COM", "api.example.com"), ("a-b_c.example.", "a-b_c.example"),
    (None, ""),
])
def test_real_client_hellos(host: str | None, expect: str) -> None:
    data = client_hello(host)
    assert server_name(data) == expect
    # every proper prefix is "need more", never a wrong answer
    for i in range(len(data)):
        assert server_name(data[:i]) is None
    # bytes after the ClientHello's record (early data, a next record) are not looked at
    assert server_name(data + b"\x17\x03\x03\x00\x05hello") == expect


def test_a_hello_over_several_records() -> None:
    msg = hello_message("split.example")
    for sizes in ([1], [1, 1, 1], [3, 40], [100, 100, 100]):
        data = records(msg, sizes)
        assert server_name(data) == "split.example"
        assert all(server_name(data[:i]) is None for i in range(len(data)))
    with pytest.raises(ClientHelloError, match="more than 8 records"):
        server_name(records(msg, [1] * MAX_RECORDS))


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.1\r\n\r\n", "not a TLS handshake"),
    (b"\x16\x02", "not TLS"),
    (b"\x16\x03\x01\x00\x00", "bad TLS record length 0"),
    (b"\x16\x03\x01\x40\x01", "bad TLS record length"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
    (b"\x16\x03\x01\x00\x04\x01\x00\x40\x01", "at most 16384"),
    (b"\x16\x03\x01\x00\x06\x01\x00\x00\x01\x03\x03", "bytes after the ClientHello"),
    (b"\x15\x03\x01\x00\x02\x02\x28", "record type 21"),
])
def test_not_a_client_hello(data: bytes, why: str) -> None:
    with pytest.raises(ClientHelloError, match=why):
        server_name(data)


def _with_extensions(exts: bytes) -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack("!H", len(exts)) + exts
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return records(msg, [])


def _sni(*names: bytes, kind: int = 0) -> bytes:
    lst = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for n in names)
    data = struct.pack("!H", len(lst)) + lst
    return struct.pack("!HH", 0, len(data)) + data


@pytest.mark.parametrize("exts, expect", [
    (_sni(b"ok.example"), "ok.example"),
    (_sni(b"ok.example") + struct.pack("!HH", 10, 2) + b"\x00\x17", "ok.example"),
    (_sni(b"a.example", b"b.example"), "two host names"),
    (_sni(b"ok.example") + _sni(b"ok.example"), "appears twice"),
    (_sni(b""), "server name of 0 bytes"),
    (_sni(b"bad name.example"), "bad server name"),
    (_sni(b"\xc3\xa9.example"), "bad server name"),
    (_sni(b"a..example"), "bad server name"),
    (_sni(b"x" * 300), "server name of 300 bytes"),
    (_sni(b"ok.example", kind=7), "without a host name"),
    (struct.pack("!HH", 0, 9) + b"\x00\x07\x00\x00\x05abcd", "truncated"),
])
def test_server_name_extension(exts: bytes, expect: str) -> None:
    result = answer(_with_extensions(exts))
    if isinstance(result, ClientHelloError):
        assert expect in str(result)
    else:
        assert result == expect


@FAST
@given(st.binary(max_size=600))
def test_any_bytes(data: bytes) -> None:
    answer(data)


@FAST
@given(st.binary(max_size=80), st.integers(0, 600), st.integers(0, 255))
def test_a_mutated_real_hello(junk: bytes, where: int, byte: int) -> None:
    data = bytearray(client_hello("fuzz.example"))
    where %= len(data)
    data[where] = byte
    answer(bytes(data))
    answer(bytes(data[:where]) + junk)


@FAST
@given(st.lists(st.integers(1, 600), max_size=MAX_RECORDS - 1), st.binary(max_size=64))
def test_split_hellos_and_what_follows(sizes: list[int], tail: bytes) -> None:
    data = records(hello_message("fuzz.example"), sizes)
    assert server_name(data) == "fuzz.example"
    assert answer(data + tail) == "fuzz.example"


@FAST
@given(st.integers(4, MAX_HELLO + 100), st.lists(st.integers(1, 1 << 14), min_size=1, max_size=12))
def test_an_answer_never_needs_more_than_max_buffered(length: int, sizes: list[int]) -> None:
    # a header announcing *length* bytes, records of *sizes*, padded with zeros:
    # either an answer comes (error or name) or we are inside MAX_BUFFERED
    msg = b"\x01" + (length - 4).to_bytes(3, "big")
    data = bytearray()
    for i, size in enumerate(sizes):
        data += struct.pack("!BHH", 22, 0x0303, size) + (msg if i == 0 else b"")[:size]
        data += bytes(size - min(size, len(msg) if i == 0 else 0))
        if answer(bytes(data)) is not None:
            return
        assert len(data) <= MAX_BUFFERED


# -- in place, as the cores call it; the route table --------------------------------

from hotproxy import clienthello as _compiled  # noqa: E402
from hotproxy import core as _core  # noqa: E402

#: the compiled extension and the same source run as Python (the pure-Python core's)
MODULES = {"compiled": _compiled, "python": _core.python_source("clienthello")}


def _outcome(mod: Any, data: bytearray, n: int) -> object:
    try:
        return mod.server_name_in(data, n)
    except mod.ClientHelloError as exc:
        return ("error", str(exc))


@FAST
@given(st.lists(st.integers(1, 600), max_size=3), st.integers(0, 700), st.integers(0, 255), st.binary(max_size=64),
       st.booleans())
def test_in_place_in_a_larger_buffer_answers_as_a_copy(sizes: list[int], where: int, byte: int, tail: bytes,
                                                        mutate: bool) -> None:
    # the cores hand the parser their read buffer and the bytes held: whatever
    # lies after them is never looked at, and both builds answer alike
    data = bytearray(records(hello_message("fuzz.example"), sizes))
    if mutate:
        data[where % len(data)] = byte
    for n in (len(data), where % (len(data) + 1)):
        expect = answer(bytes(data[:n]))
        want = ("error", str(expect)) if isinstance(expect, ClientHelloError) else expect
        for mod in MODULES.values():
            assert _outcome(mod, data[:n] + tail + bytes(64), n) == want


@pytest.mark.parametrize("which", sorted(MODULES))
def test_route_table_picks_exact_then_longest_suffix_then_default_and_counts(which: str) -> None:
    mod = MODULES[which]
    routed: dict[str, int] = {"*.gone": 7}
    table = mod.RouteTable({"a.example": "A"}, {"example": "W", "b.example": "WB"}, "D", routed)
    got = [table.route(n) for n in ("a.example", "x.example", "x.b.example", "b.example", "a.b.c.example",
                                    "other", "", "example")]
    assert got == ["A", "W", "WB", "W", "W", "D", "D", "D"]
    assert routed == {"*.gone": 7, "a.example": 1, "*.example": 3, "*.b.example": 1, "": 3}
    no_default = mod.RouteTable({"a.example": "A"}, {}, None, {})
    assert no_default.route("b.example") is None and no_default.route("") is None
    assert no_default.routed == {}
