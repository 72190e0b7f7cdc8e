"""How hotproxy's processes log: one handler on stderr, as text or as JSON lines.

``runtime.log_format = "text"`` (the default) writes
``2026-12-01 22:35:01,123 worker[0] INFO hotproxy.access: ...``;
``"json"`` writes one JSON object per line, for journald, Loki or ELK::

    {"ts": "2026-12-01T22:35:01.123Z", "level": "info", "logger": "hotproxy.access",
     "msg": "...", "process": "worker[0]", "pid": 4242, "service": "web", ...}

A line about a service carries its fields (``service``, ``generation``,
``client``, ``upstream``, ``bytes_in`` ...) as ``extra=`` of the logging
call; the text format keeps them in its message, the JSON format puts them
in keys of their own.  ``configure`` may be called again (a reload changes
``log_level`` or ``log_format``): it replaces its own handler, never one an
embedding program installed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: the formats ``runtime.log_format`` accepts
FORMATS = ("text", "json")

#: ``extra=`` keys a JSON line carries (anything else a caller adds is left out)
FIELDS = ("service", "generation", "worker", "client", "upstream", "bytes_in", "bytes_out", "connect_time",
          "duration", "end", "reason", "phase", "attempt", "server_name")

_state = {"level": "info", "format": "text"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, the process, and FIELDS."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "process": self.role,
            "pid": record.process,
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours: the one ``configure`` replaces."""


def configure(level: str, fmt: str = "text", role: str = "master") -> None:
    """Log at *level* in *fmt* on stderr, tagged with *role* (``master``, ``worker[0]``)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(handler)
    handler = _Handler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("hotproxy").setLevel(level.upper())
    _state.update(level=level, format=fmt)


def current() -> tuple[str, str]:
    """(level, format) as last configured in this process (what a new worker is started with)."""
    return _state["level"], _state["format"]


def worker_role(worker_id: int) -> str:
    return f"worker[{worker_id}]"


__all__ = ["FIELDS", "FORMATS", "JsonFormatter", "configure", "current", "worker_role"]
