"""The public name of `tfdpprune.core.samplers.generic` (the same module)."""

import sys

from tfdpprune.core.samplers import generic as _module

sys.modules[__name__] = _module
