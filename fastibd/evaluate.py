"""`python -m fastibd.evaluate`: the command of fastibd.eval.evaluate."""

import sys

from fastibd.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
