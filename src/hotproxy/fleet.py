"""A fleet: hotproxy instances that apply one config together, through etcd.

Rules of this module (README "Fleet", docs/architecture.md "A fleet"):

* etcd holds the *shared* config -- the ``[services.NAME]`` tables, as TOML
  text -- and its history; each instance keeps a local file with its own
  ``[runtime]`` (``config_source``, ``instance_id``, ``listen_host``, admin
  socket, workers).  etcd is never on the data path: an instance that cannot
  reach it serves the config it last applied and re-syncs when it is back.
* The keys, under ``PREFIX/``:

  ``config``          the committed config (TOML); its ``mod_revision`` is the
                      fleet's *revision*.  Only a commit writes it.
  ``proposal``        ``{"toml", "deadline", "proposer"}``: a config being
                      applied; its ``mod_revision`` is the proposal's id R.
  ``decision``        ``{"rev": R, "outcome": "commit"|"abort", "reason"}``.
  ``members/ID``      one per live instance, under its lease (it disappears
                      when the instance stops answering for ``fleet_lease_ttl``):
                      its address, applied revision, last outcome, its vote
                      ``{"rev": R, "ok", "error"}``.

* Two phases (``apply``): a proposal is written only by compare-and-swap on
  the proposal key's revision (two ``fleet apply`` cannot interleave: the
  second is told which proposal won).  Every live instance prepares R as a
  local reload prepares (``Reloader.prepare``: every check, every
  ``Precommit``) and votes.  The proposer writes ``commit`` -- the decision
  and the config in ONE transaction, again compare-and-swap on R -- only when
  every instance that was a member when R was proposed and is still one has
  voted "prepared" before the deadline; anything else writes ``abort``.
* The decision rule for an instance that dies after preparing: its lease
  expires, it is no longer a member, the others decide without it.  When it
  comes back it applies the *committed* config (never a proposal) as a local
  reload, all or nothing on its workers.
* An instance converges on ``PREFIX/config``: at start, on every reconnect,
  and on every commit; a proposal it has not decided on by its deadline plus
  one lease is dropped (aborted) by the instance itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
import os
import socket
import time
import tomllib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from . import addresses
from .config import Config, NeedsLookup, parse_config_doc
from .errors import ConfigError, HotproxyError, describe, one_line
from .reload import ReloadReport, Reloader, Staged

log = logging.getLogger("hotproxy.fleet")

SCHEME = "etcd://"
#: the same over TLS (``runtime.etcd_ca``/``etcd_cert``/``etcd_key``, ``--etcd-ca``/``--etcd-cert``/``--etcd-key``)
TLS_SCHEME = "etcds://"
#: seconds between reconnection attempts: doubled from the first up to the last
BACKOFF = (0.2, 5.0)
#: seconds one etcd request may take before the instance counts etcd as unreachable
REQUEST_TIMEOUT = 3.0
INSTALL_HINT = "pip install 'hotproxy[etcd]'"


class FleetError(HotproxyError):
    """A fleet operation failed (one line)."""


@dataclass(frozen=True)
class EtcdTLS:
    """TLS to etcd: the CA bundle to verify etcd's certificate with (None: the
    system's), and a client certificate and its key (both or neither)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> Any:
        """gRPC channel credentials; the files are read now (each connect: renewed
        certificates are taken on the next reconnect)."""
        grpc = importlib.import_module("grpc")   # (aetcd's dependency)

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca or system_ca_file()),
                                            private_key=read(self.key), certificate_chain=read(self.cert))


