"""``python -m icd_lite``: the command line (see ``icd_lite.cli``)."""

import sys

from .cli import main

sys.exit(main())
