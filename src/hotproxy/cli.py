"""The ``hotproxy`` command.

    hotproxy run    [-c FILE]     serve (no -c: the embedded default config)
    hotproxy check  -c FILE       validate FILE (and probe its addresses); exit 1 with the error
    hotproxy reload [-c FILE]     reload the instance started with FILE; wait; report
    hotproxy status [-c FILE]     a table of services, generations, connections
    hotproxy stop   [-c FILE]     graceful stop (--fast: at once)
    hotproxy upgrade [-c FILE]    replace the running master by the hotproxy installed now
    hotproxy fleet apply -c FILE --etcd URL   apply FILE's services on every instance of a fleet, or none
    hotproxy fleet status --etcd URL          every instance of a fleet: applied revision, last outcome
    hotproxy fleet serve --listen H:P ...     the same apply and status over HTTP (for CI pipelines)

``reload``, ``status``, ``stop`` and ``upgrade`` find the running instance through its
admin socket: ``runtime.admin_socket`` in FILE, or the path derived from
FILE's absolute path (see ``paths.default_admin_socket``); ``--socket``
overrides both.  Every error is one line on stderr and exit code 1 --
never a traceback.

Imports are the commands' own: ``reload``, ``status`` and ``stop`` load
only the blocking admin client (no asyncio, uvloop or core: a call costs
about as much CPU as the interpreter's own start), ``check`` the config
loader, and only ``run`` the master.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__
from .errors import HotproxyError, describe, one_line

#: ``typing.TYPE_CHECKING`` without importing typing (type checkers know the name)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Sequence

    from .adminclient import AdminConnection
    from .config import Config
    from .reload import ReloadReport

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
        _error(_explain(args, describe(exc)))
        return 1
    except KeyboardInterrupt:
        return 130


def _error(message: str) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)


class _Help(argparse.HelpFormatter):
    """argparse's help formatter, minus its ``import shutil``.

    argparse makes a formatter for every ``add_argument``, and the default
    one imports shutil (and bz2, lzma, fnmatch ...) for the terminal width:
    a fifth of an interpreter start in every ``hotproxy status``.  The
    width is found as ``shutil.get_terminal_size`` finds it.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _RawHelp(_Help, argparse.RawDescriptionHelpFormatter):
    """The same, keeping a description's line breaks."""


