"""tfdpprune: differentially private training with neural-network pruning.

DP-SGD that clips and noises only the parameters being trained (parameter
freezing / pre-pruning and parameter selection / gradient dropping, Adamczewski
& Park 2023), on TensorFlow with Keras 3 or Keras 2 (`tf_keras`) and TF
Privacy.

```python
import keras                                   # Keras 3, TensorFlow backend
import tfdpprune as tdp
private = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.1,
                           expected_batch_size=256)
private.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))

keras2 = tdp.keras                             # tf_keras (Keras 2)
opt = tdp.MaskedDPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1,
                                    learning_rate=0.1, momentum=0.9,
                                    expected_batch_size=256)  # Poisson B
```

Importing tfdpprune changes nothing global: `tf.keras` stays what the user's
environment makes it. Entry points take models of either Keras and dispatch
on the model's (`tfdpprune.frontends`).
"""

from tfdpprune._compat import keras
from tfdpprune import accounting
from tfdpprune import masks
from tfdpprune.callbacks import PrivacyCallback
from tfdpprune.config import PruneConfig
from tfdpprune.optimizer import MaskedDPKerasAdamOptimizer
from tfdpprune.optimizer import MaskedDPKerasSGDOptimizer
from tfdpprune.private_training import make_private
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
    "PruneWrapper", "strip", "validate", "make_private",
    "make_private_with_epsilon",
    "poisson_dataset",
]
__version__ = "0.1.0"


def _register_front_ends():
  """Imports both front ends (their classes are registered for `.keras`
  files, so a model saved with tfdpprune loads after `import tfdpprune`);
  Keras 3 only on the TensorFlow backend (on another, its entry points are
  refused with the fix)."""
  from tfdpprune import frontends  # pylint: disable=g-import-not-at-top
  frontends.keras2()
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if keras.backend.backend() == "tensorflow":
    frontends.keras3()


_register_front_ends()
