"""Frozen, validated configurations (public hyper-parameters only)."""

import dataclasses
import re
from typing import Optional, Tuple

_MODES = ("freeze", "select")
_METHODS = ("random", "magnitude", "public_gradient", "public_saliency")
_SCOPES = ("global", "per_layer")
_GRANULARITIES = ("weight", "neuron", "layer")
_PRUNED = ("zero", "keep")
_WEIGHTS = ("kernel", "all")


def _one_of(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"PruneConfig.{name}={value!r} is not allowed; "
                     f"allowed: {', '.join(map(repr, allowed))}")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """How `tdp.prune` chooses the coordinates DP-SGD updates.

  Masks depend only on public inputs: the seed, weights already released
  (e.g. pre-trained or the current DP iterate), or `public_data`.

  Attributes:
    mode: "freeze" — choose once before training, the rest is frozen for the
      whole run (pre-pruning / parameter freezing); "select" — re-draw the
      updated subset every `every_k_steps` optimizer steps (parameter
      selection / gradient dropping).
    method: "random"; "magnitude" (keep the largest |w| of the current
      weights); "public_gradient" (largest |dL/dw| on public data);
      "public_saliency" (largest |w * dL/dw| on public data, SNIP-like).
    sparsity: fraction in [0, 1) of eligible coordinates NOT updated.
    scope: "global" (one ranking over all eligible variables) or "per_layer"
      (each variable keeps its own 1 - sparsity).
    granularity: "weight" (coordinates), "neuron" (output units / channels) or
      "layer" (whole variables; needs scope="global").
    pruned: freeze only — "zero" (pre-pruning: pruned weights set to 0 and
      kept there) or "keep" (frozen at their current values). Default "zero".
    every_k_steps: select only — re-draw every k optimizer steps (k >= 1).
    sparsity_schedule: select only — ((start_step, sparsity), ...): from
      `start_step` on, that sparsity applies (piecewise constant, sorted).
    layers: regex matched (`re.search`) against layer names; None = every
      supported layer.
    weights: "kernel" (kernels and embeddings; biases and normalization
      parameters stay fully trained) or "all".
    seed: the seed of random scores (with the step, for re-draws).

  Example:
    >>> cfg = PruneConfig(mode="select", method="random", sparsity=0.9,
    ...                   every_k_steps=10)
  """
  mode: str = "freeze"
  method: str = "random"
  sparsity: float = 0.9
  scope: str = "per_layer"
  granularity: str = "weight"
  pruned: Optional[str] = None
  every_k_steps: Optional[int] = None
  sparsity_schedule: Optional[Tuple[Tuple[int, float], ...]] = None
  layers: Optional[str] = None
  weights: str = "kernel"
  seed: int = 0

  def __post_init__(self):
    _one_of("mode", self.mode, _MODES)
    _one_of("method", self.method, _METHODS)
    _one_of("scope", self.scope, _SCOPES)
    _one_of("granularity", self.granularity, _GRANULARITIES)
    _one_of("weights", self.weights, _WEIGHTS)
    _check_sparsity("sparsity", self.sparsity)
    if self.granularity == "layer" and self.scope == "per_layer":
      raise ValueError(
          "PruneConfig.granularity='layer' needs scope='global' (a layer is "
          "the whole unit of a per_layer scope); got scope='per_layer'")
    if self.mode == "freeze":
      if self.pruned is not None:
        _one_of("pruned", self.pruned, _PRUNED)
      for name in ("every_k_steps", "sparsity_schedule"):
        if getattr(self, name) is not None:
          raise ValueError(f"PruneConfig.{name}={getattr(self, name)!r} is "
                           "only used with mode='select'")
    else:
      if self.pruned is not None:
        raise ValueError(f"PruneConfig.pruned={self.pruned!r} is only used "
                         "with mode='freeze'")
      if self.method in ("public_gradient", "public_saliency"):
        raise ValueError(
            f"PruneConfig.method={self.method!r} is supported with "
            "mode='freeze'; with mode='select' use 'random' or 'magnitude'")
      k = self.every_k_steps
      if k is not None and (isinstance(k, bool) or not isinstance(k, int) or
                            k < 1):
        raise ValueError(
            f"PruneConfig.every_k_steps={k!r} must be an integer >= 1")
      if self.sparsity_schedule is not None:
        object.__setattr__(self, "sparsity_schedule", tuple(
            (int(s), float(v)) for s, v in self.sparsity_schedule))
        starts = [s for s, _ in self.sparsity_schedule]
        if starts != sorted(starts) or any(s < 0 for s in starts):
          raise ValueError(
              f"PruneConfig.sparsity_schedule={self.sparsity_schedule!r} "
              "needs non-negative start steps in increasing order")
        for _, v in self.sparsity_schedule:
          _check_sparsity("sparsity_schedule", v)
    if self.layers is not None:
      try:
        re.compile(self.layers)
      except re.error as e:
        raise ValueError(
            f"PruneConfig.layers={self.layers!r} is not a valid regex: {e}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise ValueError(f"PruneConfig.seed={self.seed!r} must be an integer")

  @property
  def effective_pruned(self) -> Optional[str]:
    if self.mode != "freeze":
      return None
    return self.pruned or "zero"

  @property
  def effective_every_k_steps(self) -> Optional[int]:
    if self.mode != "select":
      return None
    return self.every_k_steps or 1

  def to_dict(self):
    out = dataclasses.asdict(self)
    if out["sparsity_schedule"] is not None:
      out["sparsity_schedule"] = [list(p) for p in out["sparsity_schedule"]]
    return out

  @classmethod
  def from_dict(cls, d):
    d = dict(d)
    if d.get("sparsity_schedule") is not None:
      d["sparsity_schedule"] = tuple(tuple(p) for p in d["sparsity_schedule"])
    return cls(**d)


def _check_sparsity(name, value):
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or
      not 0.0 <= value < 1.0):
    raise ValueError(
        f"PruneConfig.{name}={value!r} must be in [0, 1) (the fraction of "
        "eligible coordinates not updated)")