def system_ca_file() -> str | None:
    """The system's CA bundle (what Python's ``ssl`` trusts by default), for gRPC, whose
    own default is a bundle of its own; None if there is no such file (then gRPC's)."""
    import ssl

    paths = ssl.get_default_verify_paths()
    for path in (os.environ.get(paths.openssl_cafile_env), paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            return path
    return None


@dataclass(frozen=True)
class EtcdSource:
    """A parsed ``etcd://HOST:PORT[,HOST:PORT]/PREFIX`` (``etcds://``: over TLS)."""

    endpoints: tuple[tuple[str, int], ...]
    #: ends with "/"
    prefix: str
    #: None: plaintext (``etcd://``)
    tls: EtcdTLS | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        return f"{TLS_SCHEME if self.tls is not None else SCHEME}{hosts}/{self.prefix.strip('/')}"

    def key(self, name: str) -> bytes:
        return (self.prefix + name).encode()


def parse_source(text: str, what: str = "config_source") -> EtcdSource:
    """Parse ``etcd[s]://HOST:PORT[,HOST:PORT]/PREFIX``; ``FleetError`` naming *what*."""
    def bad(why: str) -> FleetError:
        return FleetError(one_line(f"{what}: {why}, got {text!r} "
                                   "(expected etcd://HOST:PORT[,HOST:PORT]/PREFIX, or etcds://... for TLS)"))

    scheme = next((s for s in (SCHEME, TLS_SCHEME) if text.startswith(s)), None)
    if scheme is None:
        raise bad("not an etcd:// or etcds:// URL")
    hosts, sep, prefix = text[len(scheme):].partition("/")
    prefix = prefix.strip("/")
    if not sep or not prefix:
        raise bad("no PREFIX")
    endpoints = []
    for part in hosts.split(","):
        try:
            addr = addresses.parse(part)
        except ValueError as exc:
            raise bad(f"bad endpoint {part!r}: {exc}") from None
        if addr.host is None or addr.port is None or addr.port == 0:
            raise bad(f"bad endpoint {part!r}")
        endpoints.append((addr.host, addr.port))
    return EtcdSource(tuple(endpoints), f"/{prefix}/", EtcdTLS() if scheme == TLS_SCHEME else None)


def with_tls(source: EtcdSource, ca: str | None, cert: str | None, key: str | None,
             names: tuple[str, ...] = ("etcd_ca", "etcd_cert", "etcd_key")) -> EtcdSource:
    """*source* with its TLS files, each checked now (one ``FleetError`` line naming
    the option, *names*): only with ``etcds://``; the certificate and the key
    together; each file readable PEM, the key the certificate's."""
    import ssl

    given = [(n, v) for n, v in zip(names, (ca, cert, key)) if v is not None]
    if source.tls is None:
        if given:
            raise FleetError(f"{given[0][0]}: TLS to etcd needs an etcds:// URL, got {source.url}")
        return source
    if (cert is None) != (key is None):
        raise FleetError(f"{names[1] if cert is None else names[2]}: missing (a client certificate "
                         f"needs {names[1]} and {names[2]} both)")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        what = names[0]
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
        if cert is not None and key is not None:
            what = f"{names[1]}/{names[2]}"
            ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise FleetError(one_line(f"{what}: not a PEM certificate (and key) that TLS can use: "
                                  f"{exc.reason or exc}")) from None
    except OSError as exc:
        raise FleetError(one_line(f"{what}: {describe(exc)}")) from None
    return dataclasses.replace(source, tls=EtcdTLS(ca, cert, key))


def client_module() -> Any:
    """The etcd client library (``aetcd``), imported on first use."""
    # The master forks only to exec (its workers): gRPC's fork handlers would
    # only log that they are skipped while its threads are busy.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    # gRPC's C core would write its own lines (a failed TLS handshake) to stderr:
    # what failed is said once, by the caller, in one line (``connect``)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        return importlib.import_module("aetcd")
    except ImportError:
        raise FleetError(f"the etcd client library is not installed: {INSTALL_HINT}") from None


def etcd_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or failing etcd raises."""
    client_module()   # missing: the one line saying what to install
    exc = importlib.import_module("aetcd.exceptions")
    return (exc.ClientError, OSError, asyncio.TimeoutError, ConnectionError)


async def connect(source: EtcdSource, attempt: int = 0, *, timeout: float = REQUEST_TIMEOUT) -> Any:
    """A connected client to one of *source*'s endpoints (the next one on each attempt)."""
    aetcd = client_module()
    host, port = source.endpoints[attempt % len(source.endpoints)]
    kind = aetcd.Client if source.tls is None else _tls_client(aetcd, source.tls)
    client = kind(host=host, port=port, timeout=timeout,
                  username=os.environ.get("HOTPROXY_ETCD_USER") or None,
                  password=os.environ.get("HOTPROXY_ETCD_PASSWORD") or None)
    try:
        await client.connect()
        # a connect is lazy in grpc: one read proves etcd answers
        await client.get(source.key("config"))
    except BaseException as exc:
        await client.close()
        if source.tls is not None and isinstance(exc, Exception):
            why = await _tls_problem(source.tls, host, port, timeout)
            if why is not None:
                raise FleetError(f"etcd {source.url}: TLS: {why}") from None
        text = describe(exc)
        if source.tls is None and text.endswith("Socket closed"):
            # what a TLS-only etcd does to a plaintext HTTP/2 client
            raise FleetError(one_line(f"etcd unreachable or failing: {text} (if etcd serves TLS only, "
                                      f"use etcds://)")) from None
        if "authentication failed" in text or "user name is empty" in text or "invalid auth token" in text:
            raise FleetError(one_line(f"etcd {source.url}: {text} (the user and password: environment "
                                      "HOTPROXY_ETCD_USER and HOTPROXY_ETCD_PASSWORD)")) from None
        raise
    return client


#: an HTTP/2 client preface and an empty SETTINGS frame: what a gRPC client sends first
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


async def _tls_problem(tls: EtcdTLS, host: str, port: int, timeout: float) -> str | None:
    """Why TLS to etcd at *host*:*port* fails, in words (None: TLS is not the problem).

    gRPC says only "handshake failed" or "Unwrap failed (TSI_DATA_CORRUPTED)";
    this makes the same handshake with Python's ``ssl`` (same files) to name
    the cause: etcd's certificate not trusted, or this client's refused (etcd
    started with ``--client-cert-auth``: its alert arrives after the
    handshake, on the first read, so the probe writes an HTTP/2 preface and
    reads)."""
    import ssl

    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
        if tls.cert is not None and tls.key is not None:
            ctx.load_cert_chain(tls.cert, tls.key)
        ctx.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as exc:
        return f"the TLS files cannot be used: {describe(exc)}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), timeout)
    except ssl.SSLCertVerificationError as exc:
        return (f"etcd's certificate is not trusted ({exc.verify_message}): etcd_ca / --etcd-ca names the CA "
                "that signed it")
    except ssl.SSLError as exc:
        return f"handshake failed: {exc.reason or exc}"
    except (OSError, asyncio.TimeoutError):
        return None   # not reached at all: the caller's error says so
    try:
        writer.write(_H2_PREFACE)
        await asyncio.wait_for(reader.read(1), timeout)
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc).lower().replace("_", " ")
        if tls.cert is None:
            return f"etcd asks for a client certificate ({reason}): etcd_cert and etcd_key / --etcd-cert, --etcd-key"
        return f"etcd refused this client's certificate ({reason}): it must be signed by a CA etcd trusts"
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()
    return None


