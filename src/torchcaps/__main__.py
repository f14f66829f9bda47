"""``python -m torchcaps``: the ``torchcaps`` command (also what ``torchrun -m torchcaps`` runs)."""

import sys

from .cli import main

sys.exit(main())
