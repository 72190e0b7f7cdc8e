"""The private master <-> worker control channel.

Length-prefixed pickles over a Unix socketpair that only the master and
one of its own workers hold.  Pickle is acceptable *only* here: both ends
are the same program, started by the same user, and nothing outside the
pair can write to it.  (The admin socket speaks JSON; see admin.py.)
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

#: a worker's exit code when it could not start: the master backs off
#: instead of restarting it in a tight loop
EXIT_BOOT_FAILURE = 3

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024 * 1024


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message; raises ``asyncio.IncompleteReadError`` at EOF."""
    header = await reader.readexactly(_HEADER.size)
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"control message of {size} bytes is too large")
    return pickle.loads(await reader.readexactly(size))


def write_message(writer: asyncio.StreamWriter, message: Any) -> None:
    """Queue *message* on *writer* (callers drain when they need to)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(data)) + data)
