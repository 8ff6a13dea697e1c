"""`python -m dmm.merge ...`: see `dmm.merge.cli`."""

import sys

from dmm.merge.cli import main

sys.exit(main())
