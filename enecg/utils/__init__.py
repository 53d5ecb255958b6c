"""Small helpers every layer may use (the bottom layer: imports nothing else from enecg).

* :mod:`enecg.utils.files`: atomic file writes (readers see the old file or the new one, never half of one).
* :mod:`enecg.utils.registry`: name -> class registries (expert families, gates, task types, strategies).
* :mod:`enecg.utils.version`: the package version.
"""

from enecg.utils.files import write_bytes_atomic, write_text_atomic
from enecg.utils.registry import Registry
from enecg.utils.version import __version__

__all__ = ["Registry", "__version__", "write_bytes_atomic", "write_text_atomic"]
