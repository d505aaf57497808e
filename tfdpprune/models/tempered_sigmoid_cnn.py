"""Tempered-sigmoid CNNs (Papernot et al., AAAI 2021).

"Tempered Sigmoid Activations for Deep Learning with Differential Privacy"
(arXiv:2007.14191): bounded activations keep activations, and so per-example
gradient norms, from exploding, which suits clipping. The activation is
`phi(x) = scale * sigmoid(inverse_temperature * x) - offset`; the paper's
best settings are close to tanh, `(scale, inverse_temperature, offset) =
(2, 2, 1)`, the default here (built as a plain tanh `Activation`).
"""

import functools
from typing import Optional

from tfdpprune.core._tf import tf
from tfdpprune.models import _common

_TANH = (2.0, 2.0, 1.0)
_VARIANTS = ("mnist", "cifar10")


def tempered_sigmoid_class(keras=None):
  """The `TemperedSigmoid` layer class of one Keras (registered for
  `.keras` files); `keras` is a module (default `tf_keras`)."""
  return _tempered_sigmoid_class(_common.keras_module(keras))


@functools.lru_cache(maxsize=None)
def _tempered_sigmoid_class(keras):

  @keras.saving.register_keras_serializable(package="tfdpprune")
  class TemperedSigmoid(keras.layers.Layer):
    """`scale * sigmoid(inverse_temperature * x) - offset` (no weights)."""

    def __init__(self, scale=2.0, inverse_temperature=2.0, offset=1.0,
                 **kwargs):
      super().__init__(**kwargs)
      self.scale = float(scale)
      self.inverse_temperature = float(inverse_temperature)
      self.offset = float(offset)

    def call(self, inputs):
      return (self.scale * tf.sigmoid(self.inverse_temperature * inputs)
              - self.offset)

    def compute_output_shape(self, input_shape):
      return input_shape

    def get_config(self):
      config = super().get_config()
      config.update(scale=self.scale,
                    inverse_temperature=self.inverse_temperature,
                    offset=self.offset)
      return config

  return TemperedSigmoid


TemperedSigmoid = tempered_sigmoid_class()  # the `tf_keras` layer


def _activation(keras, params, name):
  if params == _TANH:
    return keras.layers.Activation("tanh", name=name)
  scale, inverse_temperature, offset = params
  return tempered_sigmoid_class(keras)(scale, inverse_temperature, offset,
                                       name=name)


def tempered_sigmoid_cnn(input_shape, num_classes: int, *,
                         variant: Optional[str] = None, scale: float = 2.0,
                         inverse_temperature: float = 2.0,
                         offset: float = 1.0, width: int = 1,
                         norm: Optional[str] = None, keras=None):
  """The paper's MNIST or CIFAR-10 CNN with tempered-sigmoid activations.

  "mnist": Conv(16, 8x8, s2, same) -> MaxPool(2, 1) -> Conv(32, 4x4, s2,
  valid) -> MaxPool(2, 1) -> Flatten -> Dense(32) -> Dense(num_classes);
  as in `tutorial_cnn`, windows that do not fit a small input use 'same'.
  "cifar10": [Conv(32, 3x3) x2, MaxPool(2, 2), Conv(64) x2, MaxPool,
  Conv(128) x2, MaxPool] ('same' padding) -> Flatten -> Dense(128) ->
  Dense(num_classes). Every hidden layer uses the tempered sigmoid.

  Args:
    input_shape: `(H, W, C)`.
    num_classes: number of logits.
    variant: "mnist", "cifar10", or None: "cifar10" for inputs of at least
      32x32 with 3 channels, else "mnist".
    scale: s of the tempered sigmoid.
    inverse_temperature: T of the tempered sigmoid.
    offset: o of the tempered sigmoid.
    width: multiplies every layer's channels / units (the study's wider
      networks, e.g. pruned back to the base model's trained-parameter
      count).
    norm: None, or "group": GroupNormalization (per-example, DP-friendly;
      up to 8 groups) after every convolution, before its activation.
    keras: the Keras module to build with (default `tf_keras`).

  Returns:
    An uncompiled functional `keras.Model` producing logits, named
    "tempered_sigmoid_cnn_<variant>".

  Example:
    >>> tempered_sigmoid_cnn((32, 32, 3), 10).name
    'tempered_sigmoid_cnn_cifar10'
  """
  keras = _common.keras_module(keras)
  _common.check_num_classes(num_classes)
  inputs = _common.image_input(input_shape, keras=keras)
  if variant is None:
    h, w = _common.spatial(inputs)
    variant = "cifar10" if min(h, w) >= 32 and input_shape[2] == 3 else "mnist"
  if variant not in _VARIANTS:
    raise ValueError(f"variant must be one of {_VARIANTS} or None, got "
                     f"{variant!r}")
  params = (float(scale), float(inverse_temperature), float(offset))
  if not (isinstance(width, int) and width >= 1):
    raise ValueError(f"width={width!r} must be an integer >= 1")
  if norm not in (None, "group"):
    raise ValueError(f"norm={norm!r} must be None or 'group'")

  def normalized(h, name):
    if norm is None:
      return h
    groups = next(g for g in (8, 4, 2, 1) if h.shape[-1] % g == 0)
    return keras.layers.GroupNormalization(groups, name=f"gn_{name}")(h)

  if variant == "mnist":
    h = keras.layers.Conv2D(16 * width, 8, strides=2, padding="same",
                            name="conv1")(inputs)
    h = _activation(keras, params, "act1")(normalized(h, "conv1"))
    h = keras.layers.MaxPool2D(2, 1, padding=_common.padding_for(h, 2),
                               name="pool1")(h)
    h = keras.layers.Conv2D(32 * width, 4, strides=2,
                            padding=_common.padding_for(h, 4),
                            name="conv2")(h)
    h = _activation(keras, params, "act2")(normalized(h, "conv2"))
    h = keras.layers.MaxPool2D(2, 1, padding=_common.padding_for(h, 2),
                               name="pool2")(h)
    dense_units = 32 * width
  else:
    h = inputs
    for stage, filters in enumerate((32, 64, 128), start=1):
      for i in (1, 2):
        h = keras.layers.Conv2D(filters * width, 3, padding="same",
                                name=f"conv{stage}_{i}")(h)
        h = _activation(keras, params, f"act{stage}_{i}")(
            normalized(h, f"conv{stage}_{i}"))
      h = keras.layers.MaxPool2D(2, 2, padding=_common.padding_for(h, 2),
                                 name=f"pool{stage}")(h)
    dense_units = 128 * width
  h = keras.layers.Flatten(name="flatten")(h)
  h = keras.layers.Dense(dense_units, name="dense1")(h)
  h = _activation(keras, params, "act_dense1")(h)
  logits = keras.layers.Dense(num_classes, name="logits")(h)
  return keras.Model(inputs, logits, name=f"tempered_sigmoid_cnn_{variant}")
