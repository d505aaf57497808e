"""Model architectures by name, and the DP-compatibility check.

Each architecture lives in its own module as a builder
`(input_shape, num_classes, **kwargs) -> keras.Model` producing logits
(uncompiled, deterministic layer names, no BatchNorm) and is registered here.

```python
from tfdpprune import models
model = models.get_model("tutorial_cnn", (28, 28, 1), 10)
models.check_dp_compatible(model)
```
"""

from typing import Callable, Dict, List

from tfdpprune.core import validation
from tfdpprune.models import mlp as _mlp
from tfdpprune.models import resnet as _resnet
from tfdpprune.models import tempered_sigmoid_cnn as _tempered
from tfdpprune.models import tutorial_cnn as _tutorial

_REGISTRY: Dict[str, Callable[..., object]] = {}


def register(name: str):
  """Decorator registering a model builder under `name`.

  Args:
    name: the registry key; a name already taken is refused.

  Returns:
    A decorator that registers and returns the builder unchanged.

  Raises:
    ValueError: `name` is already registered.

  Example:
    >>> @register("my_linear")
    ... def my_linear(input_shape, num_classes):
    ...   return get_model("mlp", input_shape, num_classes, hidden=())
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"model name must be a non-empty string, got {name!r}")

  def decorator(builder):
    if name in _REGISTRY:
      taken = _REGISTRY[name]
      raise ValueError(f"a model named {name!r} is already registered "
                       f"({taken.__module__}.{taken.__qualname__})")
    _REGISTRY[name] = builder
    return builder

  return decorator


def available_models() -> List[str]:
  """The registered model names, sorted."""
  return sorted(_REGISTRY)


def get_model(name: str, input_shape, num_classes: int, *, keras=None,
              **kwargs):
  """Builds the registered model `name` (uncompiled, logits output).

  Args:
    name: a name from `available_models()`.
    input_shape: shape of one example, e.g. `(28, 28, 1)`.
    num_classes: number of logits.
    keras: the Keras module to build with: `tf_keras` (the default) or
      Keras 3's `keras`; the same architecture and layer names in either.
    **kwargs: architecture options (see the builder's docstring).

  Returns:
    A `keras.Model` mapping `[batch, *input_shape]` to `[batch, num_classes]`.

  Raises:
    ValueError: unknown name (the message lists the registered ones).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; available: "
                     f"{', '.join(available_models())}")
  if keras is not None:
    kwargs["keras"] = keras
  return _REGISTRY[name](tuple(input_shape), int(num_classes), **kwargs)


def check_dp_compatible(model) -> None:
  """Refuses models whose per-example gradients are undefined.

  `tfdpprune.validation.validate(model, strict=True)`: BatchNormalization in
  training mode (batch statistics mix the examples of a batch), activity
  regularizers and weight penalties; nested models and wrapped layers are
  inspected too.

  Raises:
    ValueError: naming every offending layer, why, and the fix.
  """
  validation.validate(model, strict=True)


register("tutorial_cnn")(_tutorial.tutorial_cnn)
register("tempered_sigmoid_cnn")(_tempered.tempered_sigmoid_cnn)
register("mlp")(_mlp.mlp)
register("linear")(_mlp.linear)
register("wide_resnet")(_resnet.wide_resnet)
register("wrn16_4")(_resnet.wrn16_4)
register("resnet_small")(_resnet.resnet_small)

__all__ = ["register", "get_model", "available_models",
           "check_dp_compatible"]
