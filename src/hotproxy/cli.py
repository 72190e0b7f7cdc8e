"""The ``hotproxy`` command.

    hotproxy run    [-c FILE]     serve (no -c: the embedded default config)
    hotproxy check  -c FILE       validate FILE (and probe its addresses); exit 1 with the error
    hotproxy reload [-c FILE]     reload the instance started with FILE; wait; report
    hotproxy status [-c FILE]     a table of services, generations, connections
    hotproxy stop   [-c FILE]     graceful stop (--fast: at once)

``reload``, ``status`` and ``stop`` find the running instance through its
admin socket: ``runtime.admin_socket`` in FILE, or the path derived from
FILE's absolute path (see ``config.default_admin_socket``); ``--socket``
overrides both.  Every error is one line on stderr and exit code 1 --
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from . import __version__
from .admin import AdminClient, AdminError
from .config import (admin_socket_for, check_on_this_host, default_admin_socket, default_config_text, describe_options,
                     load_config, no_services_error)
from .errors import ConfigError, HotproxyError
from .reload import ReloadReport

if TYPE_CHECKING:
    from .config import Config

PROG = "hotproxy"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args_in = sys.argv[1:] if argv is None else list(argv)
    if args_in[:1] == ["run"]:
        # before anything slow: a SIGHUP now must not kill the master-to-be
        from . import early_signals

        early_signals.catch()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # the reader went away (`hotproxy status | head -1`): not a failure of
        # the command; failures are written to stderr, not to the closed pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (HotproxyError, OSError) as exc:
        _error(_explain(args, str(exc) or type(exc).__name__))
        return 1
    except KeyboardInterrupt:
        return 130


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="A TCP proxy whose services are replaced while it runs.",
        epilog="Run 'hotproxy COMMAND --help' for a command's options.  "
               "Signals to the master: SIGHUP reload, SIGTERM/SIGINT graceful stop, SIGQUIT fast stop.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Any, help: str, description: str, config_required: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        if config_required:
            sp.add_argument("-c", "--config", metavar="FILE", required=True, help="the config file (TOML)")
        else:
            sp.add_argument("-c", "--config", metavar="FILE",
                            help="the config file (TOML); default: the embedded default config")
        return sp

    run = add("run", _cmd_run, "serve (in the foreground)",
              "Start the master and its workers and serve FILE's services until stopped.\n"
              "Without -c, serve the embedded default config (printed at start).\n\n"
              "Signals: SIGHUP reloads FILE; SIGTERM/SIGINT stop gracefully (drain within\n"
              "runtime.drain_timeout); SIGQUIT stops at once.  Logs go to stderr.")
    run.add_argument("--print-default", action="store_true",
                     help="print the embedded default config and exit")
    run.add_argument("--allow-empty", action="store_true",
                     help="start even if FILE declares no service (refused otherwise)")

    check = add("check", _cmd_check, "validate a config file",
                "Check FILE as a start or a reload would, without changing anything: syntax,\n"
                "keys, types, addresses, upstream hosts, proxy loops, and on this host: each\n"
                "listen address is bind-probed (one the running instance of FILE holds counts\n"
                "as free: a reload keeps or moves it; check asks it over the admin socket),\n"
                "Unix socket and admin socket directories exist, the pidfile holds a pid.\n"
                "Exit 0 if it is valid, with a note for each check it could not run; else 1\n"
                "with one line naming the file, the key and what was expected.",
                config_required=True)
    check.add_argument("--keys", action="store_true", help="also list every config key and its default")
    check.add_argument("--allow-empty", action="store_true",
                       help="accept a file that declares no service (run/reload need --allow-empty too)")

    for name, func, help, desc in (
        ("reload", _cmd_reload, "reload the running instance's config",
         "Ask the instance started with FILE to reload FILE, wait for the outcome and\n"
         "print it: services added, changed (moved), removed, unchanged, and any\n"
         "per-worker failure.  All or nothing: on any failure the old config keeps\n"
         "serving.  Exit 0 if the reload was applied, else 1."),
        ("status", _cmd_status, "show the running instance's services",
         "A table of the running instance's services: listen address, generation,\n"
         "active connections, totals, and when each last changed; then the workers\n"
         "and the last reload's time and result."),
        ("stop", _cmd_stop, "stop the running instance",
         "Stop the instance started with FILE: gracefully (stop accepting, drain open\n"
         "connections within runtime.drain_timeout), or at once with --fast.  Waits\n"
         "until it has stopped unless --no-wait."),
    ):
        sp = add(name, func, help, desc)
        sp.add_argument("-s", "--socket", metavar="PATH",
                        help="the running instance's admin socket (default: runtime.admin_socket "
                             "in FILE, else a path derived from FILE's absolute path)")
        sp.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up waiting after this long (default: reload/status 120, stop 600)")
        if name == "status":
            sp.add_argument("--json", action="store_true", help="print the raw status as JSON")
        if name == "reload":
            sp.add_argument("--json", action="store_true", help="print the raw report as JSON")
            sp.add_argument("--allow-empty", action="store_true",
                            help="apply FILE even if it declares no service (removes every service; "
                                 "refused otherwise, and always on SIGHUP)")
        if name == "stop":
            sp.add_argument("--fast", action="store_true", help="close every connection at once")
            sp.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    return p


# -- run and check -------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    if args.print_default:
        sys.stdout.write(default_config_text())
        return 0
    config = load_config(args.config)   # a bad file: one line, exit 1, nothing started
    if not config.services and not args.allow_empty:
        raise no_services_error(config.source, "hotproxy run --allow-empty")
    import uvloop

    from .master import Master, setup_logging

    setup_logging(config.runtime.log_level)
    if args.config is None:
        print(f"{PROG}: no -c FILE given: serving the embedded default config:\n", file=sys.stderr)
        for line in default_config_text().splitlines():
            print(f"    {line}", file=sys.stderr)
        print(file=sys.stderr)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Master(config).run())


def _cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.services and not args.allow_empty:
        raise no_services_error(config.source, "hotproxy check|run|reload --allow-empty")
    held, pid, notes = _running_instance(config)
    problems = check_on_this_host(config, held, pid)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        _error(problems[0] + more)
        return 1
    names = ", ".join(f"{s.name} ({s.kind} on {s.listen})" for s in config.services.values())
    n = len(config.services)
    print(f"{config.source}: ok: {n} service{'' if n == 1 else 's'}{': ' + names if names else ''}")
    notes.append("not checked: building the services in worker processes (only a reload does that)")
    for note in notes:
        print(f"  note: {note}")
    if args.keys:
        for table, key, default, doc in describe_options():
            print(f"  [{table}] {key} = {default}  # {doc}")
    return 0


def _running_instance(config: Config) -> tuple[list[str], int | None, list[str]]:
    """(listen addresses, pid) of the running instance of *config*'s file, and
    notes on what that means for the bind probe.  Asked without an event loop."""
    path = config.runtime.admin_socket
    try:
        status = _status_now(path, 10.0)
    except (FileNotFoundError, ConnectionRefusedError):
        return [], None, [f"no hotproxy answers on {path}: every listen address was probed"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [], None, [f"the hotproxy on {path} did not answer ({' '.join(str(exc).split()) or type(exc).__name__}): "
                          "addresses it holds count as taken"]
    if status.get("config") != config.source:
        return [], None, [f"the hotproxy on {path} runs {status.get('config')}, not this file: "
                          "addresses it holds count as taken"]
    held = [str(s["listen"]) for s in status.get("services") or ()]
    pid = status.get("pid") if isinstance(status.get("pid"), int) else None
    return held, pid, [f"{len(held)} listen address{'' if len(held) == 1 else 'es'} held by the running "
                       f"hotproxy of this file (pid {pid}) counted as free: a reload keeps or moves them"]


def _status_now(path: str, timeout: float) -> dict[str, Any]:
    """One ``status`` request on the admin socket *path*, blocking, bounded by *timeout*."""
    import json
    import socket

    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b'{"cmd": "status"}\n')
        buf = b""
        while not buf.endswith(b"\n") and len(buf) < 16 * 1024 * 1024:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not isinstance(reply, dict) or not reply.get("ok") or not isinstance(reply.get("status"), dict):
        raise ValueError(str(reply.get("error") if isinstance(reply, dict) else "not a status reply"))
    return reply["status"]  # type: ignore[no-any-return]


# -- talking to a running instance ----------------------------------------------


#: how the admin client says nobody is there
_NOT_RUNNING = "no hotproxy is running here"


def _explain(args: argparse.Namespace, message: str) -> str:
    """*message*, and for "no hotproxy is running here" where the socket came from.

    A reload of a broken file that reaches nobody reports the file's error:
    the socket was perhaps found in a file that no longer says where it is.
    """
    if not message.startswith(_NOT_RUNNING) or getattr(args, "socket", None) is not None \
            or not hasattr(args, "socket"):
        return message
    sock = admin_socket_for(args.config)
    if args.config is None:
        where = "derived for the embedded default config (no -c)"
    elif sock == default_admin_socket(os.path.abspath(args.config)):
        where = f"derived from the path of {os.path.abspath(args.config)}"
    else:
        where = f"runtime.admin_socket in {os.path.abspath(args.config)}"
    if args.command == "reload":
        try:
            config = load_config(args.config)
            if not config.services and not args.allow_empty:
                raise no_services_error(config.source, "hotproxy reload --allow-empty")
        except ConfigError as exc:
            return f"{exc} (and no hotproxy answers on {sock}, {where})"
    return f"{message}; that socket is {where}: give -c with the file hotproxy was started with, or --socket PATH"



def _socket(args: argparse.Namespace) -> str:
    return str(args.socket) if args.socket else admin_socket_for(args.config)


async def _ask(path: str, cmd: str, timeout: float, **fields: Any) -> dict[str, Any]:
    client = AdminClient(path)
    await client.connect()
    try:
        return await asyncio.wait_for(client.request(cmd, **fields), timeout)
    except asyncio.TimeoutError:
        raise AdminError(f"no answer to {cmd!r} within {timeout:g}s") from None
    finally:
        await client.close()


def _cmd_reload(args: argparse.Namespace) -> int:
    fields = {"allow_empty": True} if args.allow_empty else {}
    reply = asyncio.run(_ask(_socket(args), "reload", args.timeout or 120.0, **fields))
    if "report" not in reply:
        _error(reply.get("error", "the running hotproxy did not reload"))
        return 1
    if args.json:
        import json

        print(json.dumps(reply["report"], indent=2))
        return 0 if reply.get("ok") else 1
    report = ReloadReport.from_dict(reply["report"])
    out = sys.stdout if report.ok else sys.stderr
    print(format_report(report), file=out)
    return 0 if report.ok else 1


def format_report(report: ReloadReport) -> str:
    """A reload report for people: the one-line summary, then the details."""
    lines = [report.summary()]
    if report.ok or report.added or report.changed or report.removed:
        moved = set(report.moved)
        changed = [f"{n} (moved)" if n in moved else n for n in report.changed]
        verb = "" if report.ok else " (not applied)"
        lines += [f"  added{verb}:     {', '.join(report.added) or '-'}",
                  f"  changed{verb}:   {', '.join(changed) or '-'}",
                  f"  removed{verb}:   {', '.join(report.removed) or '-'}",
                  f"  unchanged: {', '.join(report.unchanged) or '-'}"]
    for failure in report.failures:
        if len(report.failures) == 1 and failure.phase == "config" and failure.error == report.error:
            continue   # the summary says it already: a bad file is one line
        lines.append(f"  failure: {failure}")
    for note in report.notes:
        lines.append(f"  note: {note}")
    if report.ok:
        lines.append(f"  timings: prepare {report.prepare_ms:.1f} ms, commit {report.commit_ms:.1f} ms, "
                     f"total {report.duration_ms:.1f} ms")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    reply = asyncio.run(_ask(_socket(args), "status", args.timeout or 120.0))
    if not reply.get("ok"):
        _error(reply.get("error", "no status"))
        return 1
    status = reply["status"]
    if args.json:
        import json

        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The status table ``hotproxy status`` prints."""
    rows = [("SERVICE", "KIND", "LISTEN", "GEN", "ACTIVE", "TOTALS", "CHANGED")]
    for s in status["services"]:
        gens = sorted(set(s["generations"].values()))
        gen = "-" if not gens else (str(gens[0]) if len(gens) == 1 else f"{gens[0]}-{gens[-1]}")
        totals = " ".join(f"{k}={_num(v)}" for k, v in sorted(s["totals"].items())) or "-"
        if s.get("old_versions"):
            totals += f" old_versions={s['old_versions']}"
        changed = _when(s["changed_at"]) + (f" (#{s['changed_by_reload']})" if s.get("changed_by_reload") else "")
        rows.append((s["name"], s["kind"], s["listen"], gen, str(s["active"]), totals, changed))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    # old versions that open connections still hold (freed with their last one)
    for s in status["services"]:
        if s.get("old_versions"):
            current = str(s.get("generation"))
            olds = [f"gen {g} ({n} conn{'' if n == 1 else 's'})"
                    for g, n in (s.get("versions") or {}).items() if g != current]
            lines.append(f"  {s['name']}: {s['old_versions']} old version{'' if s['old_versions'] == 1 else 's'}"
                         + (f": {', '.join(olds)}" if olds else ""))
    workers = status["workers"]
    alive = sum(1 for w in workers if w.get("alive"))
    silent = [str(w["worker"]) for w in workers if w.get("alive") and w.get("answering") is False]
    draining = sum(w.get("draining") or 0 for w in workers)
    lines.append("")
    lines.append(f"master pid {status['pid']}, config {status['config']}, up {_duration(time.time() - status['started'])}; "
                 f"workers {alive}/{len(workers)} alive (pids {', '.join(str(w['pid']) for w in workers)})"
                 + (f", not answering: worker {', '.join(silent)}" if silent else "")
                 + f", {status['restarts']} restarts, {draining} removed services draining")
    last = status.get("last_reload")
    if last:
        report = ReloadReport.from_dict(last)
        lines.append(f"last reload #{report.seq} ({report.trigger}) at {_when(report.at)}: {report.summary()}")
    if status.get("reloading"):
        queued = status.get("reload_queued") or 0
        lines.append("a reload is running" + (f" ({queued} request{'' if queued == 1 else 's'} queued behind it)"
                                              if queued else ""))
    if status.get("stopping"):
        lines.append(f"stopping ({status['stopping']})")
    return "\n".join(lines)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.2f}"


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _cmd_stop(args: argparse.Namespace) -> int:
    return asyncio.run(_stop(_socket(args), not args.fast, not args.no_wait, args.timeout or 600.0))


async def _stop(path: str, graceful: bool, wait: bool, timeout: float) -> int:
    client = AdminClient(path)
    await client.connect()
    try:
        reply = await asyncio.wait_for(client.request("stop", graceful=graceful), 30.0)
        if not reply.get("ok"):
            _error(reply.get("error", "the running hotproxy refused to stop"))
            return 1
        pid = reply.get("pid")
        if not wait:
            print(f"stopping hotproxy (pid {pid})")
            return 0
        # the master answers "stopped" (or just hangs up) once its workers are gone
        try:
            await asyncio.wait_for(client.read(), timeout)
        except asyncio.TimeoutError:
            _error(f"hotproxy (pid {pid}) is still stopping after {timeout:g}s")
            return 1
        print(f"stopped hotproxy (pid {pid})")
        return 0
    finally:
        await client.close()


if __name__ == "__main__":
    sys.exit(main())
