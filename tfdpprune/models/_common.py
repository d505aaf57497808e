"""Helpers shared by the architectures (shape checks, small-input padding)."""

from typing import Sequence, Tuple

from tfdpprune._compat import keras


def image_input(input_shape: Sequence[int], name: str = "input"):
  """A `keras.Input` for `(H, W, C)` images, with a clear error otherwise."""
  shape = tuple(int(d) for d in input_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(
        f"input_shape must be (height, width, channels), got {input_shape}")
  return keras.Input(shape, name=name)


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
