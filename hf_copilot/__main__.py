"""``python -m hf_copilot`` runs the ``hf-copilot`` command line."""

import sys

from .recipes.cli import main

sys.exit(main())
