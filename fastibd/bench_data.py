"""`python -m fastibd.bench_data`: the command of fastibd.bench.data."""

import sys

from fastibd.bench.data import main

if __name__ == "__main__":
    sys.exit(main())
