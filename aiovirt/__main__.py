"""``python -m aiovirt``: the ``aiovirt`` command."""

import sys

from aiovirt.cli import main

sys.exit(main())
