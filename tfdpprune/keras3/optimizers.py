"""A masked update for any Keras 3 optimizer.

A Keras 3 optimizer only sees gradients, and most of them move a coordinate
whose gradient is 0 (momentum, Adam's moments, weight decay, the optimizer's
weight average). `masked_apply` therefore keeps every unselected coordinate
exactly where it was: it leaves variables whose mask is all zero out of the
update, and for partially masked variables it saves the variable and its
optimizer state (the slot variables Keras keeps per model variable), applies
the optimizer, and puts the unselected coordinates back. Whatever the
optimizer (SGD, Adam, AdamW with weight decay, Lion, ...), an unselected
coordinate and its optimizer state do not move in that step.
"""

from typing import List, Sequence

from tfdpprune.core import variables as variables_lib
from tfdpprune.keras3.compat import tf

# Lists of per-variable optimizer state that are not model variables' slots.
_NOT_SLOTS = ("_trainable_variables", "_variables")


def slots(optimizer, var) -> List[object]:
  """The optimizer variables Keras keeps for model variable `var` (its
  slots: momentum, moments, accumulators, gradient accumulators, the
  weight average), found as the per-variable lists of a built optimizer."""
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


def check_optimizer(optimizer) -> None:
  """Refuses optimizer settings that would change the mechanism."""
  steps = getattr(optimizer, "gradient_accumulation_steps", None)
  if steps not in (None, 0, 1):
    raise ValueError(
        f"{type(optimizer).__name__}(gradient_accumulation_steps={steps}) "
        "averages several noised DP steps into one update, and each of them "
        "would count in epsilon. Use a larger expected batch size instead.")


def masked_apply(optimizer, grads: Sequence[tf.Tensor],
                 variables: Sequence[object], masks: Sequence[object],
                 excluded: Sequence[bool]) -> None:
  """`optimizer.apply` with unselected coordinates (and their optimizer
  state) kept.

  Args:
    optimizer: a built Keras 3 optimizer.
    grads: the DP gradient of each variable.
    variables: the model variables.
    masks: each variable's 0/1 selection (a tensor), or None when fully
      selected.
    excluded: variables left out of the update entirely.
  """
  pairs = [(g, v) for g, v, skip in zip(grads, variables, excluded)
           if not skip]
  kept = []
  for var, mask, skip in zip(variables, masks, excluded):
    if skip or mask is None:
      continue
    state = [var] + slots(optimizer, var)
    for s in state:
      if tuple(s.shape) != tuple(var.shape):
        raise ValueError(
            f"{type(optimizer).__name__} keeps state of shape "
            f"{tuple(s.shape)} for variable {variables_lib.name(var)} of "
            f"shape {tuple(var.shape)} (factored moments), so it cannot keep "
            "unselected coordinates still; use another optimizer (SGD, "
            "Adam, AdamW, Lion, ...) with masks, or select whole variables")
    selected = tf.cast(mask, tf.bool)
    kept.append((selected, [(s, tf.identity(s)) for s in state]))
  if not pairs:
    return
  with tf.control_dependencies([old for _, saved in kept
                                for _, old in saved]):
    optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
  for selected, saved in kept:
    for s, old in saved:
      s.assign(tf.where(selected, s, old))
