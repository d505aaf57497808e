"""A multi-layer perceptron over flattened inputs, and the linear model."""

import math
from typing import Optional, Sequence

from tfdpprune.models import _common


def mlp(input_shape, num_classes: int, *, hidden: Sequence[int] = (256,),
        activation: str = "relu", norm: Optional[str] = None,
        name: str = "mlp", keras=None):
  """Flatten -> Dense(hidden[0]) -> ... -> Dense(num_classes) logits.

  Args:
    input_shape: shape of one example (any rank).
    num_classes: number of logits.
    hidden: widths of the hidden layers (empty: a linear model).
    activation: hidden activation.
    norm: None, or "group": a weightless GroupNormalization of the inputs
      (`[H, W, C]`, gcd(C, 27) groups: 27 for ScatterNet's 81 channels, as
      in Tramer & Boneh 2021), computed per example.
    name: the model's name.
    keras: the Keras module to build with (default `tf_keras`).

  Returns:
    An uncompiled functional `keras.Model` named "mlp".

  Example:
    >>> [l.name for l in mlp((8, 8, 1), 10).layers]
    ['input', 'flatten', 'dense1', 'logits']
  """
  keras = _common.keras_module(keras)
  _common.check_num_classes(num_classes)
  if any(int(u) < 1 for u in hidden):
    raise ValueError(f"hidden widths must be >= 1, got {tuple(hidden)}")
  if norm not in (None, "group"):
    raise ValueError(f"norm={norm!r} must be None or 'group'")
  inputs = keras.Input(tuple(int(d) for d in input_shape), name="input")
  h = inputs
  if norm == "group":
    if len(input_shape) != 3:
      raise ValueError("norm='group' needs [H, W, C] inputs, got shape "
                       f"{tuple(input_shape)}")
    h = keras.layers.GroupNormalization(
        math.gcd(int(input_shape[-1]), 27), center=False, scale=False,
        name="input_norm")(h)
  h = keras.layers.Flatten(name="flatten")(h)
  for i, units in enumerate(hidden, start=1):
    h = keras.layers.Dense(int(units), activation=activation,
                           name=f"dense{i}")(h)
  logits = keras.layers.Dense(num_classes, name="logits")(h)
  return keras.Model(inputs, logits, name=name)


def linear(input_shape, num_classes: int, *, norm: Optional[str] = None,
           keras=None):
  """A linear model: [GroupNorm ->] Flatten -> Dense(num_classes) logits.

  With `--features=scattering --model_norm=group` this is Tramer & Boneh's
  ScatterNet + linear model (their best Fashion-MNIST model at epsilon 3).

  Example:
    >>> [l.name for l in linear((7, 7, 81), 10, norm="group").layers]
    ['input', 'input_norm', 'flatten', 'logits']
  """
  return mlp(input_shape, num_classes, hidden=(), norm=norm, name="linear",
             keras=keras)
