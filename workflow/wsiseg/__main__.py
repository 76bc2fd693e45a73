"""Allow ``python -m wsiseg <stage> ...``."""

import sys

from wsiseg.cli import main

sys.exit(main())
