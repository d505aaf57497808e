"""The public name of `tfdpprune.keras2.compat` (the same module object)."""

import sys

from tfdpprune.keras2 import compat as _module

sys.modules[__name__] = _module
