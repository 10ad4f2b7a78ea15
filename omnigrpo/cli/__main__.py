"""``python -m omnigrpo.cli``: the ``omnigrpo`` command (how submitted jobs and benchmark sides start a run)."""

import sys

from omnigrpo.cli import main

sys.exit(main())
