"""`python -m fwlora ...` (also what torchrun and accelerate launch run with -m fwlora)."""

import sys

from fwlora.cli import main

sys.exit(main())
