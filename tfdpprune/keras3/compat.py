"""The one place the Keras 3 front end imports Keras 3.

Keras 3 must run on the TensorFlow backend (the core is TensorFlow); another
backend is refused with the fix. `keras.src` names used here are pinned by
`requirements.txt` (Keras 3.15): `Functional` (which models are graphs of
layers) and the TensorFlow backend's `rnn` loop (the exact semantics of Keras
3's own recurrent layers, used by the recurrent sampler).
"""

# pylint: disable=g-import-not-at-top
from tfdpprune.core._tf import quiet_native_stderr
from tfdpprune.core._tf import tf

with quiet_native_stderr():
  import keras
  from keras.src.backend.tensorflow.rnn import rnn
  from keras.src.models import functional as _functional
# pylint: enable=g-import-not-at-top

if keras.backend.backend() != "tensorflow":
  raise ImportError(
      f"tfdpprune's Keras 3 front end runs on the TensorFlow backend, but "
      f"Keras uses {keras.backend.backend()!r}. Fix: set the environment "
      "variable KERAS_BACKEND=tensorflow before Keras is imported.")

Functional = _functional.Functional

__all__ = ["tf", "keras", "Functional", "rnn"]
