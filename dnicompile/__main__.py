"""`python -m dnicompile ...` (also what torchrun runs)."""

import sys

from .cli import main

sys.exit(main())
