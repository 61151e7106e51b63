"""python -m fastmmap: the command-line tool (see fastmmap._cli)."""

import sys

from fastmmap._cli import main

if __name__ == "__main__":
    sys.exit(main())
