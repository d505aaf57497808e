"""The one place the Keras 2 front end imports Keras 2 (`tf_keras`) and TF
Privacy's Keras optimizers.

TF Privacy's Keras optimizers are Keras 2 `optimizers.legacy` classes; its
`make_keras_generic_optimizer_class` is applied to `tf_keras`'s own classes,
so they work whatever `tf.keras` is. Importing this module changes nothing
global: `TF_USE_LEGACY_KERAS` is not set, so `tf.keras` stays whatever the
user's environment makes it (Keras 3 by default).
"""

# pylint: disable=g-import-not-at-top,unused-import
from tfdpprune.core._tf import compute_dp_sgd_privacy_lib
from tfdpprune.core._tf import quiet_native_stderr
from tfdpprune.core._tf import tf
from tfdpprune.core._tf import TF_LOGS_ENV

with quiet_native_stderr():
  import tf_keras as keras
  from tensorflow_privacy.privacy.dp_query import gaussian_query
  from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras
# pylint: enable=g-import-not-at-top,unused-import

# TF Privacy's generic DP optimizers and its `DPKerasSGDOptimizer`, made from
# `tf_keras`'s legacy classes (TF Privacy's module-level ones are made from
# whatever `tf.keras` is, Keras 3's stand-ins by default).
GenericDPSGDOptimizer = dp_optimizer_keras.make_keras_generic_optimizer_class(
    keras.optimizers.legacy.SGD)
GenericDPAdamOptimizer = dp_optimizer_keras.make_keras_generic_optimizer_class(
    keras.optimizers.legacy.Adam)
DPKerasSGDOptimizer = dp_optimizer_keras.make_gaussian_query_optimizer_class(
    GenericDPSGDOptimizer)

__all__ = [
    "tf", "keras", "quiet_native_stderr", "TF_LOGS_ENV",
    "compute_dp_sgd_privacy_lib", "gaussian_query", "dp_optimizer_keras",
    "GenericDPSGDOptimizer", "GenericDPAdamOptimizer", "DPKerasSGDOptimizer",
]
