"""`python -m fastibd.inspect_data`: the command of fastibd.data.inspect."""

import sys

from fastibd.data.inspect import main

if __name__ == "__main__":
    sys.exit(main())
