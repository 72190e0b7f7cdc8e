"""Fixtures for the micro-benchmarks: the core to measure, and a uvloop loop.

Run: ``pytest bench/`` (timings), or ``bash ci/bench.sh`` (each benchmark
once, no timing -- CI's guard against rot).  Compare the cores with
``pytest bench/ --benchmark-group-by=func``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import pytest
import uvloop

from hotproxy import core

#: without the extension the compiled core is skipped with the reason, never dropped
CORES = ["compiled", "python"] if core.COMPILED_AVAILABLE else [
    pytest.param("compiled", marks=pytest.mark.skip(
        reason=f"the compiled core cannot be imported: {core.UNAVAILABLE_REASON}")),
    "python"]


@pytest.fixture(params=CORES)
def core_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """Measure on each core: code built while the fixture is active reads
    ``core.impl`` and so uses the selected one."""
    previous = core.name()
    core.select(request.param)
    try:
        yield request.param
    finally:
        core.select(previous)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A uvloop event loop, closed after the benchmark; loop errors fail it."""
    lp = uvloop.new_event_loop()
    errors: list[dict[str, Any]] = []
    lp.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        yield lp
    finally:
        lp.run_until_complete(lp.shutdown_asyncgens())
        lp.close()
    if errors:
        raise AssertionError(f"unhandled exceptions in the event loop: {errors!r}")
