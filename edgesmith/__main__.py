"""`python -m edgesmith ...` is the `edgesmith` command (what torchrun ranks and GUI jobs run)."""

import sys

from edgesmith.cli import main

sys.exit(main())
