"""Which Keras a model belongs to, and the few pieces each front end gives.

Models, layers and variables of `tf_keras` (Keras 2) and Keras 3 look alike
to the core; what differs (the wrapper's base class, `clone_model`, which
models are graphs of layers, the loss classes) is a `FrontEnd`. `of(obj)`
finds it from the object's classes. The Keras 3 front end is imported only
when a Keras 3 object is seen, and only on the TensorFlow backend.
"""

import dataclasses
import functools
import sys
from typing import Callable


@dataclasses.dataclass(frozen=True)
class FrontEnd:
  """One Keras version's pieces.

  Attributes:
    name: "keras2" or "keras3".
    keras: the Keras module (`tf_keras` or `keras`).
    wrapper_class: its `PruneWrapper`.
    is_graph_model: whether a model is Sequential or functional (its layers
      can be wrapped one by one).
    clone_model: `(model, clone_function) -> model`, layer by layer.
    private_class: its private model (`tdp.make_private`).
  """
  name: str
  keras: object
  wrapper_class: type
  is_graph_model: Callable[[object], bool]
  clone_model: Callable
  private_class: type

  def is_model(self, obj) -> bool:
    return isinstance(obj, self.keras.Model)


def _root(cls):
  """"tf_keras" or "keras": the package of the first Keras class in the
  MRO of `cls`, or None."""
  for c in cls.__mro__:
    root = c.__module__.split(".")[0]
    if root in ("tf_keras", "keras"):
      return root
  return None


@functools.lru_cache(maxsize=None)
def keras2() -> FrontEnd:
  from tfdpprune.keras2 import frontend  # pylint: disable=g-import-not-at-top
  return frontend.FRONT_END


@functools.lru_cache(maxsize=None)
def keras3() -> FrontEnd:
  from tfdpprune.keras3 import frontend  # pylint: disable=g-import-not-at-top
  return frontend.FRONT_END


def of(obj) -> FrontEnd:
  """The front end of a Keras model, layer or optimizer.

  Raises:
    TypeError: `obj` is not a Keras object.
    ValueError: a Keras 3 object on another backend than TensorFlow, naming
      the backend and the fix.
  """
  return of_class(type(obj))


def of_class(cls) -> FrontEnd:
  """The front end of a Keras class (see `of`)."""
  root = _root(cls)
  if root == "tf_keras":
    return keras2()
  if root == "keras":  # Keras 3 is imported already: it made `cls`
    backend = sys.modules["keras"].backend.backend()
    if backend != "tensorflow":
      raise ValueError(
          f"{cls.__name__} is a Keras 3 class on the {backend!r} backend; "
          "tfdpprune runs on TensorFlow. Fix: set the environment variable "
          "KERAS_BACKEND=tensorflow before Keras is imported (or set "
          "\"backend\": \"tensorflow\" in ~/.keras/keras.json)")
    return keras3()
  raise TypeError(f"expected a Keras model or layer (tf_keras or Keras 3), "
                  f"got {cls.__module__}.{cls.__name__}")
