"""``hotproxy fleet serve``: the fleet's apply and status over HTTP (a CI pipeline's API).

What a pipeline calls instead of running ``hotproxy fleet apply`` itself::

    POST /fleet/apply[?deadline=SECONDS]   body: the fleet config (TOML, as ``fleet apply -c``)
    GET  /fleet/status                     ``fleet status --json``

both with ``Authorization: Bearer TOKEN``, TOKEN being the content of the
``--token-file`` (read once at start; restart to change it).  An apply is
exactly ``hotproxy fleet apply`` (``fleet.apply``: the same checks, the same
two phases, the same compare-and-swap against any other proposer, CLI or
HTTP); its answer is JSON with the lines the CLI prints::

    {"ok": true, "proposal": 41, "revision": 45, "error": null,
     "instances": {"i2": "committed revision 45", ...}, "lines": ["fleet apply: ...", ...]}

and its status code says the outcome: 200 committed; 409 not committed
(aborted: an instance failed or did not answer, or another apply was first --
``error`` says which and why); 422 the config is bad (nothing proposed: the
one line ``hotproxy check`` would print); 503 etcd is unreachable or refuses
this server (nothing proposed); 400/401/404/405/411/413/431 for a request this
server cannot take (nothing read past the head without a valid token).

Rules of this module:

* It is a proposer like the CLI, nothing more: no state of its own, one
  etcd connection per request (``fleet.apply``/``fleet.status``), so a
  restart loses nothing and two servers (or a server and a CLI) are as safe
  as two CLIs.
* The HTTP side is deliberately small (like ``metrics``): one request per
  connection, ``Content-Length`` bodies only (at most ``MAX_CONFIG_BYTES``),
  a bounded head read with a deadline, ``Connection: close``.  The token is
  checked before the body is read; a wrong one costs a constant-time compare.
* It serves plain HTTP unless given ``--tls-cert``/``--tls-key``: bind it to
  loopback or a private network, or put TLS in front, since the token
  travels in every request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import signal
import socket
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import fleet
from .errors import ConfigError, HotproxyError, describe, one_line
from .paths import MAX_CONFIG_BYTES

log = logging.getLogger("hotproxy.fleet.serve")

#: the longest request head accepted, and how long a client may take to send it
MAX_HEAD = 16384
HEAD_TIMEOUT = 10.0
#: how long a client may take to send the body it announced
BODY_TIMEOUT = 60.0
#: how long, after the answer, the server reads what the client still sends before it closes
LINGER = 2.0
#: the longest ``?deadline=`` accepted (seconds)
MAX_DEADLINE = 3600.0

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 409: "Conflict", 411: "Length Required", 413: "Content Too Large",
           422: "Unprocessable Content", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}

ROUTES = {"/fleet/apply": "POST", "/fleet/status": "GET"}


class _Refused(Exception):
    """A request answered with an error status (its one line in ``error``)."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}


