"""``python -m pkmem``: the ``pkmem`` command."""

import sys

from pkmem.cli import main

if __name__ == "__main__":
    sys.exit(main())
