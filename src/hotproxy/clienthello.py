# cython: annotation_typing=False
"""The server name of a TLS ClientHello, read without terminating TLS.

``server_name(data)`` looks at the first bytes a client sent and says one
of three things: more bytes are needed (``None``), here is the name the
client asked for (a ``str``, ``""`` when it sent no ``server_name``
extension), or this is not a ClientHello hotproxy accepts
(``ClientHelloError``, one line).  It never consumes anything: the caller
keeps the bytes and relays them untouched, so the TLS session stays end to
end (HAProxy's ``req.ssl_sni``, nginx's ``ssl_preread``).

The parser is strict and bounded -- it reads bytes a stranger sent:

* only TLS handshake records (content type 22) of version 3.x, each at
  most 2**14 bytes of payload (RFC 8446 5.1);
* the first handshake message must be a ClientHello; it may span several
  records, but the message is at most ``MAX_HELLO`` bytes and the records
  that carry it at most ``MAX_RECORDS`` (so the bytes buffered are bounded
  by ``MAX_BUFFERED`` whatever the peer sends);
* every length is checked against the bytes that hold it before it is
  used; an extension type seen twice, a ``server_name`` list with two host
  names, an empty or over-long name, a name that is not ASCII letters,
  digits, ``-``, ``_`` and dots, or bytes left over after the extensions
  are errors.

The name is returned lower-cased, without a trailing dot, since DNS names
compare that way (RFC 6066 3: the name is ASCII, with no trailing dot).

Everything here is pure computation on ``bytes``, one call per arrival of
data while the hello is incomplete (a client sends it in one segment in
practice), so it costs one parse per connection.
"""

from __future__ import annotations

from typing import Any

#: the largest ClientHello handshake message accepted (header included)
MAX_HELLO = 16 * 1024
#: the most TLS records it may span
MAX_RECORDS = 8
#: the most bytes a caller ever needs to buffer to get an answer
MAX_BUFFERED = MAX_HELLO + MAX_RECORDS * 5

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_MAX_RECORD = 1 << 14
_EXT_SERVER_NAME = 0
_HOST_NAME = 0
_NAME_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789-_."


class ClientHelloError(ValueError):
    """The bytes are not a ClientHello hotproxy accepts (the message says why, in one line)."""


def server_name(data: bytes) -> str | None:
    """The server name in the ClientHello that starts *data*.

    None: *data* is a valid beginning but incomplete (read more, up to
    ``MAX_BUFFERED`` bytes in all); ``""``: a complete ClientHello without
    a server name; else the name (lower case, no trailing dot).
    ``ClientHelloError`` for anything else.
    """
    return server_name_in(bytearray(data), len(data))


def server_name_in(data: bytearray, n: int) -> str | None:
    """``server_name`` of the first *n* bytes of *data* (``0 <= n <= len(data)``):
    a connection's read buffer, read in place.  A ClientHello alone in its
    first record (what clients send) is parsed where it lies, nothing
    copied; one spread over several records is reassembled first."""
    if n >= 9 and data[0] == _HANDSHAKE and data[1] == 3 and data[5] == _CLIENT_HELLO:
        length = (data[3] << 8) | data[4]
        if 4 <= length <= _MAX_RECORD and n >= 5 + length:
            need = 4 + ((data[6] << 16) | (data[7] << 8) | data[8])
            if need == length and need <= MAX_HELLO:
                # the whole message is the first record's payload
                return _parse_hello(data, 9, 5 + need)
    # anything else (several records, incomplete, wrong): the general path
    hello = _handshake_message(bytes(data[:n]))
    if hello is None:
        return None
    return _parse_hello(bytearray(hello), 4, len(hello))


