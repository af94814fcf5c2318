"""``python -m attnkit``: the ``attnkit`` command."""

import sys

from attnkit.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
