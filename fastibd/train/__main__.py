import sys

from fastibd.train.cli import main

sys.exit(main())