def _handshake_message(data: bytes) -> bytes | None:
    """The first handshake message, reassembled from its records; None if incomplete."""
    body = bytearray()
    need = -1          # the message's length (header included), once its header is in
    pos = 0
    records = 0
    n = len(data)
    while need < 0 or len(body) < need:
        if pos + 5 > n:
            _check_prefix(data, pos)
            return None
        ctype, major, length = data[pos], data[pos + 1], (data[pos + 3] << 8) | data[pos + 4]
        if ctype != _HANDSHAKE:
            raise ClientHelloError(f"not a TLS handshake (record type {ctype})")
        if major != 3:
            raise ClientHelloError(f"not TLS (record version {major}.{data[pos + 2]})")
        if length == 0 or length > _MAX_RECORD:
            raise ClientHelloError(f"bad TLS record length {length}")
        records += 1
        if records > MAX_RECORDS:
            raise ClientHelloError(f"ClientHello spread over more than {MAX_RECORDS} records")
        start = pos + 5
        chunk = data[start:start + length]
        before = len(body)
        body += chunk
        if need < 0 and len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                raise ClientHelloError(f"the first handshake message is not a ClientHello (type {body[0]})")
            need = 4 + ((body[1] << 16) | (body[2] << 8) | body[3])
            if need > MAX_HELLO:
                raise ClientHelloError(f"ClientHello of {need} bytes (at most {MAX_HELLO})")
        if need >= 0 and before + length > need:
            # another handshake message follows in the same record: a client
            # sends nothing after its ClientHello before the server answers
            # (so the bytes buffered never pass MAX_BUFFERED)
            raise ClientHelloError("bytes after the ClientHello in its record")
        if len(chunk) < length:
            return None        # this record is still arriving
        pos = start + length
    return bytes(body[:need])


def _check_prefix(data: bytes, pos: int) -> None:
    """Reject a partial record header as soon as its known bytes are wrong."""
    n = len(data) - pos
    if n >= 1 and data[pos] != _HANDSHAKE:
        raise ClientHelloError(f"not a TLS handshake (record type {data[pos]})")
    if n >= 2 and data[pos + 1] != 3:
        raise ClientHelloError(f"not TLS (record version {data[pos + 1]}.x)")


# The message is read by position over *data* (``pos`` up to ``end``), every
# length checked against the bytes that hold it before it is used (``_take``);
# typed by clienthello.pxd when compiled, so the walk is C.

def _take(pos: int, n: int, end: int, what: str) -> int:
    """Skip *n* bytes at *pos* (at most up to *end*); where they end."""
    if n > end - pos:
        raise ClientHelloError(f"ClientHello truncated in {what}")
    return pos + n


def _parse_hello(data: bytearray, pos: int, end: int) -> str:
    # data[pos:end]: a ClientHello's body (after its 4-byte header)
    pos = _take(pos, 2, end, "the version")
    version = (data[pos - 2] << 8) | data[pos - 1]
    if version >> 8 != 3:
        raise ClientHelloError(f"not TLS (ClientHello version {version >> 8}.{version & 0xff})")
    pos = _take(pos, 32, end, "the random")
    pos = _take(pos, 1, end, "the session id")
    sid = data[pos - 1]
    if sid > 32:
        raise ClientHelloError(f"session id of {sid} bytes (at most 32)")
    pos = _take(pos, sid, end, "the session id")
    pos = _take(pos, 2, end, "the cipher suites")
    suites = (data[pos - 2] << 8) | data[pos - 1]
    if suites == 0 or suites % 2:
        raise ClientHelloError(f"bad cipher suites length {suites}")
    pos = _take(pos, suites, end, "the cipher suites")
    pos = _take(pos, 1, end, "the compression methods")
    methods = data[pos - 1]
    if methods == 0:
        raise ClientHelloError("no compression methods")
    pos = _take(pos, methods, end, "the compression methods")
    if pos == end:
        return ""              # no extensions at all (allowed before TLS 1.3)
    pos = _take(pos, 2, end, "the extensions")
    n = (data[pos - 2] << 8) | data[pos - 1]
    exts_end = _take(pos, n, end, "the extensions")
    if exts_end != end:
        raise ClientHelloError(f"{end - exts_end} bytes after the extensions")
    low = 0            # the extension types below 64 seen, as bits (what clients send)
    one = 1
    seen: set[int] | None = None    # the others
    name = ""
    while pos < exts_end:
        pos = _take(pos, 2, exts_end, "an extension")
        etype = (data[pos - 2] << 8) | data[pos - 1]
        pos = _take(pos, 2, exts_end, "an extension")
        n = (data[pos - 2] << 8) | data[pos - 1]
        ext = pos
        pos = _take(pos, n, exts_end, "an extension")
        if etype < 64:
            bit = one << etype
            if low & bit:
                raise ClientHelloError(f"extension {etype} appears twice")
            low |= bit
        elif seen is None:
            seen = {etype}
        elif etype in seen:
            raise ClientHelloError(f"extension {etype} appears twice")
        else:
            seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            name = _parse_server_name(data, ext, pos)
    return name


