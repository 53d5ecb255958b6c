"""The module ``accelerate launch -m enecg.embed DATASET --experts ...`` runs (one process per device).

Everything lives in :mod:`enecg.cli.embed` (``enecg embed``); this name is kept short for the launch command.
"""

import sys

from enecg.cli.embed import main

if __name__ == "__main__":
    sys.exit(main())
