"""Helpers for the end-to-end tests of the ``hotproxy`` program.

* ``Program``: one real ``hotproxy run -c FILE`` process (the master and its
  workers), with its log in a file, readiness by polling the admin socket,
  and a ``kill()`` that leaves no process behind (tests call it from a
  fixture finalizer).
* ``FailOnWorker``: a test-only service factory that fails to build on one
  worker id, to show that a failure on one worker rolls back all of them,
  and can take its time building, to show that reloads are serialized.
  It reaches the program as the service kind ``fail_on_worker``, registered
  only when the master is started as ``python -m helpers_program run ...``
  (this module's ``__main__``): production code knows nothing of it.
* ``EchoClient``: a long-lived echo connection that can be checked at any
  time, and ``ShortLoop``: short connections in a loop, counting failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from hotproxy.admin import AdminClient, AdminError
from hotproxy.config import Option, ServiceKind, register_kind
from hotproxy.echo import EchoFactory
from hotproxy.service import CountConnections, MakeService, Service, stack

HOST = "127.0.0.1"
TESTS = os.path.dirname(os.path.abspath(__file__))


# -- the test-only service kind --------------------------------------------------


@dataclass(frozen=True)
class FailOnWorker(MakeService):
    """An echo factory that raises while building on worker ``fail_worker`` (-1: never)."""

    greeting: bytes = b""
    fail_worker: int = -1
    #: seconds to take building (the old version serves meanwhile)
    delay: float = 0.0
    #: build only once this file exists (at most 60 s): a test holds a reload open
    wait_file: str = ""
    #: seconds to take building *without* yielding to the worker's loop (a
    #: blocking build: the worker answers nothing meanwhile)
    busy: float = 0.0

    async def make_via_ref(self, old: Service | None) -> Service:
        if self.busy:
            time.sleep(self.busy)
        if self.delay:
            await asyncio.sleep(self.delay)
        for _ in range(6000):
            if not self.wait_file or os.path.exists(self.wait_file):
                break
            await asyncio.sleep(0.01)
        if str(self.fail_worker) == os.environ.get("HOTPROXY_WORKER_ID"):
            raise RuntimeError(f"injected failure on worker {self.fail_worker}")
        return EchoFactory(self.greeting).make_via_ref(old)


FAIL_ON_WORKER = ServiceKind("fail_on_worker", {
    "greeting": Option("str", ""),
    "fail_worker": Option("int", -1),
    "delay": Option("float", 0.0, min=0),
    "wait_file": Option("str", ""),
    "busy": Option("float", 0.0, min=0),
}, lambda o: stack(FailOnWorker(o["greeting"].encode(), o["fail_worker"], o["delay"], o["wait_file"], o["busy"]),
                   CountConnections()),
    doc="test only: an echo service that fails to build on one worker")


@dataclass(frozen=True)
class StallOnUpdate(MakeService):
    """An echo factory that, built on worker ``stall_worker``, makes that
    worker stop itself (SIGSTOP) when the next ``Update`` reaches it: a
    worker that answered *prepare* and then goes silent during *commit*."""

    greeting: bytes = b""
    stall_worker: int = -1

    def make_via_ref(self, old: Service | None) -> Service:
        if str(self.stall_worker) == os.environ.get("HOTPROXY_WORKER_ID"):
            from hotproxy.commands import Update
            from hotproxy.executor import ServiceExecutor

            update = ServiceExecutor._handlers[Update]

            async def stall_then_update(executor: Any, cmd: Any) -> Any:
                ServiceExecutor._handlers[Update] = update   # once
                os.kill(os.getpid(), signal.SIGSTOP)
                return await update(executor, cmd)

            ServiceExecutor._handlers[Update] = stall_then_update  # type: ignore[assignment]
        return EchoFactory(self.greeting).make_via_ref(old)


STALL_ON_UPDATE = ServiceKind("stall_on_update", {
    "greeting": Option("str", ""),
    "stall_worker": Option("int", -1),
}, lambda o: stack(StallOnUpdate(o["greeting"].encode(), o["stall_worker"]), CountConnections()),
    doc="test only: an echo service whose worker stops itself at the next Update")


@dataclass(frozen=True)
class CountHealthAsks(MakeService):
    """An echo factory that appends this process's pid to ``asks_file``, one
    line, each time it is asked for its active health checks (it has none):
    the master asks when it follows what is deployed and staged."""

    greeting: bytes = b""
    asks_file: str = ""

    def make_via_ref(self, old: Service | None) -> Service:
        return EchoFactory(self.greeting).make_via_ref(old)

    def health_checks(self) -> list[tuple[str, Any]]:
        if self.asks_file:
            with open(self.asks_file, "a", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
        return []


COUNT_HEALTH_ASKS = ServiceKind("count_health_asks", {
    "greeting": Option("str", ""),
    "asks_file": Option("str", ""),
}, lambda o: stack(CountHealthAsks(o["greeting"].encode(), o["asks_file"]), CountConnections()),
    doc="test only: an echo service that counts the master's asks for its health checks in a file")


def register() -> None:
    """Make the test-only kinds (``fail_on_worker``, ``stall_on_update``,
    ``count_health_asks``) available in this process."""
    register_kind(FAIL_ON_WORKER)
    register_kind(STALL_ON_UPDATE)
    register_kind(COUNT_HEALTH_ASKS)


# -- the program -------------------------------------------------------------------


class Program:
    """A running ``hotproxy run -c FILE``; always ``kill()`` it in a finalizer."""

    def __init__(self, config: Path | None, log: Path, *, test_kinds: bool = False,
                 env: dict[str, str] | None = None, args: list[str] | None = None,
                 nofile: int | tuple[int, int] | None = None, module: str | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.config = config
        self.log_path = log
        self.cwd = config.parent if config is not None else log.parent
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([TESTS, self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.env.update(env or {})
        module = module or ("helpers_program" if test_kinds else "hotproxy.cli")
        cmd = [sys.executable, "-m", module, "run"]
        if args is None:
            args = ["-c", str(config)] if config is not None else []
        cmd += args
        self._log = open(log, "ab")
        preexec = None
        if nofile is not None:
            def preexec() -> None:
                # ``ulimit -n NOFILE`` for the master, inherited by its workers
                # (a pair: the soft and the hard limit)
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, nofile if isinstance(nofile, tuple) else (nofile, nofile))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=str(self.cwd), preexec_fn=preexec, pass_fds=pass_fds)
        self.worker_pids: list[int] = []
        #: every master and worker pid seen (``follow``): masters started by upgrades, their workers
        self.seen_pids: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def socket_path(self) -> str:
        from hotproxy.config import admin_socket_for

        old = os.environ.get("XDG_RUNTIME_DIR")
        try:
            if "XDG_RUNTIME_DIR" in self.env:
                os.environ["XDG_RUNTIME_DIR"] = self.env["XDG_RUNTIME_DIR"]
            return admin_socket_for(None if self.config is None else str(self.config))
        finally:
            if old is None:
                os.environ.pop("XDG_RUNTIME_DIR", None)
            else:
                os.environ["XDG_RUNTIME_DIR"] = old

    async def admin(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """One admin request (the CLI's own client)."""
        client = AdminClient(self.socket_path())
        await client.connect()
        try:
            return await asyncio.wait_for(client.request(cmd, **fields), 60)
        finally:
            await client.close()

    async def status(self) -> dict[str, Any]:
        reply = await self.admin("status")
        assert reply["ok"], reply
        return reply["status"]  # type: ignore[no-any-return]

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the initial config serves; fail with the log if the program exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"hotproxy exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(AdminError, OSError, AssertionError, KeyError):
                status = await self.status()
                if status["ready"]:
                    self.worker_pids = [w["pid"] for w in status["workers"] if w["pid"]]
                    return status
            if time.monotonic() > deadline:
                raise AssertionError(f"hotproxy not ready within {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.05)

    async def generations(self, name: str) -> dict[str, int]:
        """Per-worker generation of service *name*."""
        for s in (await self.status())["services"]:
            if s["name"] == name:
                return s["generations"]  # type: ignore[no-any-return]
        raise KeyError(name)

    async def cli(self, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
        """Run ``hotproxy ARGS`` (as ``python -m hotproxy.cli``); return (code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hotproxy.cli", *args, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env, cwd=str(self.cwd))
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"hotproxy still running after {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def follow(self) -> dict[str, Any]:
        """The status of whichever master answers now (an upgrade changes it);
        its pid and its workers' are remembered for ``kill``."""
        status = await self.status()
        self.seen_pids.add(status["pid"])
        self.seen_pids.update(w["pid"] for w in status["workers"] if w["pid"])
        self.seen_pids.update(m["pid"] for m in status.get("old_masters") or ())
        return status

    def track(self, pid: int) -> None:
        """Kill *pid* (and its children) in ``kill`` too."""
        self.seen_pids.add(pid)
        self.seen_pids.update(_children(pid))

    def alive_workers(self) -> list[int]:
        return [pid for pid in self.worker_pids if _alive(pid)]

    def kill(self) -> None:
        """Make sure nothing we started survives (master and workers)."""
        pids = set(self.worker_pids) | set(_children(self.proc.pid))
        for pid in list(self.seen_pids):
            pids.add(pid)
            pids.update(_children(pid))
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """True if process *pid* runs (a zombie does not)."""
    return _alive(pid)


def children(pid: int) -> list[int]:
    """The child processes of *pid*."""
    return _children(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def started_programs(directory: Path, *, log_tail: int | None = None) -> Iterator[Callable[..., Program]]:
    """``start(config_text, *, name="hotproxy.toml", **kw)`` -> a started ``Program``.

    The file (and the log, ``NAME.log``) go in *directory*; ``config_text``
    None runs the embedded default.  At the end every program started is
    continued (a test may have stopped its workers with SIGSTOP) and killed,
    with everything it led to, and its log printed (pytest shows it when the
    test failed; *log_tail*: only the last that many characters).
    """
    started: list[Program] = []

    def start(text: str | None, *, name: str = "hotproxy.toml", **kw: Any) -> Program:
        cfg = directory / name
        if text is not None:
            cfg.write_text(text)
        prog = Program(cfg if text is not None else None, directory / f"{name}.log", **kw)
        started.append(prog)
        return prog

    try:
        yield start
    finally:
        for prog in started:
            for pid in prog.worker_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            prog.kill()
            text = prog.log()
            print(f"---- log of {prog.config or 'hotproxy run'} ----\n{text[-log_tail:] if log_tail else text}")


# -- clients -------------------------------------------------------------------------


class EchoClient:
    """A long echo connection; ``check()`` proves it still works."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = greeting
        self.n = 0

    @classmethod
    async def open(cls, port: int, greeting_len: int = 0) -> EchoClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        greeting = await asyncio.wait_for(reader.readexactly(greeting_len), 10) if greeting_len else b""
        return cls(reader, writer, greeting)

    async def check(self) -> None:
        self.n += 1
        msg = b"ping %d\n" % self.n
        self.writer.write(msg)
        await self.writer.drain()
        got = await asyncio.wait_for(self.reader.readexactly(len(msg)), 10)
        assert got == msg

    async def check_cut(self) -> None:
        """Prove the connection was cut: what we send is answered by an end of
        file or a reset (within 10 s), never by bytes, right or wrong."""
        self.n += 1
        try:
            self.writer.write(b"ping %d\n" % self.n)
            await self.writer.drain()
            got = await asyncio.wait_for(self.reader.read(100), 10)
        except ConnectionError:
            return
        assert got == b"", f"the connection was not cut: it answered {got!r}"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def roundtrip(port: int, greeting_len: int = 0, payload: bytes = b"hello") -> bytes:
    """A short connection: greeting + echo of *payload*."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    try:
        got = await asyncio.wait_for(reader.readexactly(greeting_len), 10) if greeting_len else b""
        writer.write(payload)
        await writer.drain()
        got += await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def refuses(port: int) -> bool:
    """True if nothing accepts on *port*."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
    except (ConnectionRefusedError, OSError):
        return True
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
    return False


class ShortLoop:
    """Short connections to *ports*, one after another, until ``stop()``.

    Every connection must echo its payload, after one of the greetings the
    port may send (a changed service sends the new one); failures are kept.
    """

    def __init__(self, targets: dict[int, set[bytes]]) -> None:
        self.targets = targets
        self.ok = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ShortLoop:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            for port, greetings in self.targets.items():
                i += 1
                glen = len(next(iter(greetings)))
                payload = b"short %d\n" % i
                try:
                    got = await roundtrip(port, glen, payload)
                    if got[glen:] != payload or got[:glen] not in greetings:
                        self.failures.append(f"port {port}: got {got!r}")
                    else:
                        self.ok += 1
                except Exception as exc:  # every failure counts, whatever it is
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise asyncio.CancelledError from None   # wait_for may eat a cancel
                    self.failures.append(f"port {port}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    def cancel(self) -> None:
        """For ``finally:`` blocks: stop without waiting."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()


if __name__ == "__main__":
    # ``python -m helpers_program run -c FILE``: the real hotproxy program with
    # the test-only kind added.  Import this module by its own name, so the
    # factories pickle as ``helpers_program.FailOnWorker`` for the workers.
    import helpers_program

    helpers_program.register()
    from hotproxy.cli import main

    sys.exit(main())


# -- traffic processes and /proc figures (the reliability tests) ----------------------


class Traffic:
    """A ``tests/traffic.py`` process verifying echo traffic to *targets*.

    It runs until ``finish()`` (SIGUSR1: the long connections half-close,
    check their tail and EOF) or its own ``duration``; ``finish()`` returns
    its JSON totals.  ``kill()`` is for finalizers.
    """

    def __init__(self, targets: list[str], *, long: int = 2, short: int = 2, duration: float = 600.0,
                 pause: float = 0.005, seed: int = 1, max_short: int = 200000) -> None:
        cmd = [sys.executable, os.path.join(TESTS, "traffic.py"), "--long", str(long), "--short", str(short),
               "--duration", str(duration), "--pause", str(pause), "--seed", str(seed),
               "--max-short", str(max_short)]
        for t in targets:
            cmd += ["--target", t]
        self.targets = targets
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    async def finish(self, timeout: float = 90.0) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"traffic to {self.targets} did not finish in {timeout}s")
            await asyncio.sleep(0.05)
        out, err = self.proc.communicate()
        try:
            return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]
        except (ValueError, IndexError):
            raise AssertionError(f"traffic.py printed no totals: {out!r} {err!r}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def proc_rss_kib(pid: int) -> int:
    """Resident set size of *pid* in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time *pid* has used, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_error_line(cfg: Path) -> str:
    """Run ``hotproxy check -c CFG`` on a bad file: it must exit 1 with one
    line on stderr and no traceback; that line."""
    proc = subprocess.run([sys.executable, "-m", "hotproxy.cli", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def toml_value(v: Any) -> str:
    """*v* as a TOML value: tables inline (quoted keys), arrays, and the rest
    as JSON writes it (TOML's basic strings take JSON's escapes)."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def toml(services: dict[str, dict[str, Any]], *, workers: int = 2, drain: float = 30.0,
         admin: str = "admin.sock", **runtime: Any) -> str:
    """A config file's text."""
    lines = ["[runtime]", f"workers = {workers}", f"drain_timeout = {drain}", f"admin_socket = {json.dumps(admin)}",
             'log_level = "info"']
    lines += [f"{k} = {toml_value(v)}" for k, v in runtime.items()]
    for name, opts in services.items():
        lines.append(f"\n[services.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in opts.items()]
    return "\n".join(lines) + "\n"
