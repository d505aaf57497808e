"""The public name of `tfdpprune.core.samplers.recurrent` (the same module)."""

import sys

from tfdpprune.core.samplers import recurrent as _module

sys.modules[__name__] = _module
