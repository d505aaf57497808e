"""The Keras 2 `FrontEnd` (`tfdpprune.frontends`)."""

from tfdpprune import frontends
from tfdpprune.keras2 import samplers  # pylint: disable=unused-import  (registers)
from tfdpprune.keras2.compat import keras
from tfdpprune.keras2.private import PrivateModel
from tfdpprune.keras2.wrapper import PruneWrapper


def _is_graph_model(model) -> bool:
  return (isinstance(model, keras.Sequential) or
          getattr(model, "_is_graph_network", False))


def _clone(model, clone_function):
  return keras.models.clone_model(model, clone_function=clone_function)


FRONT_END = frontends.FrontEnd("keras2", keras, PruneWrapper, _is_graph_model,
                               _clone, PrivateModel)
