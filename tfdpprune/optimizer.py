"""The public name of `tfdpprune.keras2.optimizer` (the same module object)."""

import sys

from tfdpprune.keras2 import optimizer as _module

sys.modules[__name__] = _module
