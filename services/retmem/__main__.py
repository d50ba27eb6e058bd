"""`python -m memlong.services.retmem serve --port 0 --data-dir D` (same as `memlong retmem serve`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["retmem", *sys.argv[1:]]))
