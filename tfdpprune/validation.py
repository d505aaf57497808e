"""The public name of `tfdpprune.core.validation` (the same module object)."""

import sys

from tfdpprune.core import validation as _module

sys.modules[__name__] = _module