def _tls_client(aetcd: Any, tls: EtcdTLS) -> Any:
    """A ``aetcd.Client`` class whose channel is TLS with *tls*'s files.

    aetcd 1.0 opens only plaintext channels (``grpc.aio.insecure_channel`` in
    ``Client.connect``); this is its ``connect`` with ``grpc.aio.secure_channel``
    instead, so user/password authentication (``HOTPROXY_ETCD_USER``) runs
    inside TLS too.  Everything else -- leases, transactions, watches -- is
    aetcd's own, on the stubs made here exactly as aetcd makes them.
    """
    rpc = importlib.import_module("aetcd.rpc")
    watcher = importlib.import_module("aetcd.watcher")
    exceptions = importlib.import_module("aetcd.exceptions")
    credentials = tls.credentials()

    class TLSClient(aetcd.Client):  # type: ignore[misc]
        _is_connecting: bool

        async def connect(self) -> None:
            if self._connected.is_set():
                return
            if self._is_connecting:
                await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
                return
            try:
                self._is_connecting = True
                host = f"[{self._host}]" if ":" in self._host else self._host
                self.channel = rpc.secure_channel(f"{host}:{self._port}", credentials,
                                                  options=self._options.items())
                if self._username is not None and self._password is not None:
                    self.auth_stub = rpc.AuthStub(self.channel)
                    resp = await self.auth_stub.Authenticate(
                        rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                    self.metadata = (("token", resp.token),)
                self.kvstub = rpc.KVStub(self.channel)
                self.clusterstub = rpc.ClusterStub(self.channel)
                self.leasestub = rpc.LeaseStub(self.channel)
                self.maintenancestub = rpc.MaintenanceStub(self.channel)
                self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                                metadata=self.metadata)
                self._connected.set()
            except rpc.AioRpcError as exc:
                exceptions._handle_exception(exc)
            finally:
                self._is_connecting = False

    return TLSClient


