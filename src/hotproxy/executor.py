"""The per-worker service table, driven by the six commands.

Rules of this module:

* Commands run one at a time, in the order they arrive (one lock).
* A command changes nothing until everything it needs has been built and
  checked; then it publishes with plain assignments that cannot fail.  So a
  failed command leaves its site exactly as it was, and the error says why.
* New connections read the site's slot; a connection keeps the service it
  was accepted with, so ``Update`` never cuts one.  An old version is freed
  when its last connection ends.
* ``Remove`` stops accepting at once and drains in the background (bounded
  by the drain timeout), so a long drain never holds up the next command.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, Sequence

from . import core
from .commands import Abort, Commit, PrepareAndCommit, Precommit, Remove, Update
from .errors import (BuildListenerError, BuildServiceError, DeployError, NothingDeployedError,
                     NothingStagedError, SiteNotFoundError, describe)
from .listeners import BoundListener, ListenerFactory
from .service import MakeService, Seed, Service, maybe_await

log = logging.getLogger("hotproxy.executor")

#: ``status_sliced`` turns the event loop at least this often (seconds)
SLICE = 0.005


class Site:
    """One named site on one worker: a slot, its listener, what is staged."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.slot = core.impl.Slot()
        self.conns = core.impl.ConnectionSet()
        self.acceptor = core.impl.Acceptor(self.slot, self.conns, name)
        self.listener: BoundListener | None = None
        self.factory: MakeService | None = None
        self.staged: Service | None = None
        self.staged_factory: MakeService | None = None
        self.staged_listener: BoundListener | None = None
        self.generation = 0
        self.committed_at: float | None = None
        #: every version still alive (the serving one, and old ones that
        #: open connections still hold; ``Service.version``) -> its
        #: generation; needs weak-referenceable services
        self.versions: weakref.WeakKeyDictionary[Service, int] = weakref.WeakKeyDictionary()

    @property
    def service(self) -> Service | None:
        """The serving version (None until the first commit)."""
        return self.slot.current  # type: ignore[no-any-return]

    def drop_staged(self) -> None:
        self.staged = None
        self.staged_factory = None
        if self.staged_listener is not None:
            self.staged_listener.close()
            self.staged_listener = None

    def version_connections(self) -> dict[int, int]:
        """Generation -> open connections, for every live version.

        Each connection belongs to the version that ``owns`` it (the
        newest first: most connections are on it).  This runs on status
        requests only, never on the accept path.
        """
        live = sorted(self.versions.items(), key=lambda vg: -vg[1])
        counts = dict.fromkeys(sorted(gen for _, gen in live), 0)
        for conn in self.conns.snapshot():
            for svc, gen in live:
                if svc.owns(conn):
                    counts[gen] += 1
                    break
        return counts

    def status(self) -> dict[str, Any]:
        svc = self.service
        return {
            "name": self.name,
            "listen": self.listener.address if self.listener is not None else None,
            # "core": the core accepts and relays; "loop": an asyncio server
            "accept": self.listener.mode if self.listener is not None else None,
            "generation": self.generation,
            "active": len(self.conns),
            "accept_errors": self.acceptor.errors,
            "staged": self.staged is not None,
            "old_versions": max(0, len(self.versions) - (1 if svc is not None else 0)),
            "versions": self.version_connections(),
            "stats": svc.stats() if svc is not None else {},
        }


