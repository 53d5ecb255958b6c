"""The module ``accelerate launch -m enecg.train --config RECIPE.yaml`` runs (one process per device).

Everything lives in :mod:`enecg.cli.train` (``enecg train``); this name is kept short for the launch command.
"""

import sys

from enecg.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
