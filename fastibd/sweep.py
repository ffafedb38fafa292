"""`python -m fastibd.sweep`: runs over a grid of settings (fastibd.train.sweep)."""

import sys

from fastibd.train.sweep import main

if __name__ == "__main__":
    sys.exit(main())
