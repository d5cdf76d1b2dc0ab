"""``python -m mixmask``: the ``mixmask`` command."""

import sys

from mixmask.cli import main

sys.exit(main())
