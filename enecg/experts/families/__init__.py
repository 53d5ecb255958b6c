"""Built-in expert families; importing this package registers them."""

import importlib

# One module per family. A module that fails to import is a bug, so errors propagate.
for _module in ("net1d", "hubert_ecg", "ecg_fm", "moment", "mantis", "light"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as exc:  # a family not written yet (only that module itself may be missing)
        if exc.name != f"{__name__}.{_module}":
            raise
