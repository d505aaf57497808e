"""The one place that prepares TensorFlow, Keras 2 (`tf_keras`) and TF Privacy.

TF Privacy's Keras optimizers are Keras 2 optimizers (`optimizers.legacy`), so
tfdpprune runs on `tf_keras` with `TF_USE_LEGACY_KERAS=1`. The top-level
`tensorflow_privacy` package imports the removed estimator API on TF >= 2.16;
TF Privacy's own escape hatch `sys.skip_tf_privacy_import` lets us import its
modules by full path instead. Every other module imports `tf`, `keras` and the
TF Privacy modules from here.
"""

import contextlib
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.skip_tf_privacy_import = True  # pytype: disable=module-attr

# TensorFlow's start-up messages (oneDNN notices, CUDA probing on machines
# without a GPU) are printed by its C++ runtime before any log level applies;
# they are muted unless TFDPPRUNE_TF_LOGS=1. Python errors are not affected.
TF_LOGS_ENV = "TFDPPRUNE_TF_LOGS"


@contextlib.contextmanager
def quiet_native_stderr():
  """Mutes the process's stderr (file descriptor 2) inside the block, unless
  $TFDPPRUNE_TF_LOGS is set: for TensorFlow's native start-up logging."""
  if os.environ.get(TF_LOGS_ENV) or not hasattr(os, "dup2"):
    yield
    return
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no real stderr (e.g. some notebooks)
    yield
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


with quiet_native_stderr():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top

if not tf.keras.__name__.startswith("tf_keras"):
  raise ImportError(
      "tfdpprune needs Keras 2 (tf_keras) behind tf.keras, but Keras 3 was "
      f"already loaded as tf.keras ({tf.keras.__name__}). Fix: set the "
      "environment variable TF_USE_LEGACY_KERAS=1 before TensorFlow is "
      "imported (e.g. `export TF_USE_LEGACY_KERAS=1`), or `import tfdpprune` "
      "before touching tf.keras, and use `tfdpprune.keras` for layers and "
      "models.")

# pylint: disable=g-import-not-at-top,unused-import
with quiet_native_stderr():
  from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib
  from tensorflow_privacy.privacy.dp_query import gaussian_query
  from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras
  from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras_vectorized
# pylint: enable=g-import-not-at-top,unused-import

__all__ = [
    "tf", "keras", "quiet_native_stderr", "TF_LOGS_ENV",
    "compute_dp_sgd_privacy_lib", "gaussian_query",
    "dp_optimizer_keras", "dp_optimizer_keras_vectorized",
]