def _columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size().columns   # stdout's
        except (ValueError, OSError):
            columns = 0
    return columns or 80


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Help, description="A TCP proxy whose services are replaced while it runs.",
        epilog="Run 'hotproxy COMMAND --help' for a command's options.  "
               "Signals to the master: SIGHUP reload, SIGTERM/SIGINT graceful stop, SIGQUIT fast stop, "
               "SIGUSR2 upgrade.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Any, help: str, description: str, config_required: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=description,
                            formatter_class=_RawHelp)
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
    run.add_argument("--etcd", metavar="URL", default=None,
                     help="etcd://HOST:PORT[,HOST:PORT]/PREFIX (etcds:// for TLS): serve the fleet's services "
                          "from etcd (runtime.config_source; FILE then holds only [runtime])")
    _etcd_tls_options(run)
    # how a running master starts its successor (``hotproxy upgrade``): not for people
    run.add_argument("--upgrade-fd", type=int, default=None, help=argparse.SUPPRESS)

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
         "and the last reload's time and result.  With more than 50 services, a\n"
         "summary instead of the table, unless --all; SERVICE... shows only those."),
        ("stop", _cmd_stop, "stop the running instance",
         "Stop the instance started with FILE: gracefully (stop accepting, drain open\n"
         "connections within runtime.drain_timeout), or at once with --fast.  Waits\n"
         "until it has stopped unless --no-wait.  Old masters still draining after an\n"
         "upgrade stop with it."),
        ("upgrade", _cmd_upgrade, "replace the running master by the hotproxy installed now",
         "Make the instance started with FILE start a new master from the hotproxy\n"
         "installed now, and hand it every listening socket, the admin socket and\n"
         "the services' state.  The new master builds its workers from FILE as it is\n"
         "now; once every one serves, the old master stops accepting and drains its\n"
         "connections (runtime.drain_timeout).  All or nothing: if the new master\n"
         "fails (it does not start, FILE is bad, a worker fails, it dies, or it does not\n"
         "serve within runtime.upgrade_timeout), the old one serves on as before.\n"
         "Prints one line; exit 0 if the new master serves, else 1.  SIGUSR2 to the\n"
         "master does the same."),
    ):
        sp = add(name, func, help, desc)
        sp.add_argument("-s", "--socket", metavar="PATH",
                        help="the running instance's admin socket (default: runtime.admin_socket "
                             "in FILE, else a path derived from FILE's absolute path)")
        sp.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up waiting after this long (default: reload/status 120, stop 600)")
        if name == "status":
            sp.add_argument("services", nargs="*", metavar="SERVICE",
                            help="show only these services (exit 1 naming one that does not run)")
            sp.add_argument("--json", action="store_true",
                            help="print the raw status as JSON (one document: every service, or those named)")
            sp.add_argument("--all", action="store_true",
                            help="the whole table even with more than 50 services (a summary otherwise)")
        if name == "reload":
            sp.add_argument("--json", action="store_true", help="print the raw report as JSON")
            sp.add_argument("--allow-empty", action="store_true",
                            help="apply FILE even if it declares no service (removes every service; "
                                 "refused otherwise, and always on SIGHUP)")
        if name == "stop":
            sp.add_argument("--fast", action="store_true", help="close every connection at once")
            sp.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
        if name == "upgrade":
            sp.add_argument("--json", action="store_true", help="print the raw outcome as JSON")
    fleet = sub.add_parser("fleet", help="apply a config on every instance of a fleet (etcd), or show it",
                           formatter_class=_RawHelp,
                           description="A fleet: instances whose services come from etcd (runtime.config_source).")
    fleet.set_defaults(func=lambda a: _usage(fleet))
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION")
    fapply = fsub.add_parser(
        "apply", help="propose FILE; commit it only if every live instance prepared it", formatter_class=_RawHelp,
        description="Propose FILE (only [services.NAME] tables) to the fleet: every live instance\n"
                    "prepares it as a local reload prepares (every check, every service built, every\n"
                    "new listener bound) and answers.  Only if every one prepared it within\n"
                    "--deadline is it committed (one etcd transaction), and each instance commits;\n"
                    "else it is aborted everywhere and the fleet serves on as before.  Prints the\n"
                    "outcome per instance; exit 0 if committed, else 1.")
    fapply.set_defaults(func=_cmd_fleet_apply)
    fapply.add_argument("-c", "--config", metavar="FILE", required=True, help="the fleet config (TOML)")
    fapply.add_argument("--deadline", type=float, default=10.0, metavar="SECONDS",
                        help="how long the instances have to prepare (default 10)")
    fapply.add_argument("--json", action="store_true", help="print the raw outcome as JSON")
    fstatus = fsub.add_parser("status", help="every live instance: applied revision, last outcome, health",
                              formatter_class=_RawHelp, description="The fleet's committed revision and its "
                              "live instances: id, address, applied revision, health, last outcome.")
    fstatus.set_defaults(func=_cmd_fleet_status)
    fstatus.add_argument("--json", action="store_true", help="print the raw status as JSON")
    fserve = fsub.add_parser(
        "serve", help="the same apply and status over HTTP, for CI pipelines", formatter_class=_RawHelp,
        description="Serve POST /fleet/apply (body: the fleet config, TOML; ?deadline=SECONDS) and\n"
                    "GET /fleet/status, each with Authorization: Bearer TOKEN (--token-file).\n"
                    "An apply is hotproxy fleet apply's: JSON with the per-instance lines; 200\n"
                    "committed, 409 not committed (error says why), 422 a bad config, 503 etcd\n"
                    "unreachable.  Runs until SIGTERM/SIGINT (requests in flight finish).")
    fserve.set_defaults(func=_cmd_fleet_serve)
    fserve.add_argument("--listen", metavar="HOST:PORT", required=True, help="where to serve (e.g. 127.0.0.1:7380)")
    fserve.add_argument("--token-file", metavar="FILE", required=True,
                        help="holds the bearer token clients must send (read at start)")
    fserve.add_argument("--deadline", type=float, default=10.0, metavar="SECONDS",
                        help="how long the instances have to prepare, unless the request says (default 10)")
    fserve.add_argument("--tls-cert", metavar="FILE", default=None, help="serve HTTPS with this certificate (PEM)")
    fserve.add_argument("--tls-key", metavar="FILE", default=None, help="the private key (PEM) of --tls-cert")
    for sp in (fapply, fstatus, fserve):
        sp.add_argument("--etcd", metavar="URL", required=True,
                        help="etcd://HOST:PORT[,HOST:PORT]/PREFIX, or etcds://... for TLS")
        _etcd_tls_options(sp)
    return p