def _json(value: bytes | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _source_name(source: EtcdSource, what: str, rev: int) -> str:
    return f"{source.url} ({what} {rev})"


def revision_name(source: str, rev: int) -> str:
    """How a config committed as revision *rev* of the fleet at *source* (a URL) is named in errors."""
    return f"{source} (revision {rev})"


def fleet_config(local: Config, local_runtime: dict[str, Any], text: str, source: str,
                 *, lookups: bool = True) -> Config:
    """The config an instance runs: its local ``[runtime]`` and the fleet's
    services (*text*), each TCP ``listen`` host replaced by
    ``runtime.listen_host`` when the local file sets it.  ``ConfigError``
    names *source* (the etcd URL and revision)."""
    services = _services_of(text, source)
    host = local.runtime.listen_host
    if host is not None and isinstance(services, dict):
        services = {name: _rebind(table, host) for name, table in services.items()}
    return parse_config_doc({"runtime": local_runtime, "services": services}, local.path, source,
                            lookups=lookups)


def _services_of(text: str, source: str) -> Any:
    """The ``services`` table of a fleet config's *text* (TOML holding only
    ``[services.NAME]`` tables); ``ConfigError`` naming *source* otherwise."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(one_line(f"{source}: TOML syntax error: {exc}")) from None
    for key in doc:
        if key != "services":
            raise ConfigError(one_line(f"{source}: {key}: not allowed in a fleet config (it holds only "
                                       "[services.NAME] tables; [runtime] stays in each instance's local file)"))
    return doc.get("services", {})


def _rebind(table: Any, host: str) -> Any:
    """*table* with its TCP ``listen`` on *host* (same port); anything else unchanged."""
    if not isinstance(table, dict) or not isinstance(table.get("listen"), str):
        return table
    try:
        addr = addresses.parse(table["listen"])
    except ValueError:
        return table   # the checker names it
    if addr.host is None or addr.port is None:
        return table
    shown = f"[{host}]" if ":" in host else host
    return {**table, "listen": f"{shown}:{addr.port}"}


def check_fleet_file(text: str, path: str) -> None:
    """What ``fleet apply`` checks before proposing *path*: TOML, only
    ``[services.NAME]`` tables, every key as ``hotproxy check`` checks it
    (not the bind probes: they are each instance's, in its prepare)."""
    config = parse_config_doc({"services": _services_of(text, path)}, os.path.abspath(path), path)
    if not config.services:
        raise ConfigError(f"{path}: no services (a fleet config holds at least one [services.NAME] table)")


def instance_id(config: Config) -> str:
    """``runtime.instance_id``, or the host name and the admin socket path."""
    return config.runtime.instance_id or f"{socket.gethostname()}:{config.runtime.admin_socket}"


# -- the instance's side ---------------------------------------------------------------


class FleetAgent:
    """Keeps one instance on its fleet's committed config; votes on proposals.

    ``run()`` is the master's task while it serves: connect, join (a lease,
    ``members/ID``), apply the committed config if it is not the one running,
    then follow the prefix; on any etcd failure keep serving, reconnect with
    back-off, and do it all again.
    """

    def __init__(self, source: EtcdSource, local: Config, local_runtime: dict[str, Any], reloader: Reloader,
                 noted: Callable[[ReloadReport], None], *, applied: int = 0, applied_text: str | None = None,
                 outcome: str = "joining") -> None:
        rt = local.runtime
        # (the files were checked at start: ``run`` refuses bad ones in one line)
        self.source = with_tls(source, rt.etcd_ca, rt.etcd_cert, rt.etcd_key)
        self.local = local
        self.local_runtime = local_runtime
        self.reloader = reloader
        self.noted = noted
        self.id = instance_id(local)
        self.ttl = local.runtime.fleet_lease_ttl
        #: the fleet revision this instance runs (0: none yet), and its TOML (what an upgrade hands over)
        self.applied = applied
        self.applied_text = applied_text
        self.outcome = outcome
        self.vote: dict[str, Any] | None = None
        self.connected = False
        #: the proposal prepared and not yet decided: (R, its TOML, what the reloader staged, deadline)
        self._staged: tuple[int, str, Staged, float] | None = None
        self._lease: Any = None
        self._client: Any = None

    def status(self) -> dict[str, Any]:
        """For the admin ``status``: the fleet as this instance sees it."""
        return {"source": self.source.url, "id": self.id, "applied": self.applied, "outcome": self.outcome,
                "connected": self.connected}

    async def run(self) -> None:
        """Until cancelled (the master stops)."""
        errors = etcd_errors()
        attempt = 0
        delay = BACKOFF[0]
        while True:
            try:
                await self._session(attempt)
            except asyncio.CancelledError:
                # stopping: leave the fleet now rather than when the lease runs out
                lease = self._lease
                if lease is not None:
                    try:
                        await asyncio.wait_for(lease.revoke(), 1.0)
                    except Exception:   # etcd unreachable: the lease runs out on its own
                        pass
                raise
            except errors as exc:
                log.warning("fleet: etcd %s: %s; serving revision %d; retrying in %.1f s",
                            self.source.url, describe(exc), self.applied, delay)
            except FleetError as exc:
                log.warning("fleet: %s; serving revision %d; retrying in %.1f s", exc, self.applied, delay)
            finally:
                self.connected = False
                await self._drop_staged("etcd unreachable before the decision")
                client, self._client, self._lease = self._client, None, None
                if client is not None:
                    try:
                        await asyncio.wait_for(client.close(), REQUEST_TIMEOUT)
                    except Exception:   # closing a broken channel: nothing more to do
                        pass
            attempt += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])

    async def _session(self, attempt: int) -> None:
        self._client = client = await connect(self.source, attempt)
        self._lease = await client.lease(self.ttl)
        self.connected = True
        log.info("fleet: joined %s as %r", self.source.url, self.id)
        await self._publish()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        # from the revision read below on, every change is seen once
        current = await client.get(self.source.key("config"))
        start = await self._sync(current)
        # a proposal made while this instance was away and still undecided: vote now
        proposal = await client.get(self.source.key("proposal"))
        if proposal is not None:
            await self._prepare(int(proposal.mod_revision), bytes(proposal.value))
        watch = await client.watch_prefix(self.source.prefix.encode(), start_revision=start + 1)
        feeder = asyncio.ensure_future(self._feed(watch, queue))
        keeper = asyncio.ensure_future(self._keep_alive(queue))
        try:
            while True:
                timeout = None
                if self._staged is not None:
                    timeout = max(0.0, self._staged[3] + self.ttl - time.time())
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    await self._drop_staged("no decision before the deadline")
                    continue
                if isinstance(item, BaseException):
                    raise item
                await self._event(item)
        finally:
            feeder.cancel()
            keeper.cancel()
            try:
                await asyncio.wait_for(watch.cancel(), REQUEST_TIMEOUT)
            except Exception:   # a broken stream: the client is closed next
                pass

    async def _feed(self, watch: Any, queue: asyncio.Queue[Any]) -> None:
        try:
            async for event in watch:
                queue.put_nowait(event)
            queue.put_nowait(FleetError("the etcd watch ended"))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)

    async def _keep_alive(self, queue: asyncio.Queue[Any]) -> None:
        try:
            while True:
                await asyncio.sleep(self.ttl / 3)
                reply = await asyncio.wait_for(self._lease.refresh(), REQUEST_TIMEOUT)
                if reply.TTL <= 0:   # a LeaseKeepAliveResponse: 0 once the lease is gone
                    raise FleetError("the membership lease expired")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)

    async def _publish(self) -> None:
        """``members/ID``: who this instance is and where it stands."""
        if self._client is None or self._lease is None:
            return
        rt = self.local.runtime
        cur = self.reloader.current
        record = {"id": self.id, "pid": os.getpid(), "host": socket.gethostname(),
                  "listen_host": rt.listen_host, "admin_socket": rt.admin_socket,
                  "applied": self.applied, "outcome": self.outcome, "vote": self.vote,
                  "services": len(cur.services) if cur is not None else 0,
                  "health": "serving" if cur is not None and cur.services else "no services", "at": time.time()}
        await self._client.put(self.source.key(f"members/{self.id}"), json.dumps(record).encode(),
                               lease=self._lease)

    async def _sync(self, current: Any) -> int:
        """Apply the committed config if it is not the one running; the revision read."""
        header_rev = int(current.header.revision) if current is not None else 0
        if current is None or current.value is None:
            return header_rev
        rev = int(current.mod_revision)
        if rev != self.applied:
            await self._apply_committed(rev, current.value.decode("utf-8", "replace"))
        return header_rev

    async def _event(self, event: Any) -> None:
        key = event.kv.key.decode("utf-8", "replace")
        name = key[len(self.source.prefix):]
        if str(event.kind) not in ("PUT", "EventKind.PUT"):
            return
        rev = int(event.kv.mod_revision)
        value = bytes(event.kv.value)
        if name == "proposal":
            await self._prepare(rev, value)
        elif name == "decision":
            await self._decided(rev, _json(value))
        elif name == "config":
            text = value.decode("utf-8", "replace")
            if self._staged is not None and self._staged[1] == text:
                await self._commit_staged(rev)
            elif rev != self.applied:
                await self._drop_staged("another config was committed")
                await self._apply_committed(rev, text)

    async def _prepare(self, rev: int, value: bytes) -> None:
        if (self._staged is not None and self._staged[0] == rev) or (self.vote or {}).get("rev") == rev:
            return   # seen at (re)join and again in the watch: one vote
        await self._drop_staged(f"superseded by proposal {rev}")
        proposal = _json(value)
        text = proposal.get("toml")
        deadline = float(proposal.get("deadline", 0))
        if not isinstance(text, str) or time.time() > deadline:
            return   # malformed, or too late to vote (its decision is abort)
        assert self._client is not None
        decision = _json((await self._client.get(self.source.key("decision")) or _Empty).value)
        if int(decision.get("rev", 0)) >= rev:
            return   # decided while this instance was away
        try:
            config = await self._load(text, _source_name(self.source, "proposal", rev))
        except ConfigError as exc:
            await self._voted(rev, False, str(exc))
            return
        report, staged = await self.reloader.prepare(config, trigger=f"fleet proposal {rev}")
        if staged is None:
            await self._voted(rev, False, report.error or "prepare failed")
            return
        self._staged = (rev, text, staged, deadline)
        await self._voted(rev, True, None)

    async def _voted(self, rev: int, ok: bool, error: str | None) -> None:
        self.vote = {"rev": rev, "ok": ok, "error": error}
        self.outcome = f"prepared {rev}" if ok else f"failed {rev}: {error}"
        (log.info if ok else log.error)("fleet: %s", self.outcome)
        await self._publish()

    async def _decided(self, rev: int, decision: dict[str, Any]) -> None:
        if self._staged is None or self._staged[0] != int(decision.get("rev", -1)):
            return
        if decision.get("outcome") == "commit":
            await self._commit_staged(rev)
        else:
            await self._drop_staged(str(decision.get("reason") or "by the proposer"))

    async def _commit_staged(self, rev: int) -> None:
        assert self._staged is not None
        proposal, text, staged, _ = self._staged
        self._staged = None
        report = await self.reloader.commit(staged)
        self.noted(report)
        self.applied = rev
        if report.ok:
            self.applied_text = text
        self.outcome = f"committed {proposal} as revision {rev}" if report.ok else \
            f"commit of {proposal} failed: {report.error}"
        log.info("fleet: %s", self.outcome)
        await self._publish()

    async def _drop_staged(self, why: str) -> None:
        if self._staged is None:
            return
        proposal, _, staged, _ = self._staged
        self._staged = None
        await self.reloader.abort(staged, f"fleet proposal {proposal}: {why}")
        self.outcome = f"aborted {proposal}: {why}"
        log.warning("fleet: %s", self.outcome)
        try:
            await self._publish()
        except Exception:   # etcd is what failed: the record is written on the next join
            pass

    async def _apply_committed(self, rev: int, text: str) -> None:
        """A committed config this instance did not prepare: a local reload of it."""
        try:
            config = await self._load(text, revision_name(self.source.url, rev))
        except ConfigError as exc:
            self.outcome = f"failed revision {rev}: {exc}"
            log.error("fleet: %s", self.outcome)
            await self._publish()
            return
        report = await self.reloader.reload(config, trigger=f"fleet revision {rev}", allow_empty=True)
        self.noted(report)
        if report.ok:
            self.applied, self.applied_text = rev, text
            self.outcome = f"applied revision {rev}"
        else:
            self.outcome = f"failed revision {rev}: {report.error}"
        (log.info if report.ok else log.error)("fleet: %s", self.outcome)
        await self._publish()

    async def _load(self, text: str, source: str) -> Config:
        def load(lookups: bool) -> Config:
            return fleet_config(self.local, self.local_runtime, text, source, lookups=lookups)

        try:
            return load(False)
        except NeedsLookup:
            return await asyncio.to_thread(load, True)


