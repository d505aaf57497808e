"""The public name of `tfdpprune.keras2.dp_gradients` (the same module object)."""

import sys

from tfdpprune.keras2 import dp_gradients as _module

sys.modules[__name__] = _module
