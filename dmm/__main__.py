"""`python -m dmm`: the command line of `dmm.cli`."""

import sys

from dmm.cli import main

sys.exit(main())
