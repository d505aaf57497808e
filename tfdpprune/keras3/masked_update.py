"""A Keras 3 optimizer's per-variable state, and its update.

`slots(optimizer, var)` finds the optimizer variables Keras 3 keeps for a
model variable (momentum, moments, accumulators, gradient accumulators, the
weight average): the per-variable lists of a built optimizer, aligned with
its `_trainable_variables`. `tfdpprune.private_model.masked_apply` saves and
restores them around the update of a masked variable.
"""

from typing import List

# Lists of per-variable state that are not a model variable's slots.
_NOT_SLOTS = ("_trainable_variables", "_variables")


def slots(optimizer, var) -> List[object]:
  """The optimizer variables kept for model variable `var`."""
  index = optimizer._get_variable_index(var)  # pylint: disable=protected-access
  count = len(optimizer._trainable_variables)  # pylint: disable=protected-access
  out = []
  for name, value in vars(optimizer).items():
    if name in _NOT_SLOTS or not isinstance(value, (list, tuple)):
      continue
    if len(value) != count or not all(
        v is None or hasattr(v, "assign") for v in value):
      continue
    if value[index] is not None:
      out.append(value[index])
  return out


def check(optimizer) -> None:
  """Refuses optimizer settings that would change the mechanism."""
  steps = getattr(optimizer, "gradient_accumulation_steps", None)
  if steps not in (None, 0, 1):
    raise ValueError(
        f"{type(optimizer).__name__}(gradient_accumulation_steps={steps}) "
        "averages several noised DP steps into one update, and each of them "
        "would count in epsilon. Use a larger expected batch size instead.")
