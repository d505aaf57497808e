"""Variables of either Keras, as the core sees them.

A `tf_keras` variable is a `tf.Variable`; a Keras 3 variable (TensorFlow
backend) wraps one in `.value`, has no `.ref()` and is not hashable (its
`__eq__` is elementwise). The core keys every variable by the reference of
its underlying `tf.Variable`, so both kinds key alike, tied uses of one
variable share a key, and gradients (which flow through the `tf.Variable`)
match their variables.
"""

from tfdpprune.core._tf import tf


def underlying(var) -> tf.Variable:
  """The `tf.Variable` behind `var` (itself for a `tf.Variable`)."""
  if isinstance(var, tf.Variable):
    return var
  inner = getattr(var, "value", None)
  if isinstance(inner, tf.Variable):
    return inner
  raise TypeError(f"{var!r} is not a tf.Variable or a Keras variable")


def key(var):
  """A hashable key of `var`, the same for every handle of one variable."""
  return underlying(var).ref()


def dtype(var) -> tf.DType:
  return tf.as_dtype(var.dtype)


def shape(var) -> tf.TensorShape:
  return tf.TensorShape(var.shape)


def name(var) -> str:
  """A readable name: Keras 3's `path` ("dense/kernel"), else the
  `tf.Variable` name without ":0"."""
  path = getattr(var, "path", None)
  if isinstance(path, str):
    return path
  return var.name.split(":")[0]
