"""Declared interfaces instead of reaching through objects (issue 14, item 4),
and one place for each fact the source repeats (item 3).

* The manager answers what the reload and the master need of its workers
  (``live_workers``, ``down_workers``, ``kill_all``): over two real worker
  processes, killed and restarted by the supervisor.
* fd passing is an object each worker owns (``fdchannel``), not module
  state: two channels in one process pass sockets under the same token
  without meeting.
* The source guards: no ``getattr``/``hasattr`` reach into another
  module's objects (the few kept are listed here, with why), ``unix:`` is
  parsed in ``addresses.py`` only, and the exception-to-line helpers are
  ``errors.describe``/``errors.one_line`` only.
"""

from __future__ import annotations

import ast
import asyncio
import socket
from pathlib import Path

from conftest import eventually, free_port, run
from hotproxy import EchoFactory, PrepareAndCommit, TcpListenerFactory, WorkerManager
from hotproxy.fdchannel import FdReceiver, FdSender, InheritedListenerFactory

SRC = Path(__file__).resolve().parent.parent / "src" / "hotproxy"

def _modules() -> list[tuple[str, ast.Module]]:
    """The Python layer's modules: the private ones (the core's twin and
    whatever the core is split into, ``_*.py``) are items 1 and 2's."""
    return [(p.name, ast.parse(p.read_text(), str(p))) for p in sorted(SRC.glob("*.py"))
            if p.name == "__init__.py" or not p.name.startswith("_")]


# -- the worker handle: what the manager answers --------------------------------------------------


def test_the_manager_answers_for_its_workers_killed_and_restarted() -> None:
    """``kill_all`` kills every worker process (the master's second stop
    request); ``down_workers`` names them until the supervisor has them
    back; ``live_workers`` are the ones that take commands -- and serve."""
    port = free_port()

    async def main() -> None:
        async with WorkerManager(2, drain_timeout=1.0) as m:
            (await m.dispatch(PrepareAndCommit("e", EchoFactory(b"e"), TcpListenerFactory("127.0.0.1", port)))
             ).raise_for_errors()
            assert [w.id for w in m.live_workers()] == [0, 1] and m.down_workers() == []
            pids = {w.id: w.pid for w in m.workers}
            m.kill_all()
            seen_down: set[int] = set()

            def both_seen_down() -> bool:
                seen_down.update(m.down_workers())
                return seen_down == {0, 1}

            await eventually(both_seen_down, timeout=20, interval=0.005)
            await eventually(lambda: m.restarts == 2 and len(m.live_workers()) == 2, timeout=60)
            assert m.down_workers() == []
            assert all(w.pid != pids[w.id] for w in m.live_workers())
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"e"   # replayed: it serves
            writer.close()

    run(main(), 120)


# -- fd passing: an object per channel ------------------------------------------------------------


def test_two_fd_channels_in_one_process_do_not_meet() -> None:
    """The same token on two channels is two sockets; each channel closes
    only what it received."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    senders = [FdSender(a) for a, _ in pairs]
    receivers = [FdReceiver(b) for _, b in pairs]
    listening = [socket.socket() for _ in range(2)]
    for s in listening:
        s.bind(("127.0.0.1", 0))
    factories = [TcpListenerFactory("127.0.0.1", s.getsockname()[1]) for s in listening]

    async def main() -> None:
        for sender, lsock in zip(senders, listening):
            sender.send(7, lsock.fileno())
        bound = [await asyncio.wait_for(InheritedListenerFactory(f, 7, r).make(), 10)
                 for f, r in zip(factories, receivers)]
        assert [b.sock.getsockname() for b in bound] == [s.getsockname() for s in listening]
        for b in bound:
            b.close()
        receivers[0].release(7)
        receivers[1].release(8)              # never sent on channel 1: closed when it comes
        senders[1].send(8, listening[1].fileno())
        senders[0].send(8, listening[0].fileno())
        got = await asyncio.wait_for(InheritedListenerFactory(factories[0], 8, receivers[0]).make(), 10)
        assert got.sock.getsockname() == listening[0].getsockname()
        got.close()
        # a factory that came without a channel (not in a worker) says so
        try:
            InheritedListenerFactory(factories[0], 9).bind()
        except OSError as exc:
            assert "no inherited listener channel" in str(exc)
        else:
            raise AssertionError("bound without a channel")

    try:
        run(main(), 30)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        for s in listening:
            s.close()


def test_fd_passing_is_no_longer_module_state() -> None:
    import hotproxy.listeners as listeners

    for name in ("_received_fds", "_claimed", "_unwanted", "_fd_channel", "set_fd_channel", "send_listener_fd",
                 "release_inherited", "_claim_fd"):
        assert not hasattr(listeners, name), name


# -- the source: no reaching through objects, one place per fact -----------------------------------

#: (module, what the getattr/hasattr reads) kept, and why:
KEPT_GETATTR = {
    ("__init__.py", "*"): "PEP 562: the package imports a public name's module on first use",
    ("cli.py", "socket"): "argparse: only some subcommands have --socket",
    ("config.py", "O_*"): "os flags that not every platform has",
    ("master.py", "O_*"): "os flags that not every platform has",
    ("paths.py", "O_*"): "os flags that not every platform has",
    ("options.py", "*"): "a factory's field named by its option key (the schema's own keys)",
    ("proxy.py", "*"): "the balancer's _choose_<policy>: the policies are listed once, in options",
    ("reload.py", "*"): "the RESTART_ONLY keys of the RuntimeConfig dataclass",
    ("service.py", "service"): "Service.owns' default: the documented convention of a service's protocols",
}


def _reach(call: ast.Call) -> str:
    if len(call.args) < 2:
        return "*"
    target, name = call.args[0], call.args[1]
    if isinstance(name, ast.Constant) and isinstance(name.value, str):
        if isinstance(target, ast.Name) and target.id == "os" and name.value.startswith("O_"):
            return "O_*"
        return name.value
    return "*"


def test_no_module_reaches_through_objects_with_getattr() -> None:
    found = set()
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("getattr", "hasattr"):
                found.add((module, _reach(node)))
    unexpected = sorted(found - set(KEPT_GETATTR))
    assert unexpected == [], f"getattr/hasattr reaches: {unexpected}"


def test_unix_addresses_are_parsed_in_one_place() -> None:
    """``unix:`` is recognised (``startswith``) and cut (the constant) in addresses.py only."""
    found = []
    for module, tree in _modules():
        if module == "addresses.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == "unix:":
                found.append(f"{module}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "startswith" and node.args \
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("unix"):
                found.append(f"{module}:{node.lineno}")
    assert found == []


def test_exceptions_become_lines_in_one_place() -> None:
    """No private copies of ``errors.describe``/``errors.one_line``, and no
    ``str(exc) or type(exc).__name__`` or whitespace folding inline."""
    found = []
    for module, tree in _modules():
        if module == "errors.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in ("_describe", "_reason", "_one_line"):
                found.append(f"{module}:{node.lineno}: def {node.name}")
            if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and len(node.values) == 2 \
                    and "__name__" in ast.unparse(node.values[1]) and ast.unparse(node.values[0]).startswith("str("):
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "' '.join" and node.args \
                    and ast.unparse(node.args[0]).endswith(".split()"):
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
