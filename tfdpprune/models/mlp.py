"""A multi-layer perceptron over flattened inputs."""

from typing import Sequence

from tfdpprune._compat import keras
from tfdpprune.models import _common


def mlp(input_shape, num_classes: int, *, hidden: Sequence[int] = (256,),
        activation: str = "relu") -> keras.Model:
  """Flatten -> Dense(hidden[0]) -> ... -> Dense(num_classes) logits.

  Args:
    input_shape: shape of one example (any rank).
    num_classes: number of logits.
    hidden: widths of the hidden layers (empty: a linear model).
    activation: hidden activation.

  Returns:
    An uncompiled functional `keras.Model` named "mlp".

  Example:
    >>> [l.name for l in mlp((8, 8, 1), 10).layers]
    ['input', 'flatten', 'dense1', 'logits']
  """
  _common.check_num_classes(num_classes)
  if any(int(u) < 1 for u in hidden):
    raise ValueError(f"hidden widths must be >= 1, got {tuple(hidden)}")
  inputs = keras.Input(tuple(int(d) for d in input_shape), name="input")
  h = keras.layers.Flatten(name="flatten")(inputs)
  for i, units in enumerate(hidden, start=1):
    h = keras.layers.Dense(int(units), activation=activation,
                           name=f"dense{i}")(h)
  logits = keras.layers.Dense(num_classes, name="logits")(h)
  return keras.Model(inputs, logits, name="mlp")