def read_token(path: str) -> str:
    """The bearer token in *path* (surrounding white space dropped); ``FleetError`` if none."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise fleet.FleetError(one_line(f"--token-file: {describe(exc)}")) from None
    if not token:
        raise fleet.FleetError(f"--token-file: {path}: empty (it holds the bearer token clients send)")
    if any(c.isspace() for c in token):
        raise fleet.FleetError(f"--token-file: {path}: the token has white space inside (one line, no spaces)")
    return token


class FleetApi:
    """The HTTP server: routes, the token, and the requests in flight."""

    def __init__(self, source: fleet.EtcdSource, token: str, *, deadline: float = 10.0,
                 commit_wait: float = 30.0) -> None:
        self.source = source
        self._token = token.encode()
        self.deadline = deadline
        self.commit_wait = commit_wait
        self._inflight: set[asyncio.Task[None]] = set()
        #: the connections whose request was read whole (no lingering needed)
        self._consumed: set[asyncio.StreamReader] = set()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer, close."""
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        peer = writer.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        method = target = "-"
        try:
            try:
                method, target, headers = await self._head(reader)
                status, body, extra = await self._route(method, target, headers, reader, writer, who)
            except _Refused as exc:
                status, body, extra = exc.status, {"ok": False, "error": exc.error}, exc.headers
            log.info("%s %s %s -> %d%s", who, method, target, status,
                     f": {body.get('error')}" if body.get("error") else "")
            await self._reply(writer, status, body, extra)
            if reader not in self._consumed:
                await self._linger(reader, writer)
        except (ConnectionError, asyncio.TimeoutError):
            pass   # the client went away: nothing to answer
        except Exception:   # a bug: the server serves on; the client gets a 500
            log.exception("%s %s %s: unexpected failure", who, method, target)
            try:
                await self._reply(writer, 500, {"ok": False, "error": "internal error (see the server's log)"}, {})
            except Exception:   # the connection is gone too
                pass
        finally:
            self._inflight.discard(task)
            self._consumed.discard(reader)
            writer.close()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After refusing a request before reading all of it: half-close, then read what
        the client still sends until it closes (bounded) -- closing with unread bytes
        would send a reset that can make the client lose the answer."""
        if writer.can_write_eof():
            writer.write_eof()
        left = MAX_CONFIG_BYTES + MAX_HEAD

        async def drain() -> None:
            nonlocal left
            while left > 0:
                data = await reader.read(min(left, 65536))
                if not data:
                    return
                left -= len(data)

        try:
            await asyncio.wait_for(drain(), LINGER)
        except (OSError, asyncio.TimeoutError):
            pass

    async def _head(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            raise _Refused(431, f"request head longer than {MAX_HEAD} bytes") from None
        except asyncio.IncompleteReadError:
            raise ConnectionError("closed before the end of the request head") from None
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Refused(400, "expected an HTTP/1.x request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _Refused(400, f"bad header line {line[:60]!r}")
            headers[name.lower()] = value.strip()
        return parts[0], parts[1], headers

    async def _route(self, method: str, target: str, headers: dict[str, str], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, who: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        url = urlsplit(target)
        allowed = ROUTES.get(url.path)
        if allowed is None:
            raise _Refused(404, f"no {url.path} here (POST /fleet/apply, GET /fleet/status)")
        if method != allowed:
            raise _Refused(405, f"{url.path} takes {allowed}, got {method}", {"Allow": allowed})
        self._authorize(headers)
        if method == "GET" and "content-length" not in headers and "transfer-encoding" not in headers:
            self._consumed.add(reader)
        try:
            query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
        except ValueError:
            raise _Refused(400, f"bad query string {url.query[:60]!r}") from None
        if url.path == "/fleet/status":
            return await self._status()
        deadline = self._deadline(query)
        body = await self._body(headers, reader, writer)
        return await self._apply(body, deadline, who)

    def _authorize(self, headers: dict[str, str]) -> None:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _Refused(401, "missing Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise _Refused(401, "wrong token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def _deadline(self, query: dict[str, list[str]]) -> float:
        unknown = sorted(set(query) - {"deadline"})
        if unknown:
            raise _Refused(400, f"unknown parameter {unknown[0]!r} (only deadline=SECONDS)")
        if "deadline" not in query:
            return self.deadline
        text = query["deadline"][-1]
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value <= MAX_DEADLINE:
            raise _Refused(400, f"deadline: expected seconds above 0 and at most {MAX_DEADLINE:g}, got {text!r}")
        return value

    async def _body(self, headers: dict[str, str], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> str:
        if "transfer-encoding" in headers:
            raise _Refused(411, "send the config with a Content-Length (no Transfer-Encoding)")
        length_text = headers.get("content-length")
        if length_text is None or not length_text.isdigit():
            raise _Refused(411, "a Content-Length is required (the config's size in bytes)")
        length = int(length_text)
        if length > MAX_CONFIG_BYTES:
            raise _Refused(413, f"the config is {length} bytes, more than {MAX_CONFIG_BYTES}")
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            raw = await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT)
        except asyncio.IncompleteReadError:
            raise ConnectionError("closed before the end of the body") from None
        self._consumed.add(reader)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refused(400, f"the config is not UTF-8 text (byte {exc.start})") from None

    async def _apply(self, text: str, deadline: float, who: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            # every check ``fleet apply -c`` makes (host name look-ups included: in a thread)
            await asyncio.to_thread(fleet.check_fleet_file, text, "POST /fleet/apply")
        except ConfigError as exc:
            return 422, {"ok": False, "error": str(exc)}, {}
        proposer = f"{socket.gethostname()}:{os.getpid()} (fleet serve, for {who})"
        try:
            result = await fleet.apply(self.source, text, deadline=deadline, commit_wait=self.commit_wait,
                                       proposer=proposer)
        except fleet.etcd_errors() as exc:
            return self._unavailable(f"etcd unreachable or failing: {describe(exc)}")
        except fleet.FleetError as exc:
            return self._unavailable(str(exc))
        body = {**dataclasses.asdict(result), "lines": result.lines()}
        return (200 if result.ok else 409), body, {}

    async def _status(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            st = await fleet.status(self.source)
        except fleet.etcd_errors() as exc:
            return self._unavailable(f"etcd unreachable or failing: {describe(exc)}")
        except fleet.FleetError as exc:
            return self._unavailable(str(exc))
        return 200, {"ok": True, **st}, {}

    @staticmethod
    def _unavailable(error: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        return 503, {"ok": False, "error": one_line(error)}, {}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: dict[str, Any],
                     headers: dict[str, str]) -> None:
        data = (json.dumps(body, indent=2) + "\n").encode()
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", "Content-Type: application/json",
                f"Content-Length: {len(data)}", "Connection: close", "Cache-Control: no-store",
                *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)

    async def serve(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Until SIGTERM or SIGINT; then stop accepting and let the requests in flight finish
        (each is bounded by its deadline and the commit wait)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await asyncio.start_server(self.connection, host, port, limit=MAX_HEAD, ssl=tls,
                                            reuse_address=True)
        bound = server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        log.info("fleet serve: listening on %s://%s:%d for %s (POST /fleet/apply, GET /fleet/status)",
                 "https" if tls is not None else "http", shown, bound[1], self.source.url)
        try:
            await stop.wait()
        finally:
            server.close()
            if self._inflight:
                log.info("fleet serve: stopping: %d request(s) in flight", len(self._inflight))
                await asyncio.wait(list(self._inflight), timeout=self.deadline + self.commit_wait + 10.0)
            log.info("fleet serve: stopped")


def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The HTTPS context of ``--tls-cert``/``--tls-key`` (None: plain HTTP); ``FleetError`` in one line."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise fleet.FleetError(f"{'--tls-cert' if cert is None else '--tls-key'}: missing (HTTPS needs both)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise fleet.FleetError(one_line(f"--tls-cert/--tls-key: not a PEM certificate and its key: "
                                        f"{exc.reason or exc}")) from None
    except OSError as exc:
        raise fleet.FleetError(one_line(f"--tls-cert/--tls-key: {describe(exc)}")) from None
    return ctx


def run(source: fleet.EtcdSource, listen: str, token_file: str, *, deadline: float,
        tls_cert: str | None = None, tls_key: str | None = None) -> int:
    """``hotproxy fleet serve``: check everything, then serve until stopped."""
    from . import addresses

    try:
        addr = addresses.parse(listen)
    except ValueError as exc:
        raise fleet.FleetError(one_line(f"--listen: {exc}")) from None
    if addr.host is None or addr.port is None:
        raise fleet.FleetError(f"--listen: expected HOST:PORT or [V6]:PORT, got {listen!r}")
    token = read_token(token_file)
    tls = server_tls(tls_cert, tls_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet-serve %(levelname)s %(message)s")
    api = FleetApi(source, token, deadline=deadline)
    try:
        asyncio.run(api.serve(addr.host, addr.port, tls))
    except OSError as exc:
        raise HotproxyError(one_line(f"--listen {listen}: {describe(exc)}")) from None
    return 0


__all__ = ["FleetApi", "read_token", "run", "server_tls"]
