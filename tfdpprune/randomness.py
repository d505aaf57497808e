"""The public name of `tfdpprune.core.randomness` (the same module object)."""

import sys

from tfdpprune.core import randomness as _module

sys.modules[__name__] = _module