#: the ``--etcd-*`` options and the ``runtime`` keys they set
ETCD_TLS_OPTIONS = (("--etcd-ca", "etcd_ca"), ("--etcd-cert", "etcd_cert"), ("--etcd-key", "etcd_key"))


def _etcd_tls_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--etcd-ca", metavar="FILE", default=None,
                    help="with etcds://: the CA certificates (PEM) etcd's certificate must chain to "
                         "(runtime.etcd_ca; default: the system's)")
    sp.add_argument("--etcd-cert", metavar="FILE", default=None,
                    help="with etcds://: a client certificate (PEM) for etcd's --client-cert-auth (runtime.etcd_cert)")
    sp.add_argument("--etcd-key", metavar="FILE", default=None,
                    help="with etcds://: the private key (PEM) of --etcd-cert (runtime.etcd_key)")


def _fleet_source(args: argparse.Namespace) -> Any:
    """``fleet apply/status/serve``: ``--etcd`` and its TLS files, checked (one line each)."""
    from . import fleet

    source = fleet.parse_source(args.etcd, "--etcd")
    fleet.client_module()   # not installed: one line saying what to install
    return fleet.with_tls(source, args.etcd_ca, args.etcd_cert, args.etcd_key,
                          names=("--etcd-ca", "--etcd-cert", "--etcd-key"))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _cmd_fleet_apply(args: argparse.Namespace) -> int:
    import json

    from . import fleet

    source = _fleet_source(args)
    with open(args.config, encoding="utf-8") as f:
        text = f.read()
    fleet.check_fleet_file(text, args.config)   # a bad file: one line, nothing proposed
    proposer = f"{os.uname().nodename}:{os.getpid()}"
    result = fleet.run_async(fleet.apply(source, text, deadline=args.deadline, proposer=proposer))
    if args.json:
        print(json.dumps(vars(result), indent=2))
    else:
        lines = result.lines()
        shown = lines[1:] if not result.ok else lines
        if shown:
            print("\n".join(shown))
        if not result.ok:
            _error(lines[0][len("fleet apply: "):] if lines[0].startswith("fleet apply: ") else lines[0])
    return 0 if result.ok else 1


def _cmd_fleet_status(args: argparse.Namespace) -> int:
    import json

    from . import fleet

    source = _fleet_source(args)
    st = fleet.run_async(fleet.status(source))
    print(json.dumps(st, indent=2) if args.json else fleet.format_status(st))
    return 0


def _cmd_fleet_serve(args: argparse.Namespace) -> int:
    from . import fleetapi

    source = _fleet_source(args)
    return fleetapi.run(source, args.listen, args.token_file, deadline=args.deadline, tls_cert=args.tls_cert,
                        tls_key=args.tls_key)


