"""`python -m fastibd.bench_step`: the command of fastibd.bench.step."""

import sys

from fastibd.bench.step import main

if __name__ == "__main__":
    sys.exit(main())