class ServiceExecutor:
    """The service table of one worker.  Use ``execute(command)``."""

    def __init__(self, worker_id: int = 0, drain_timeout: float = 30.0) -> None:
        self.worker_id = worker_id
        self.drain_timeout = drain_timeout
        self.sites: dict[str, Site] = {}
        self._lock = asyncio.Lock()
        #: removed sites draining, by their drain task
        self._drains: dict[asyncio.Task[None], Site] = {}
        #: commands run so far (failed ones included): what a reload sent this worker
        self.commands = 0
        #: state from before an upgrade of the program, by site: the first
        #: version of the site is built from it (``MakeService.make_via_snapshot``)
        self._seeds: dict[str, Seed] = {}

    # -- state across an upgrade of the program ------------------------------------

    def seed(self, seeds: dict[str, Seed]) -> None:
        """Build each named site's first version from its ``Seed`` (then forget it)."""
        self._seeds.update(seeds)

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        """Every serving site's ``Service.snapshot()``, by name (plain data).

        *final*: an upgrade's hand-over -- the new program serves, so every
        site first stops accepting (what the kernel queued is taken and
        served here): the counts are final, but for the open connections."""
        if final:
            for site in self.sites.values():
                if site.listener is not None:
                    site.listener.close()
        out: dict[str, Any] = {}
        for name, site in self.sites.items():
            svc = site.service
            if svc is None:
                continue
            try:
                snap = svc.snapshot()
            except Exception as exc:   # a service's bug must not stop an upgrade
                log.warning("site %r: no state carried over (snapshot failed: %s)", name, describe(exc, typed=True))
                continue
            if snap is not None:
                out[name] = snap
        return out

    def carry_late(self, late: dict[str, tuple[Seed, Seed]]) -> None:
        """Add to each named site's serving version what the old program's
        workers counted after its seed (``Service.carry_late``); one that
        cannot is logged, never raised."""
        for name, (before, after) in late.items():
            site = self.sites.get(name)
            svc = site.service if site is not None else None
            if svc is None:
                continue
            try:
                svc.carry_late(before, after)
            except Exception as exc:   # a service's bug must not stop an upgrade
                log.warning("site %r: the last counts from before the upgrade were dropped (%s)",
                            name, describe(exc, typed=True))

    # -- the commands ---------------------------------------------------------

    async def execute(self, command: Any) -> dict[str, Any]:
        """Run one command; return a small result dict or raise a DeployError."""
        handler = self._handlers.get(type(command))
        if handler is None:
            raise TypeError(f"not a hotproxy command: {command!r}")
        async with self._lock:
            self.commands += 1
            try:
                return await handler(self, command)  # type: ignore[no-any-return, operator]
            except DeployError as exc:
                raise exc.on_worker(self.worker_id)

    def _site(self, name: str) -> Site:
        site = self.sites.get(name)
        if site is None:
            raise SiteNotFoundError(name)
        return site

    async def _build(self, name: str, factory: MakeService, old: Service | None,
                     fresh: bool = False) -> Service:
        seed = self._seeds.pop(name, None) if old is None and not fresh else None
        if seed is not None:
            try:
                svc = await maybe_await(factory.make_via_snapshot(seed))
                if isinstance(svc, Service):
                    return svc
                raise TypeError(f"make_via_snapshot returned {svc!r}")
            except Exception as exc:
                log.warning("site %r: the state from before the upgrade was dropped (%s); built afresh",
                            name, describe(exc, typed=True))
        try:
            if fresh:
                svc = await maybe_await(factory.make())
            else:
                svc = await maybe_await(factory.make_via_ref(old))
        except DeployError:
            raise
        except Exception as exc:
            raise BuildServiceError(name, describe(exc, typed=True)) from exc
        if not isinstance(svc, Service):
            raise BuildServiceError(name, f"factory returned {svc!r}, which is not a hotproxy Service "
                                          "(subclass hotproxy.Service: new_connection() is the method to write)")
        return svc

    async def _bind(self, name: str, lf: ListenerFactory) -> BoundListener:
        try:
            return await lf.make()
        except Exception as exc:
            raise BuildListenerError(name, f"{_address(lf)}: {describe(exc, typed=True)}") from exc

    async def _listen(self, site: Site, listener: BoundListener, svc: Service) -> None:
        # Listen for *svc*, the version about to be published: all that can
        # fail about a listener, before anything is published.
        try:
            await listener.listen(site.acceptor, svc)
        except Exception as exc:
            raise BuildListenerError(site.name, f"{listener.address}: {describe(exc, typed=True)}") from exc

    async def _precommit(self, cmd: Precommit) -> dict[str, Any]:
        site = self.sites.get(cmd.name)
        old = site.service if site is not None else None
        svc = await self._build(cmd.name, cmd.factory, old)
        listener = await self._bind(cmd.name, cmd.listener_factory) if cmd.listener_factory else None
        # -- nothing can fail below this line --
        if site is None:
            site = self.sites[cmd.name] = Site(cmd.name)
        site.drop_staged()
        site.staged, site.staged_factory, site.staged_listener = svc, cmd.factory, listener
        return {"generation": site.generation}

    async def _update(self, cmd: Update) -> dict[str, Any]:
        site = self._site(cmd.name)
        if site.service is None:
            raise NothingDeployedError(cmd.name, "use Commit for a site that does not serve yet")
        if site.staged is None:
            raise NothingStagedError(cmd.name, "Precommit first")
        # A listener staged with the service stays staged for a Commit.
        self._publish(site, site.staged, site.staged_factory)
        self._count_version(site, site.staged)
        site.staged = site.staged_factory = None
        if site.listener is not None:
            await site.listener.follow()   # never fails: only how it accepts
        return {"generation": site.generation}

    async def _commit(self, cmd: Commit) -> dict[str, Any]:
        site = self._site(cmd.name)
        if site.staged is None:
            raise NothingStagedError(cmd.name, "Precommit first")
        listener = site.staged_listener
        fresh = None
        if cmd.listener_factory is not None and (
                listener is None or listener.factory != cmd.listener_factory):
            listener = fresh = await self._bind(cmd.name, cmd.listener_factory)
        if listener is None:
            if site.listener is None:
                raise BuildListenerError(cmd.name, "no listener: give Commit a listener factory")
            # re-commit on the listener already serving: an Update
            return await self._update(Update(cmd.name))
        # Listen first (it can fail: then nothing is published, and the old
        # listener has handed no connection to this version); publish; then
        # accept, so the first accept finds the new version.
        try:
            await self._listen(site, listener, site.staged)
        except DeployError:
            if fresh is not None:
                fresh.close()
            raise
        # -- nothing can fail below this line --
        self._publish(site, site.staged, site.staged_factory)
        await listener.start()
        self._count_version(site, site.staged)
        old_listener, site.listener = site.listener, listener
        if fresh is None:
            site.staged_listener = None
        elif site.staged_listener is not None:
            site.staged_listener.close()
            site.staged_listener = None
        site.staged = site.staged_factory = None
        if old_listener is not None:
            old_listener.close()   # stops accepting; its connections go on
        return {"generation": site.generation, "listen": listener.address}

    async def _prepare_and_commit(self, cmd: PrepareAndCommit) -> dict[str, Any]:
        svc = await self._build(cmd.name, cmd.factory, None, fresh=True)
        listener = await self._bind(cmd.name, cmd.listener_factory)
        site = self.sites.get(cmd.name)
        new_site = site is None
        if site is None:
            site = Site(cmd.name)
        try:
            await self._listen(site, listener, svc)
        except DeployError:
            listener.close()
            raise
        # -- nothing can fail below this line --
        if new_site:
            self.sites[cmd.name] = site
        self._publish(site, svc, cmd.factory)
        await listener.start()
        self._count_version(site, svc)
        site.drop_staged()
        old_listener, site.listener = site.listener, listener
        if old_listener is not None:
            old_listener.close()
        return {"generation": site.generation, "listen": listener.address}

    async def _abort(self, cmd: Abort) -> dict[str, Any]:
        site = self._site(cmd.name)
        had = site.staged is not None or site.staged_listener is not None
        site.drop_staged()
        if site.service is None:
            # created by a Precommit and never committed: back to nothing
            del self.sites[cmd.name]
        return {"aborted": had}

    async def _remove(self, cmd: Remove) -> dict[str, Any]:
        site = self._site(cmd.name)
        del self.sites[cmd.name]
        site.drop_staged()
        if site.listener is not None:
            site.listener.close()
        timeout = self.drain_timeout if cmd.drain_timeout is None else cmd.drain_timeout
        draining = len(site.conns)
        if draining:
            task = asyncio.get_running_loop().create_task(self._drain(site, timeout))
            self._drains[task] = site
            task.add_done_callback(self._drain_done)
        return {"draining": draining}

    def _drain_done(self, task: asyncio.Task[None]) -> None:
        self._drains.pop(task, None)

    async def _drain(self, site: Site, timeout: float) -> None:
        try:
            await asyncio.wait_for(site.conns.wait_empty(), timeout)
        except asyncio.TimeoutError:
            n = site.conns.abort_all()
            log.info("site %r: drain timeout (%.1fs), closed %d connections", site.name, timeout, n)

    _handlers = {
        Precommit: _precommit,
        Update: _update,
        Commit: _commit,
        PrepareAndCommit: _prepare_and_commit,
        Abort: _abort,
        Remove: _remove,
    }

    # -- helpers --------------------------------------------------------------

    def _publish(self, site: Site, svc: Service, factory: MakeService | None) -> None:
        site.slot.swap(svc)   # the one assignment new connections see
        site.factory = factory
        site.generation += 1
        site.committed_at = time.time()
        svc.published(site.generation)

    @staticmethod
    def _count_version(site: Site, svc: Service | None) -> None:
        # Key the version by what its connections hold (``Service.version``:
        # a layer's inner service), so that it is forgotten when its last
        # connection ends, not the moment the slot lets go of it.
        if svc is None:
            return
        try:
            site.versions[svc.version] = site.generation
        except TypeError:
            pass  # a service that is not weak-referenceable is simply not counted

    def status(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Every site's status (only those of *names*, if given), and how many
        removed sites are still draining."""
        sites = self.sites.items() if names is None else \
            [(n, self.sites[n]) for n in names if n in self.sites]
        return {**self._status_head(), "sites": {name: site.status() for name, site in sites}}

    async def status_sliced(self, names: Sequence[str] | None = None, summary: bool = False) -> dict[str, Any]:
        """``status``, built in slices of ``SLICE`` seconds with a loop turn
        between two (a worker with 10,000 sites keeps accepting while it
        answers); with *summary*, counts instead of one entry per site."""
        head = self._status_head()
        head["commands"] = self.commands
        if summary:
            head.update(sites={}, site_count=len(self.sites),
                        active=sum(len(site.conns) for site in self.sites.values()),
                        staged=sum(1 for site in self.sites.values() if site.staged is not None))
            return head
        todo = list(self.sites.items()) if names is None else [(n, self.sites[n]) for n in names if n in self.sites]
        sites: dict[str, Any] = {}
        start = time.monotonic()
        for name, site in todo:
            sites[name] = site.status()
            if time.monotonic() - start >= SLICE:
                await asyncio.sleep(0)
                start = time.monotonic()
        head["sites"] = sites
        return head

    def _status_head(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id,
            "draining": len(self._drains),
            #: open connections of the removed sites still draining
            "draining_connections": sum(len(site.conns) for site in self._drains.values()),
        }

    async def wait_drained(self) -> None:
        """Wait until every removed site has drained (or timed out)."""
        while self._drains:
            await asyncio.gather(*list(self._drains), return_exceptions=True)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Graceful stop: stop accepting everywhere, drain (bounded), close the rest."""
        async with self._lock:
            for name in list(self.sites):
                await self._remove(Remove(name, drain_timeout))
        await self.wait_drained()


def _address(lf: Any) -> str:
    try:
        return str(lf.address)
    except Exception:
        return repr(lf)
