"""The public name of `tfdpprune.core.samplers.attention` (the same module)."""

import sys

from tfdpprune.core.samplers import attention as _module

sys.modules[__name__] = _module