class _Empty:
    value: bytes | None = None


# -- the proposer's side (``hotproxy fleet apply``/``status``) ---------------------------------


@dataclass
class ApplyResult:
    """The outcome of one ``fleet apply``."""

    ok: bool
    proposal: int = 0
    #: the fleet revision committed (0: none)
    revision: int = 0
    error: str | None = None
    #: instance id -> one line (prepared, failed: why, no answer, committed)
    instances: dict[str, str] = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        """What ``fleet apply`` prints."""
        if self.ok:
            head = f"fleet apply: proposal {self.proposal} committed as revision {self.revision}"
        else:
            head = f"fleet apply: {'proposal ' + str(self.proposal) + ' aborted: ' if self.proposal else ''}" \
                   f"{self.error}"
        return [head] + [f"  {iid}: {line}" for iid, line in sorted(self.instances.items())]


async def members(client: Any, source: EtcdSource) -> dict[str, dict[str, Any]]:
    """The live instances' records."""
    reply = await client.get_prefix(source.key("members/"))
    out = {}
    for kv in reply:
        record = _json(kv.value)
        out[str(record.get("id") or kv.key.decode()[len(source.key("members/")):])] = record
    return out


async def apply(source: EtcdSource, text: str, *, deadline: float = 10.0, commit_wait: float = 30.0,
                proposer: str = "") -> ApplyResult:
    """Propose *text*, collect the votes, commit or abort; wait (at most
    *commit_wait*) for the instances to apply a commit.  Etcd failures raise."""
    client = await connect(source)
    try:
        return await _apply(client, source, text, deadline, commit_wait, proposer)
    finally:
        await client.close()


