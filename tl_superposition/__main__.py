"""``python -m tl_superposition`` is the ``tl-superposition`` command (also under ``torchrun``)."""

import sys

from tl_superposition.cli import main

sys.exit(main())
