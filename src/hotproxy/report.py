"""The words of a reload report (and of an upgrade's outcome): the lines the master
logs and ``hotproxy reload|status|upgrade`` print.

A report is a ``reload.ReloadReport`` in the master and its ``to_dict()``
over the admin socket.  The text is made here, from that dict form (a
``ReloadReport``'s own ``vars()`` reads the same), so that the CLI prints
a report without importing the reload machinery -- or even ``dataclasses``,
which alone costs a short-lived CLI process more than half an interpreter
start.  This module imports nothing.
"""

from __future__ import annotations

#: ``typing.TYPE_CHECKING`` without importing typing (type checkers know the name)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Mapping


def upgrade_line(result: Mapping[str, Any]) -> str:
    """An upgrade's outcome (``upgrade.UpgradeResult``'s dict form) in one line."""
    old, ms = result.get("old_pid"), result.get("duration_ms") or 0.0
    if result.get("ok"):
        return f"upgrade ok: pid {old} -> pid {result.get('new_pid')} in {ms:.1f} ms; pid {old} drains its connections"
    return f"upgrade failed: {result.get('error')}; pid {old} keeps serving ({ms:.1f} ms)"


def summary_line(report: Mapping[str, Any]) -> str:
    """One log line: ``reload ok: added=[..] changed=[..] ... in 3.2 ms``, or why it failed."""
    if report.get("ok"):
        moved = f" moved={_names(report.get('moved'))}" if report.get("moved") else ""
        # requests that came while another reload ran, answered by this one
        merged = f", {report['requests']} requests" if (report.get("requests") or 1) > 1 else ""
        return (f"reload ok: added={_names(report.get('added'))} changed={_names(report.get('changed'))}{moved} "
                f"removed={_names(report.get('removed'))} unchanged={_names(report.get('unchanged'))} "
                f"in {report.get('duration_ms') or 0.0:.1f} ms (prepare {report.get('prepare_ms') or 0.0:.1f}, "
                f"commit {report.get('commit_ms') or 0.0:.1f}{merged})")
    state = "config partially applied" if report.get("partial") else "the old config keeps serving"
    failures = report.get("failures") or ()
    more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"reload failed: {report.get('error')}{more}; {state} ({report.get('duration_ms') or 0.0:.1f} ms)"


def failure_line(failure: Mapping[str, Any]) -> str:
    """``prepare (worker 1, service 'x'): error``: where, in which phase, and why."""
    where = []
    if failure.get("worker") is not None:
        where.append(f"worker {failure['worker']}")
    if failure.get("service") is not None:
        where.append(f"service {failure['service']!r}")
    phase, error = failure.get("phase"), failure.get("error")
    return f"{phase} ({', '.join(where)}): {error}" if where else f"{phase}: {error}"


#: a report line names at most this many services per list (then "+N more")
MAX_NAMES = 20


def _names(names: list[str] | None) -> str:
    names = names or []
    if len(names) > MAX_NAMES:
        # one line, not 10,000 names, for a reload of a big file
        return "[" + ",".join(names[:MAX_NAMES]) + f",... +{len(names) - MAX_NAMES} more]"
    return "[" + ",".join(names) + "]"


__all__ = ["failure_line", "summary_line"]
