"""``python -m hf_copilot`` runs the ``hf-copilot`` command line."""

import sys

from .cli import main

sys.exit(main())
