"""tfdpprune: differentially private training with neural-network pruning.

DP-SGD that clips and noises only the parameters being trained (parameter
freezing / pre-pruning and parameter selection / gradient dropping, Adamczewski
& Park 2023), on TensorFlow / Keras 2 with TF Privacy.

```python
import tfdpprune as tdp
keras = tdp.keras                      # tf_keras (Keras 2)
model = tdp.prune(model)               # fast per-example gradients, masks
opt = tdp.MaskedDPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1,
                                    learning_rate=0.1, momentum=0.9,
                                    expected_batch_size=256)  # Poisson B
```
"""

from tfdpprune._compat import keras
from tfdpprune import accounting
from tfdpprune import masks
from tfdpprune.callbacks import PrivacyCallback
from tfdpprune.config import PruneConfig
from tfdpprune.optimizer import MaskedDPKerasAdamOptimizer
from tfdpprune.optimizer import MaskedDPKerasSGDOptimizer
from tfdpprune.private_training import make_private_with_epsilon
from tfdpprune.private_training import poisson_dataset
from tfdpprune.pruning import attach_public_data
from tfdpprune.pruning import prune
from tfdpprune.pruning import PruneWrapper
from tfdpprune.pruning import strip
from tfdpprune.validation import validate

__all__ = [
    "keras", "accounting", "attach_public_data", "masks",
    "MaskedDPKerasSGDOptimizer", "MaskedDPKerasAdamOptimizer", "PruneConfig", "prune", "PrivacyCallback",
    "PruneWrapper", "strip", "validate", "make_private_with_epsilon",
    "poisson_dataset",
]
__version__ = "0.1.0"
