"""Helpers shared by the architectures (the Keras module, shape checks,
small-input padding).

Every builder takes `keras=` (the `tf_keras` module, the default, or Keras
3's `keras`) and builds the same architecture, with the same layer names,
in that Keras.
"""

from typing import Sequence, Tuple

from tfdpprune.keras2 import compat as _keras2


def keras_module(keras=None):
  """The Keras to build with: `keras` (a module), or `tf_keras`."""
  return _keras2.keras if keras is None else keras


def image_input(input_shape: Sequence[int], name: str = "input", keras=None):
  """A `keras.Input` for `(H, W, C)` images, with a clear error otherwise."""
  shape = tuple(int(d) for d in input_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(
        f"input_shape must be (height, width, channels), got {input_shape}")
  return keras_module(keras).Input(shape, name=name)


def check_num_classes(num_classes: int) -> None:
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")


def spatial(tensor) -> Tuple[int, int]:
  """`(H, W)` of an NHWC Keras tensor."""
  return int(tensor.shape[1]), int(tensor.shape[2])


def padding_for(tensor, window: int) -> str:
  """'valid' if a `window` x `window` window fits the tensor, else 'same'.

  Lets the published architectures (which use 'valid') run on small inputs
  such as 8x8 digits, where a 'valid' window would not fit.
  """
  return "valid" if min(spatial(tensor)) >= window else "same"
