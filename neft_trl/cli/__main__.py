"""``python -m neft_trl.cli``: the same command as the ``neft-trl`` script."""

import sys

from .command import main

sys.exit(main())
