"""Where a running instance is found: its admin socket, and paths relative to its config file.

Split from ``config`` so that ``hotproxy reload|status|stop`` can find the
running instance without importing the config loader (and through it the
services, asyncio and the core): this module imports nothing but ``os``
at import time; ``hashlib``, ``tempfile`` and ``tomllib`` only when a call
needs them.  ``config`` re-exports every name here.
"""

from __future__ import annotations

import os
import stat

#: what error messages call the embedded default config
DEFAULT_SOURCE = "<embedded default>"

#: a config file larger than this is refused (a real one is a few KiB)
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def default_admin_socket(path: str | None) -> str:
    """The admin socket of an instance started with config *path*, when the
    file does not set one: per user and per config file, so two instances
    with different files never meet, and ``hotproxy reload -c FILE`` finds
    the one started with ``-c FILE``."""
    import hashlib

    key = os.path.abspath(path) if path else DEFAULT_SOURCE
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isabs(runtime_dir) and os.path.isdir(runtime_dir):
        return os.path.join(runtime_dir, f"hotproxy-{digest}.sock")
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"hotproxy-{os.getuid()}", f"{digest}.sock")


def admin_socket_for(path: str | None) -> str:
    """The admin socket to reach the instance started with *path*, even if the
    file is now broken (a reload of a broken file must still be able to ask
    the running instance, to be told it is broken)."""
    if path is None:
        return default_admin_socket(None)
    apath = os.path.abspath(path)
    try:
        fd = os.open(apath, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return default_admin_socket(apath)
            # at most what load_config reads: a huge file is still searched
            raw = os.read(fd, MAX_CONFIG_BYTES).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError:
        return default_admin_socket(apath)
    found, plain = _plain_admin_socket(raw)
    value = plain if found else _toml_admin_socket(raw)
    if isinstance(value, str) and value:
        return relative_to(value, apath)
    return default_admin_socket(apath)


def _toml_admin_socket(raw: str) -> object:
    """``runtime.admin_socket`` by the TOML parser; on a broken file, the first
    plain ``admin_socket = "..."`` line (best effort)."""
    import re
    import tomllib

    try:
        runtime = tomllib.loads(raw).get("runtime")
    except (ValueError, RecursionError):
        # TOMLDecodeError (a ValueError), an integer beyond Python's digit
        # limit (ValueError), arrays nested past the parser's stack
        m = re.search(r'^\s*admin_socket\s*=\s*["\']([^"\']+)["\']', raw, re.M)
        return m.group(1) if m else None
    return runtime.get("admin_socket") if isinstance(runtime, dict) else None


def _plain_admin_socket(raw: str) -> tuple[bool, str | None]:
    """``(True, runtime.admin_socket or None)`` read without the TOML parser
    from a file written plainly, else ``(False, None)``: then ask tomllib.

    The TOML parser (and the ``typing`` and ``datetime`` it imports) costs
    ``hotproxy reload -c FILE`` more than half an interpreter start, to find
    one string.  This reads it only where no TOML construct can hide or fake
    it: no multi-line strings, no \\u escapes (a key could spell
    ``admin_socket`` with them), only plain ``[a.b]`` table headers, and
    ``admin_socket`` mentioned only as ``admin_socket = "..."`` (or
    ``'...'``, without backslashes) under ``[runtime]``.  Anything else --
    quoted keys, dotted keys, inline tables, a second entry, the word in
    another value -- and it says it is unsure.
    """
    import re

    if '"""' in raw or "'''" in raw or "\\u" in raw or "\\U" in raw:
        return False, None
    table = ""
    value: str | None = None
    for line in raw.split("\n"):     # not splitlines(): U+2028 may sit inside a string
        text = line.strip(" \t\r")
        if text.startswith("["):
            m = re.fullmatch(r"\[[ \t]*([A-Za-z0-9_-]+(?:[ \t]*\.[ \t]*[A-Za-z0-9_-]+)*)[ \t]*\][ \t]*(?:#.*)?", text)
            if m is None:
                return False, None         # [[array]], a quoted header, or an array's line
            table = m.group(1).replace(" ", "").replace("\t", "")
            continue
        if "admin_socket" not in text or text.startswith("#"):
            continue
        m = re.fullmatch(r"""admin_socket[ \t]*=[ \t]*(?:"([^"\\]*)"|'([^']*)')[ \t]*(?:#.*)?""", text)
        if m is None or table != "runtime" or value is not None:
            return False, None
        value = m.group(1) if m.group(1) is not None else m.group(2)
    return True, value


def relative_to(value: str, config_path: str | None) -> str:
    """*value* (``~`` expanded) as an absolute path; a relative one is taken
    relative to the directory of the config file at *config_path*."""
    value = os.path.expanduser(value)
    if os.path.isabs(value) or config_path is None:
        return os.path.abspath(value)
    return os.path.normpath(os.path.join(os.path.dirname(config_path), value))


__all__ = ["DEFAULT_SOURCE", "MAX_CONFIG_BYTES", "admin_socket_for", "default_admin_socket", "relative_to"]
