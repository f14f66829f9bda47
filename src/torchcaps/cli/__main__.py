"""``python -m torchcaps.cli``: the ``torchcaps`` command."""

import sys

from . import main

sys.exit(main())
