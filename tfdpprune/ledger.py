"""The public name of `tfdpprune.core.ledger` (the same module object)."""

import sys

from tfdpprune.core import ledger as _module

sys.modules[__name__] = _module
