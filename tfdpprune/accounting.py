"""The public name of `tfdpprune.core.accounting` (the same module object)."""

import sys

from tfdpprune.core import accounting as _module

sys.modules[__name__] = _module
