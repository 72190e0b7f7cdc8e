"""Shared test helpers: run coroutines on uvloop, free ports, both cores.

Every test is bounded: ``run()`` applies a timeout, and pytest-timeout
stops anything else.  Sockets a test leaves open when its loop closes
fail it (see ``run()``).  Exceptions that reach the loop's exception handler
fail the test.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import warnings
from typing import Any, Awaitable, Callable, TypeVar

import pytest
import uvloop

from hotproxy import core

T = TypeVar("T")

#: both cores, always: without the extension the compiled one is skipped with
#: the import's reason, never dropped (and with HOTPROXY_REQUIRE_EXTENSIONS=1,
#: as CI sets, ``hotproxy.core`` itself fails to import instead)
CORES = ["compiled", "python"] if core.COMPILED_AVAILABLE else [
    pytest.param("compiled", marks=pytest.mark.skip(
        reason=f"the compiled core cannot be imported: {core.UNAVAILABLE_REASON}")),
    "python"]


@pytest.fixture(params=CORES)
def core_name(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run the test on each core; worker processes started meanwhile use it too."""
    previous = core.name()
    core.select(request.param)
    if request.param == "python":
        monkeypatch.setenv("HOTPROXY_NO_EXTENSIONS", "1")
    else:
        monkeypatch.delenv("HOTPROXY_NO_EXTENSIONS", raising=False)
    yield request.param
    core.select(previous)


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run *coro* on a fresh uvloop loop; fail on unhandled loop errors."""
    errors: list[dict[str, Any]] = []

    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        return await asyncio.wait_for(coro, timeout)  # type: ignore[arg-type]

    # uvloop's loop.close() closes what is still open with a ResourceWarning
    # first; under "filterwarnings = error" that warning raises inside a C
    # callback, the handle is never closed and close() waits for it forever
    # (in C, where pytest-timeout cannot interrupt).  So warnings are recorded
    # while the loop runs and closes, and a leak fails the test instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(main())
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    if leaks:
        raise AssertionError(f"left open when the loop closed: {leaks!r}")
    if errors:
        raise AssertionError(f"unhandled exceptions in the event loop: {errors!r}")
    return result


_used: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port below the ephemeral range that nobody is bound to right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port in _used:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _used.add(port)
        return port
    raise RuntimeError("no free port")


async def echo_roundtrip(host: str, port: int, payload: bytes = b"ping", greeting: int = 0) -> bytes:
    """Connect, read *greeting* bytes, send *payload*, return greeting + echo."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        got = await reader.readexactly(greeting) if greeting else b""
        writer.write(payload)
        await writer.drain()
        got += await reader.readexactly(len(payload))
        return got
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def eventually(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll *pred* (sync or async) until truthy; fail after *timeout*."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture
def start(tmp_path: Any) -> Any:
    """``start(config_text, *, name=..., **kw)`` -> a started ``hotproxy run``
    (see ``helpers_program.started_programs``); all stopped at the end."""
    from helpers_program import started_programs

    with started_programs(tmp_path) as start:
        yield start


@pytest.fixture
def traffic() -> Any:
    """``traffic(targets, **kw)`` -> a running ``helpers_program.Traffic``; all killed at the end."""
    from helpers_program import Traffic

    started: list[Any] = []

    def _traffic(targets: list[str], **kw: Any) -> Any:
        t = Traffic(targets, **kw)
        started.append(t)
        return t

    yield _traffic
    for t in started:
        t.kill()