# -- run and check -------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    if args.upgrade_fd is not None:
        return _run_upgrade(args)
    from .config import default_config_text

    if args.print_default:
        sys.stdout.write(default_config_text())
        return 0
    config = _run_config(args)   # a bad file: one line, exit 1, nothing started
    if config.runtime.config_source is None and not config.services and not args.allow_empty:
        from .config import no_services_error

        raise no_services_error(config.source, "hotproxy run --allow-empty")
    import asyncio

    import uvloop

    from .master import Master, setup_logging

    setup_logging(config.runtime.log_level, config.runtime.log_format)
    if args.config is None:
        print(f"{PROG}: no -c FILE given: serving the embedded default config:\n", file=sys.stderr)
        for line in default_config_text().splitlines():
            print(f"    {line}", file=sys.stderr)
        print(file=sys.stderr)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Master(config, etcd=args.etcd).run())


def _run_config(args: argparse.Namespace) -> Config:
    """The config ``run`` starts with: the file (``--etcd``: in a fleet), checked.

    A fleet instance's file holds only ``[runtime]``: its ``config_source``
    must parse, the etcd client library must be there, and no service may be
    in the file."""
    from .config import load_config

    if args.config is None and args.etcd is not None:
        from .config import parse_config

        config = parse_config("", None)   # a fleet instance with every runtime default
    else:
        config = load_config(args.config)
    import dataclasses

    if args.etcd is not None:
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, config_source=args.etcd))
    given = {key: os.path.abspath(path) for key, path in
             (("etcd_ca", args.etcd_ca), ("etcd_cert", args.etcd_cert), ("etcd_key", args.etcd_key)) if path}
    if given:
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, **given))
    if config.runtime.config_source is not None or given:
        from . import fleet

        if config.runtime.config_source is None:
            from .errors import ConfigError

            raise ConfigError(f"{next(o for o, k in ETCD_TLS_OPTIONS if k in given)}: only for a fleet instance "
                              "(runtime.config_source or --etcd)")
        source = fleet.parse_source(config.runtime.config_source, f"{config.source}: runtime.config_source"
                                    if args.etcd is None else "--etcd")
        fleet.client_module()
        rt = config.runtime
        fleet.with_tls(source, rt.etcd_ca, rt.etcd_cert, rt.etcd_key, names=tuple(
            opt if key in given else f"{config.source}: runtime.{key}" for opt, key in ETCD_TLS_OPTIONS))
        if config.services:
            from .errors import ConfigError

            raise ConfigError(f"{config.source}: services: not allowed with runtime.config_source (the "
                                "services come from etcd: hotproxy fleet apply; this file holds [runtime])")
    return config


def _run_upgrade(args: argparse.Namespace) -> int:
    """``run --upgrade-fd N``: the new master of an upgrade.

    Whatever stops it before it serves -- the new code does not import, the
    file is bad -- is told to the old master on the channel, in one line,
    before this process exits 1 (the old master serves on and reports it).
    """
    fd = int(args.upgrade_fd)
    # (one clock for every process of the machine: the old master reports where the time went)
    entered = time.monotonic()
    try:
        from . import upgrade

        if upgrade.test_failure("import"):
            raise ImportError(f"{upgrade.TEST_FAILURE_ENV}=import: the new code does not import")
        config = _run_config(args)
        if not config.services and config.runtime.config_source is None:
            from .config import no_services_error

            # (a fleet instance's services come with the hello: the revision the old master runs)
            raise no_services_error(config.source, "an upgrade never empties hotproxy")
        import asyncio

        import uvloop

        from .master import Master, setup_logging

        link = upgrade.Link(fd, {"main": entered, "loaded": time.monotonic()})
    except Exception as exc:
        from .upgrade import report_failure

        line = describe(exc) if isinstance(exc, (HotproxyError, OSError)) else f"cannot start: " \
            f"{describe(exc, typed=True)}"
        report_failure(fd, line)
        _error(f"upgrade: {line}")
        return 1
    setup_logging(config.runtime.log_level, config.runtime.log_format)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(Master(config, link=link, etcd=args.etcd).run())
    except Exception as exc:
        link.failed(f"the new master crashed: {describe(exc, typed=True)}")
        raise