#: test-only: ``DIR:N`` makes ``fleet apply`` wait, between reading the proposal
#: key and writing its own (the compare-and-swap), until N proposers have
#: reached that point (a file each in DIR) -- the interleaving a test cannot
#: otherwise reach: every proposer has read before any writes
TEST_BARRIER_ENV = "HOTPROXY_TEST_FLEET_BARRIER"


async def _test_barrier(timeout: float = 60.0) -> None:
    """``HOTPROXY_TEST_FLEET_BARRIER``: wait (bounded) until N proposers have read."""
    spec = os.environ.get(TEST_BARRIER_ENV)
    if not spec:
        return
    directory, _, count = spec.rpartition(":")
    with open(os.path.join(directory, f"read-{os.getpid()}-{id(asyncio.current_task())}"), "w"):
        pass
    ends = time.monotonic() + timeout
    while len([n for n in os.listdir(directory) if n.startswith("read-")]) < int(count) \
            and time.monotonic() < ends:
        await asyncio.sleep(0.02)


async def _apply(client: Any, source: EtcdSource, text: str, deadline: float, commit_wait: float,
                 proposer: str) -> ApplyResult:
    tx = importlib.import_module("aetcd.transactions")
    pkey, dkey, ckey = source.key("proposal"), source.key("decision"), source.key("config")
    seen = await client.get(pkey)
    decision = _json((await client.get(dkey) or _Empty).value)
    compare = [tx.Version(pkey) == 0] if seen is None else [tx.Mod(pkey) == int(seen.mod_revision)]
    extra = []
    if seen is not None and int(decision.get("rev", 0)) < int(seen.mod_revision):
        pending = _json(seen.value)
        left = float(pending.get("deadline", 0)) + 1.0 - time.time()
        if left > 0:
            return ApplyResult(False, error=f"another fleet apply is in progress (proposal {seen.mod_revision} "
                                            f"by {pending.get('proposer') or '?'}, decided within {left:.0f} s)")
        # its proposer went away before deciding: abort it with the new proposal
        extra.append(tx.Put(dkey, json.dumps({"rev": int(seen.mod_revision), "outcome": "abort",
                                              "reason": "no decision before the deadline"}).encode()))
    await _test_barrier()
    ends = time.time() + deadline
    body = json.dumps({"toml": text, "deadline": ends, "proposer": proposer}).encode()
    ok, replies = await client.transaction(compare=compare, success=extra + [tx.Put(pkey, body)], failure=[])
    if not ok:
        now = await client.get(pkey)
        who = _json(now.value).get("proposer") if now is not None else None
        return ApplyResult(False, error=f"another fleet apply proposed first (proposal "
                                        f"{now.mod_revision if now is not None else '?'} by {who or '?'}): "
                                        "nothing applied; retry after it")
    rev = int((await client.get(pkey)).mod_revision)
    expected = set(await members(client, source))
    result = ApplyResult(False, proposal=rev)
    failed: dict[str, str] = {}
    while True:
        live = await members(client, source)
        votes = {iid: (rec.get("vote") or {}) for iid, rec in live.items() if iid in expected}
        for iid in expected - set(live):
            result.instances[iid] = "left the fleet (lease expired): excluded"
        waiting = []
        for iid, vote in votes.items():
            if vote.get("rev") != rev:
                waiting.append(iid)
            elif vote.get("ok"):
                result.instances[iid] = "prepared"
            else:
                failed[iid] = result.instances[iid] = f"failed: {vote.get('error')}"
        if failed or not waiting or time.time() > ends:
            break
        await asyncio.sleep(0.05)
    for iid in waiting:
        result.instances[iid] = "had not answered when another failed" if failed else \
            f"no answer within {deadline:g} s"
    if failed or waiting:
        first = sorted(failed.items()) or [(waiting[0], result.instances[waiting[0]])]
        result.error = f"instance {first[0][0]} {first[0][1]}"
        await client.transaction(compare=[tx.Mod(pkey) == rev], failure=[], success=[
            tx.Put(dkey, json.dumps({"rev": rev, "outcome": "abort", "reason": result.error}).encode())])
        return result
    # decision before config: an instance reading the transaction's events in
    # order commits what it prepared on the first of them
    ok, _ = await client.transaction(compare=[tx.Mod(pkey) == rev], failure=[], success=[
        tx.Put(dkey, json.dumps({"rev": rev, "outcome": "commit", "reason": ""}).encode()),
        tx.Put(ckey, text.encode())])
    if not ok:
        result.error = "superseded by another proposal before the commit: nothing applied"
        return result
    committed = int((await client.get(ckey)).mod_revision)
    result.ok, result.revision = True, committed
    # the instances commit on their own; say where each stands (bounded wait)
    ends = time.time() + commit_wait
    while True:
        live = await members(client, source)
        done = {iid for iid in votes if int(live.get(iid, {}).get("applied", 0)) >= committed}
        if done >= set(votes) or time.time() > ends:
            break
        await asyncio.sleep(0.05)
    for iid in votes:
        rec = live.get(iid, {})
        result.instances[iid] = f"committed revision {committed}" if iid in done else \
            f"prepared; not committed yet ({rec.get('outcome', 'gone')})"
    if not votes:
        result.instances["(none)"] = "no live instance: each applies it when it joins"
    return result


