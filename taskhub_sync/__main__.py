"""``python -m taskhub_sync`` is ``taskhub-sync``."""

import sys

from .cli import main

sys.exit(main())