def _cmd_upgrade(args: argparse.Namespace) -> int:
    from .adminclient import AdminTimeout

    timeout = args.timeout or 300.0
    with _connect(args, timeout) as conn:
        try:
            reply = conn.request("upgrade", timeout)
        except AdminTimeout:
            _error(f"no answer to 'upgrade' within {timeout:g}s: it may still be running; its outcome will be "
                   "in the log and in `hotproxy status` (last upgrade)")
            return 1
    result = reply.get("upgrade")
    if not isinstance(result, dict):
        _error(str(reply.get("error") or "the running hotproxy did not upgrade"))
        return 1
    if args.json:
        import json

        print(json.dumps(result, indent=2))
        return 0 if result.get("ok") else 1
    from .report import upgrade_line

    line = upgrade_line(result)
    print(line, file=sys.stdout if result.get("ok") else sys.stderr)
    return 0 if result.get("ok") else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import check_on_this_host, describe_options, load_config, no_services_error

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
    notes on what that means for the bind probe."""
    from .adminclient import AdminConnection, AdminError

    path = config.runtime.admin_socket
    try:
        with AdminConnection(path) as conn:
            reply = conn.request("status", 10.0)
        status = reply["status"] if reply.get("ok") else None
        if not isinstance(status, dict):
            raise AdminError(str(reply.get("error") or "not a status reply"))
    except AdminError as exc:
        if str(exc).startswith(_NOT_RUNNING):
            return [], None, [f"no hotproxy answers on {path}: every listen address was probed"]
        return [], None, [f"the hotproxy on {path} did not answer ({describe(exc)}): "
                          "addresses it holds count as taken"]
    if status.get("config") != config.source:
        return [], None, [f"the hotproxy on {path} runs {status.get('config')}, not this file: "
                          "addresses it holds count as taken"]
    held = [str(s["listen"]) for s in status.get("services") or ()]
    pid = status.get("pid") if isinstance(status.get("pid"), int) else None
    return held, pid, [f"{len(held)} listen address{'' if len(held) == 1 else 'es'} held by the running "
                       f"hotproxy of this file (pid {pid}) counted as free: a reload keeps or moves them"]


# -- talking to a running instance ----------------------------------------------


def _socket(args: argparse.Namespace) -> str:
    from .paths import admin_socket_for

    return str(args.socket) if args.socket else admin_socket_for(args.config)


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
    from .paths import admin_socket_for, default_admin_socket

    sock = admin_socket_for(args.config)
    if args.config is None:
        where = "derived for the embedded default config (no -c)"
    elif sock == default_admin_socket(os.path.abspath(args.config)):
        where = f"derived from the path of {os.path.abspath(args.config)}"
    else:
        where = f"runtime.admin_socket in {os.path.abspath(args.config)}"
    if args.command == "reload":
        from .config import load_config, no_services_error
        from .errors import ConfigError

        try:
            config = load_config(args.config)
            if not config.services and not args.allow_empty:
                raise no_services_error(config.source, "hotproxy reload --allow-empty")
        except ConfigError as exc:
            return f"{exc} (and no hotproxy answers on {sock}, {where})"
    return f"{message}; that socket is {where}: give -c with the file hotproxy was started with, or --socket PATH"


def _connect(args: argparse.Namespace, timeout: float) -> AdminConnection:
    from .adminclient import AdminConnection

    conn = AdminConnection(_socket(args))
    conn.connect(timeout)
    return conn


def _cmd_reload(args: argparse.Namespace) -> int:
    from .adminclient import AdminTimeout

    timeout = args.timeout or 120.0
    fields = {"allow_empty": True} if args.allow_empty else {}
    with _connect(args, timeout) as conn:
        try:
            reply = conn.request("reload", timeout, **fields)
        except AdminTimeout:
            # Not "failed": the master bounds every phase (reload_timeout) and
            # will report the outcome; this process only stopped waiting.
            _error(f"no answer to 'reload' within {timeout:g}s: the reload may still be running; "
                   "its outcome will be in the log and in `hotproxy status` (last reload)")
            return 1
    if "report" not in reply:
        _error(reply.get("error", "the running hotproxy did not reload"))
        return 1
    if args.json:
        import json

        print(json.dumps(reply["report"], indent=2))
        return 0 if reply.get("ok") else 1
    report = reply["report"]
    ok = bool(report.get("ok"))
    print(format_report(report), file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def format_report(report: ReloadReport | dict[str, Any]) -> str:
    """A reload report for people: the one-line summary, then the details.

    *report* is what the admin socket sends (``ReloadReport.to_dict()``),
    or a ``ReloadReport``.
    """
    from .report import failure_line, summary_line

    r = report if isinstance(report, dict) else report.to_dict()
    ok = bool(r.get("ok"))
    added, changed, removed = r.get("added") or [], r.get("changed") or [], r.get("removed") or []
    lines = [summary_line(r)]
    if ok or added or changed or removed:
        moved = set(r.get("moved") or ())
        verb = "" if ok else " (not applied)"
        lines += [f"  added{verb}:     {', '.join(added) or '-'}",
                  f"  changed{verb}:   {', '.join(f'{n} (moved)' if n in moved else n for n in changed) or '-'}",
                  f"  removed{verb}:   {', '.join(removed) or '-'}",
                  f"  unchanged: {', '.join(r.get('unchanged') or ()) or '-'}"]
    failures = r.get("failures") or ()
    for failure in failures:
        if len(failures) == 1 and failure.get("phase") == "config" and failure.get("error") == r.get("error"):
            continue   # the summary says it already: a bad file is one line
        lines.append(f"  failure: {failure_line(failure)}")
    for note in r.get("notes") or ():
        lines.append(f"  note: {note}")
    if ok:
        lines.append(f"  timings: prepare {r.get('prepare_ms') or 0.0:.1f} ms, "
                     f"commit {r.get('commit_ms') or 0.0:.1f} ms, total {r.get('duration_ms') or 0.0:.1f} ms")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    timeout = args.timeout or 120.0
    fields: dict[str, Any] = {}
    if args.services:
        fields["services"] = list(args.services)
    elif not (args.all or args.json):
        fields["summary"] = True
    with _connect(args, timeout) as conn:
        reply = conn.request("status", timeout, **fields)
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
        totals = " ".join(f"{k}={_num(v)}" for k, v in sorted(s["totals"].items())
                          if not isinstance(v, dict)) or "-"   # histograms: --json and /metrics
        if s.get("old_versions"):
            totals += f" old_versions={s['old_versions']}"
        changed = _when(s["changed_at"]) + (f" (#{s['changed_by_reload']})" if s.get("changed_by_reload") else "")
        rows.append((s["name"], s["kind"], s["listen"], gen, str(s["active"]), totals, changed))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    # each proxy's upstreams: health over the workers, and the sums
    for s in status["services"]:
        for addr, up in (s.get("upstreams") or {}).items():
            ejected = up.get("ejected_workers") or []
            state = (f"ejected on worker {', '.join(map(str, ejected))} for {up.get('ejected_for', 0):.1f}s more"
                     if ejected else "up")
            checked = up.get("health")
            if checked is not None:
                # active checks: the instance's shared state decides
                state = (f"{checked['state']} since {_when(checked['changed_at'])} (health check: "
                         f"{checked['successes']} passed, {checked['failures']} failed in a row; last: "
                         f"{checked['last_result'] or 'none yet'})")
            opts = "".join([f" weight={up['weight']}" if up.get("weight", 1) != 1 else "",
                            " backup" if up.get("backup") else "",
                            f" max_connections={up['max_connections']}" if up.get("max_connections") else ""])
            lines.append(f"  {s['name']} -> {addr}: {state}; active={up['active']} connections={up['connections']} "
                         f"failures={up['failures']}{opts}" + (" (removed, draining)" if up.get("removed") else ""))
    # each proxy's SNI routes, in the order a server name is matched, and what they refused
    for s in status["services"]:
        routes = s.get("sni_routes")
        if routes is None:
            continue
        for route in routes:
            ups = ", ".join(f"{addr} {u['state']}" + (" (backup)" if u.get("backup") else "")
                            for addr, u in route["upstreams"].items())
            what = "default" if route["match"] == "default" else route["name"]
            lines.append(f"  {s['name']} sni {what} -> " + (f"{ups}; connections={route['connections']}" if ups
                                                             else "none: closed"))
        t = s.get("totals") or {}
        lines.append(f"  {s['name']} sni refused: sni_no_route={_num(t.get('sni_no_route', 0))} "
                     f"sni_errors={_num(t.get('sni_errors', 0))}")
    # old versions that open connections still hold (freed with their last one)
    for s in status["services"]:
        if s.get("old_versions"):
            current = str(s.get("generation"))
            olds = [f"gen {g} ({n} conn{'' if n == 1 else 's'})"
                    for g, n in (s.get("versions") or {}).items() if g != current]
            lines.append(f"  {s['name']}: {s['old_versions']} old version{'' if s['old_versions'] == 1 else 's'}"
                         + (f": {', '.join(olds)}" if olds else ""))
    summary = status.get("summary")
    if summary:
        kinds = ", ".join(f"{n:,} {k}" for k, n in sorted(summary.get("kinds", {}).items()))
        lines = [f"{summary['services']:,} services ({kinds}): {summary.get('active', 0):,} active connections"
                 + (f", {summary['staged']} staged" if summary.get("staged") else "")
                 + "; `hotproxy status SERVICE...` for some, `--all` for the whole table"]
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
        from .report import summary_line

        lines.append(f"last reload #{last.get('seq')} ({last.get('trigger')}) at {_when(last.get('at'))}: "
                     f"{last.get('line') or summary_line(last)}")
    if status.get("reloading"):
        queued = status.get("reload_queued") or 0
        lines.append("a reload is running" + (f" ({queued} request{'' if queued == 1 else 's'} queued behind it)"
                                              if queued else ""))
    fleet = status.get("fleet")
    if fleet:
        lines.append(f"fleet {fleet['source']} as {fleet['id']}: revision {fleet['applied'] or 'none'} applied, "
                     f"{fleet['outcome']}" + ("" if fleet.get("connected") else "; etcd not reached (retrying)"))
    if status.get("upgraded_from"):
        lines.append(f"upgraded from pid {status['upgraded_from']}")
    for old in status.get("old_masters") or ():
        left = old.get("connections")
        lines.append(f"old master pid {old['pid']} draining since {_when(old.get('since'))}: "
                     + (f"{left} connection{'' if left == 1 else 's'} left" if old.get("answering")
                        else "not answering"))
    if status.get("upgrading"):
        lines.append(f"an upgrade is running: new master pid {status['upgrading'].get('pid')}")
    last_upgrade = status.get("last_upgrade")
    if last_upgrade:
        from .report import upgrade_line

        lines.append(f"last upgrade ({last_upgrade.get('trigger')}) at {_when(last_upgrade.get('at'))}: "
                     f"{upgrade_line(last_upgrade)}")
    if status.get("handed_over_to"):
        lines.append(f"handed over to pid {status['handed_over_to']}: draining")
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
    from .adminclient import AdminTimeout

    timeout = args.timeout or 600.0
    with _connect(args, 30.0) as conn:
        reply = conn.request("stop", 30.0, graceful=not args.fast)
        if not reply.get("ok"):
            _error(reply.get("error", "the running hotproxy refused to stop"))
            return 1
        pid = reply.get("pid")
        if args.no_wait:
            print(f"stopping hotproxy (pid {pid})")
            return 0
        # the master answers "stopped" (or just hangs up) once its workers are gone
        try:
            conn.read(timeout)
        except AdminTimeout:
            _error(f"hotproxy (pid {pid}) is still stopping after {timeout:g}s")
            return 1
    print(f"stopped hotproxy (pid {pid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
