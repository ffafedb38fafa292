"""`python -m fastibd.export`: the command of fastibd.eval.export."""

import sys

from fastibd.eval.export import main

if __name__ == "__main__":
    sys.exit(main())
