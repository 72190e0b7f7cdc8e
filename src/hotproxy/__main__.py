"""``python -m hotproxy``: the ``hotproxy`` command (see ``hotproxy.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
