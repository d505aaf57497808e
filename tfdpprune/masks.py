"""The public name of `tfdpprune.core.masks` (the same module object)."""

import sys

from tfdpprune.core import masks as _module

sys.modules[__name__] = _module
