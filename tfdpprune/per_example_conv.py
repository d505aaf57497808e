"""The public name of `tfdpprune.core.samplers.conv` (the same module)."""

import sys

from tfdpprune.core.samplers import conv as _module

sys.modules[__name__] = _module
