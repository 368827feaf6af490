"""``python -m gateway``: the same commands as ``impersonation-gateway``."""

import sys

from .cli import main

sys.exit(main())
