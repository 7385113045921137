"""``python -m securechat`` runs the ``securechat`` command."""

import sys

from .cli import main

sys.exit(main())
