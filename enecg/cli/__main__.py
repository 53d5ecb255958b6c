"""``python -m enecg.cli``: the ``enecg`` command."""

import sys

from enecg.cli import main

sys.exit(main())