def _parse_server_name(data: bytearray, pos: int, end: int) -> str:
    # data[pos:end]: the server_name extension's data
    if pos == end:
        return ""              # an empty server_name extension (a server's echo; tolerated)
    pos = _take(pos, 2, end, "server_name")
    n = (data[pos - 2] << 8) | data[pos - 1]
    names_end = _take(pos, n, end, "server_name")
    if names_end != end:
        raise ClientHelloError("bytes after the server_name list")
    host = ""
    while pos < names_end:
        pos = _take(pos, 1, names_end, "server_name")
        kind = data[pos - 1]
        pos = _take(pos, 2, names_end, "server_name")
        n = (data[pos - 2] << 8) | data[pos - 1]
        start = pos
        pos = _take(pos, n, names_end, "server_name")
        if kind != _HOST_NAME:
            continue           # other name types are skipped (none is defined)
        if host:
            raise ClientHelloError("two host names in server_name")
        host = _host_at(data, start, pos)
    if not host:
        raise ClientHelloError("server_name without a host name")
    return host


class RouteTable:
    """``sni_routes`` by server name, asked once per connection, compiled
    with the parser (clienthello.pxd) so the core's call makes no Python frame.

    ``route(name)``: the group of the exact *name*, else of the longest
    ``*.suffix`` that ends it (at any depth: ``*.example`` matches
    ``a.b.example``, and ``*.b.example`` wins over it), else the default
    group, else None (closed).  Each hit is counted in *routed* by route
    name (``"a.example"``, ``"*.example"``; ``""`` the default), the
    service's counts, kept across versions.  A group is whatever the caller
    gave (the proxy's balancers); *name* is as the parser returns it.
    """

    def __init__(self, exact: dict[str, Any], wildcard: dict[str, Any], default: Any,
                 routed: dict[str, int]) -> None:
        self.exact = exact          # name -> group
        self.wildcard = wildcard    # "example" (for "*.example") -> group
        self.default = default      # the default group, or None: no default
        self.routed = routed

    def route(self, name: str) -> Any:
        """The group for server name *name* ("": none sent), counted; None: no route."""
        routed = self.routed
        if name:
            group = self.exact.get(name)
            if group is not None:
                routed[name] = routed.get(name, 0) + 1
                return group
            if self.wildcard:
                i = name.find(".")
                while i >= 0:
                    # the longest suffix first: a.b.example tries b.example, then example
                    suffix = name[i + 1:]
                    group = self.wildcard.get(suffix)
                    if group is not None:
                        key = "*." + suffix
                        routed[key] = routed.get(key, 0) + 1
                        return group
                    i = name.find(".", i + 1)
        if self.default is not None:
            routed[""] = routed.get("", 0) + 1
        return self.default


def _host_at(data: bytearray, start: int, end: int) -> str:
    """``_host(bytes(data[start:end]))``, checked byte by byte where it lies."""
    n = end - start
    if n and data[end - 1] == 0x2E:
        end -= 1               # one trailing dot goes (RFC 6066 3)
    if end == start or end - start > 253:
        raise ClientHelloError(f"server name of {n} bytes")
    prev = 0x2E                # a leading dot is as bad as two dots
    for i in range(start, end):
        c = data[i]
        if not ((0x61 <= c <= 0x7A) or (0x41 <= c <= 0x5A) or (0x30 <= c <= 0x39) or c == 0x2D or c == 0x5F
                or (c == 0x2E and prev != 0x2E)):
            raise ClientHelloError(f"bad server name {bytes(data[start:start + n])[:64]!r}")
        prev = c
    return data[start:end].decode("ascii").lower()


def route_name(text: object) -> str:
    """An ``sni_routes`` key checked and lower-cased: a server name as the
    parser returns them (``a.example``), or a wildcard ``*.example`` (every
    name that ends in ``.example``, at any depth); ``ValueError`` (one line)
    if it is neither."""
    if not isinstance(text, str):
        raise ValueError(f"expected a server name, got {type(text).__name__}")
    name = text.lower()
    rest = name[2:] if name.startswith("*.") else name
    try:
        raw = rest.encode("ascii")
        if raw.endswith(b".") or _host(raw) != rest:
            raise ClientHelloError("")
    except (UnicodeError, ClientHelloError):
        raise ValueError(f"expected a server name like \"a.example\" or \"*.example\" (ASCII letters, digits, "
                         f"'-', '_', dots), got {text[:64]!r}") from None
    return name


def _host(raw: bytes) -> str:
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > 253:
        raise ClientHelloError(f"server name of {len(raw)} bytes")
    if name.translate(None, _NAME_CHARS) or b".." in name or name.startswith(b"."):
        raise ClientHelloError(f"bad server name {raw[:64]!r}")
    return name.decode("ascii")
