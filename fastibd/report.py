"""`python -m fastibd.report`: the command of fastibd.eval.report."""

import sys

from fastibd.eval.report import main

if __name__ == "__main__":
    sys.exit(main())
