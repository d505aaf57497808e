"""tfdpprune: differentially private training with neural-network pruning.

DP-SGD that clips and noises only the parameters being trained (parameter
freezing / pre-pruning and parameter selection / gradient dropping, Adamczewski
& Park 2023), on TensorFlow / Keras 2 with TF Privacy.
"""

from tfdpprune._compat import keras
from tfdpprune import accounting

__all__ = ["keras", "accounting"]
__version__ = "0.1.0"