async def status(source: EtcdSource) -> dict[str, Any]:
    """The fleet: committed revision, pending proposal, every live instance."""
    client = await connect(source)
    try:
        config = await client.get(source.key("config"))
        proposal = await client.get(source.key("proposal"))
        decision = _json((await client.get(source.key("decision")) or _Empty).value)
        return {"source": source.url, "revision": int(config.mod_revision) if config is not None else 0,
                "proposal": int(proposal.mod_revision) if proposal is not None else 0,
                "decision": decision, "instances": await members(client, source)}
    finally:
        await client.close()


def format_status(st: dict[str, Any]) -> str:
    """``fleet status``'s table."""
    d = st.get("decision") or {}
    lines = [f"fleet {st['source']}: committed revision {st['revision'] or 'none'}"
             + (f"; last proposal {d.get('rev')}: {d.get('outcome')}" if d else "")]
    rows = [("ID", "ADDRESS", "APPLIED", "HEALTH", "LAST OUTCOME")]
    for iid, rec in sorted(st["instances"].items()):
        rows.append((iid, str(rec.get("listen_host") or rec.get("host") or "-"), str(rec.get("applied", 0)),
                     f"{rec.get('health', '?')} ({rec.get('services', 0)} services)", str(rec.get("outcome", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    if len(rows) == 1:
        lines.append("(no live instance)")
    return "\n".join(lines)


def run_async(coro: Awaitable[Any]) -> Any:
    """Run a proposer coroutine (the CLI); etcd failures become one ``FleetError`` line."""
    errors = etcd_errors()

    async def main() -> Any:
        try:
            return await coro
        except errors as exc:
            raise FleetError(f"etcd unreachable or failing: {describe(exc)}") from None

    return asyncio.run(main())


__all__ = ["ApplyResult", "EtcdSource", "EtcdTLS", "FleetAgent", "FleetError", "apply", "fleet_config",
           "format_status", "parse_source", "revision_name", "status", "with_tls"]
