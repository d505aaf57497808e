"""Which models DP-SGD can train: every problem of a model, with the fix.

DP-SGD bounds each example's influence by clipping its own gradient. That
bound is void when one example's gradient depends on the other examples of
the batch (BatchNormalization in training mode normalizes with batch
statistics), or when the loss has batch-level terms that are not
per-example losses (activity regularizers, weight penalties). `validate`
lists every such problem of a model at once, like Opacus's
`ModuleValidator.validate`; the DP optimizer, `tdp.prune` and the trainer
refuse a model with problems.

```python
import tfdpprune as tdp
for problem in tdp.validate(model):
  print(problem)              # layer name, what is wrong, how to fix it
tdp.validate(model, strict=True)   # raises ValueError listing all problems
```
"""

import dataclasses
from typing import List

_WEIGHT_REGULARIZERS = ("kernel_regularizer", "bias_regularizer",
                        "embeddings_regularizer", "depthwise_regularizer",
                        "pointwise_regularizer", "recurrent_regularizer",
                        "gamma_regularizer", "beta_regularizer")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One reason a model cannot be trained with DP-SGD.

  Attributes:
    layer: the layer's name.
    layer_class: the layer's class name.
    reason: what breaks per-example clipping.
    fix: what to do instead.
  """
  layer: str
  layer_class: str
  reason: str
  fix: str

  def __str__(self):
    return f"layer {self.layer!r} ({self.layer_class}): {self.reason}. " \
           f"Fix: {self.fix}."


def _is_batch_norm(layer) -> bool:
  return any(c.__name__.startswith(("BatchNormalization",
                                    "SyncBatchNormalization"))
             for c in type(layer).__mro__)


def _is_layer(obj) -> bool:
  """A Keras layer of either version (duck-typed: the core imports no
  Keras)."""
  return any(c.__name__ == "Layer" and c.__module__.split(".")[0] in (
      "tf_keras", "keras") for c in type(obj).__mro__)


def _normalizes_over_batch_axis(layer) -> bool:
  if not any(c.__name__ == "LayerNormalization"
             for c in type(layer).__mro__):
    return False
  axis = layer.axis
  axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
  return 0 in axes


def layer_problems(layer) -> List[Problem]:
  """The problems of one layer (not of its sublayers)."""
  name, cls = layer.name, type(layer).__name__
  out = []
  if _is_batch_norm(layer) and layer.trainable:
    out.append(Problem(
        name, cls, "in training it mixes the examples of a batch (it "
        "normalizes with batch statistics), so per-example gradients, and "
        "with them DP-SGD's sensitivity bound, are undefined",
        "replace it by GroupNormalization or LayerNormalization, which do not "
        "mix the examples of a batch, or freeze it (`layer.trainable = False` "
        "runs it in inference mode with its moving statistics)"))
  if _normalizes_over_batch_axis(layer):
    out.append(Problem(
        name, cls, f"it normalizes over the batch axis (axis={layer.axis!r}), "
        "which mixes the examples of a batch",
        "normalize over feature axes only (e.g. axis=-1)"))
  if getattr(layer, "activity_regularizer", None) is not None:
    out.append(Problem(
        name, cls, "its activity_regularizer adds a batch-level loss that "
        "is not a per-example loss, so clipping does not bound it",
        "remove the activity_regularizer"))
  for attr in _WEIGHT_REGULARIZERS:
    if getattr(layer, attr, None) is not None:
      out.append(Problem(
          name, cls, f"its {attr} adds a weight penalty, which is not a "
          "per-example loss and is not supported under DP",
          f"remove the {attr} (use the optimizer's learning rate schedule or "
          "weight decay instead)"))
  return out


def batch_statistics_ops(graph) -> List[str]:
  """Names of the ops of `graph` that update moving batch statistics: the
  signature of training-mode BatchNormalization (fused or not; Keras'
  `AssignMovingAvg` / `AssignNewValue` scopes). LayerNormalization, which
  reuses the fused batch-norm kernel per example, updates none."""
  return [op.name for op in graph.get_operations()
          if op.type in ("AssignSubVariableOp", "AssignVariableOp",
                         "AssignSub", "Assign") and
          ("/AssignMovingAvg" in op.name or "/AssignNewValue" in op.name)]


def check_graph(graph, who: str) -> None:
  """Refuses a traced step holding batch-statistics ops (`who` is named)."""
  ops = batch_statistics_ops(graph)
  if ops:
    raise ValueError(
        f"{who}: the traced step holds ops that normalize with batch "
        f"statistics (training-mode BatchNormalization): {ops[:5]}. They mix "
        "the examples of a batch, so per-example gradients and DP-SGD's "
        "sensitivity bound are undefined. Fix: replace BatchNormalization by "
        "GroupNormalization or LayerNormalization, or freeze it "
        "(layer.trainable = False).")


def validate(model, strict: bool = False) -> List[Problem]:
  """Every problem of `model` (and its nested layers) for DP-SGD.

  Args:
    model: a Keras model or layer.
    strict: raise instead of returning a non-empty list.

  Returns:
    The problems, in layer order (empty if the model is fine).

  Raises:
    ValueError: with `strict=True`, listing every problem and its fix.

  Example:
    >>> model = keras.Sequential([keras.Input((4,)),
    ...                           keras.layers.BatchNormalization(),
    ...                           keras.layers.Dense(2)])
    >>> [p.layer_class for p in validate(model)]
    ['BatchNormalization']
  """
  layers, seen = [], set()
  # `_flatten_layers`, not `submodules`: the latter walks every attribute and
  # fails on some layers' caches (e.g. recurrent dropout masks).
  flatten = getattr(model, "_flatten_layers", None)
  for layer in (flatten(include_self=True, recursive=True) if flatten
                else [model]):
    if _is_layer(layer) and id(layer) not in seen:
      seen.add(id(layer))
      layers.append(layer)
  problems = [p for layer in layers for p in layer_problems(layer)]
  if strict and problems:
    raise ValueError(
        f"model {model.name!r} cannot be trained with DP-SGD "
        f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n" +
        "\n".join(f"  - {p}" for p in problems))
  return problems
