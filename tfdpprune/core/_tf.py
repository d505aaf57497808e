"""TensorFlow and TF Privacy's Keras-free analysis, imported quietly.

The core imports no Keras. TF Privacy's top-level package imports the removed
estimator API on TF >= 2.16; its own escape hatch `sys.skip_tf_privacy_import`
lets us import its modules by full path instead (setting it is the one thing
importing tfdpprune does to the process).
"""

import contextlib
import os
import sys

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
  from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib  # pylint: disable=g-import-not-at-top


def in_xla_context() -> bool:
  """Whether the graph being traced will be compiled by XLA (a
  `jit_compile=True` function, or inside one): some ops that are fast in
  TensorFlow's own kernels are rewritten badly by XLA on CPU."""
  from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
  if tf.executing_eagerly():
    return False
  return bool(control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph()))


__all__ = ["tf", "quiet_native_stderr", "TF_LOGS_ENV",
           "compute_dp_sgd_privacy_lib", "in_xla_context"]
