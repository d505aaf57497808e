"""The Keras 3 `FrontEnd` (`tfdpprune.frontends`)."""

from tfdpprune import frontends
from tfdpprune.keras3 import samplers  # pylint: disable=unused-import  (registers)
from tfdpprune.keras3.compat import Functional
from tfdpprune.keras3.compat import keras
from tfdpprune.keras3.private import PrivateModel
from tfdpprune.keras3.wrapper import PruneWrapper


def _is_graph_model(model) -> bool:
  return isinstance(model, (keras.Sequential, Functional))


def _clone(model, clone_function):
  return keras.models.clone_model(model, clone_function=clone_function)


FRONT_END = frontends.FrontEnd("keras3", keras, PruneWrapper, _is_graph_model,
                               _clone, PrivateModel)
