"""``python -m tokenmerge``: the same as the ``tokenmerge`` command."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
