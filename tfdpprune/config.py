"""Frozen, validated configurations (public hyper-parameters only)."""

import dataclasses
import re
from typing import NamedTuple, Optional, Tuple

_MODES = ("freeze", "select")
_METHODS = ("random", "magnitude", "public_gradient", "public_saliency",
            "dirichlet")
# Methods that score coordinates from gradients on public data.
PUBLIC_GRADIENT_METHODS = ("public_gradient", "public_saliency")
_SCOPES = ("global", "per_layer")
_GRANULARITIES = ("weight", "neuron", "layer")
_PRUNED = ("zero", "keep")
_WEIGHTS = ("kernel", "all")


def _one_of(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"PruneConfig.{name}={value!r} is not allowed; "
                     f"allowed: {', '.join(map(repr, allowed))}")


class DirichletSettings(NamedTuple):
  """The resolved cost and prior of `PruneConfig(method="dirichlet")`."""
  epochs: int
  learning_rate: float
  prior: float


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
      "public_saliency" (largest |w * dL/dw| on public data, SNIP-like);
      "dirichlet" (freeze only, granularity "neuron": Dirichlet pruning,
      Adamczewski & Park, AISTATS 2021 — keep the output units with the
      largest posterior-mean importance, learned by variational inference
      on public data; see `tfdpprune.dirichlet`). In freeze mode the public
      methods average over all of `public_data`; in select mode every
      re-draw scores the next `public_batch_size` public examples.
    sparsity: fraction in [0, 1) of eligible coordinates NOT updated.
    scope: "global" (one ranking over all eligible variables) or "per_layer"
      (each variable keeps its own 1 - sparsity).
    granularity: "weight" (coordinates), "neuron" (output units / channels) or
      "layer" (whole variables; needs scope="global"). Default (None):
      "neuron" for method="dirichlet" (its only granularity), else "weight".
    pruned: freeze only — "zero" (pre-pruning: pruned weights set to 0 and
      kept there) or "keep" (frozen at their current values). Default "zero".
    every_k_steps: select only — re-draw every k optimizer steps (k >= 1).
    sparsity_schedule: select only — ((start_step, sparsity), ...): from
      `start_step` on, that sparsity applies (piecewise constant, sorted).
    layers: regex matched (`re.search`) against layer names; None = every
      supported layer.
    weights: "kernel" (kernels and embeddings; biases and normalization
      parameters stay fully trained) or "all".
    seed: the seed of public randomness: random scores (with the step, for
      re-draws), the order of public batches, the Dirichlet samples.
    public_batch_size: public examples per step of the methods that step
      through public data (Dirichlet VI; public methods in select mode).
      Default 64.
    dirichlet_epochs: dirichlet only — passes over the public data of the
      variational inference (its cost: `dirichlet_epochs *
      max(1, N_public // public_batch_size)` forward and backward passes
      with the weights fixed). Default 1.
    dirichlet_learning_rate: dirichlet only — Adam step size on the log
      concentrations. Default 0.1.
    dirichlet_prior: dirichlet only — concentration of the symmetric
      Dirichlet prior of every layer (also the initial posterior). Default 2.

  Example:
    >>> cfg = PruneConfig(mode="select", method="random", sparsity=0.9,
    ...                   every_k_steps=10)
    >>> PruneConfig(method="dirichlet", sparsity=0.5).granularity
    'neuron'
  """
  mode: str = "freeze"
  method: str = "random"
  sparsity: float = 0.9
  scope: str = "per_layer"
  granularity: Optional[str] = None
  pruned: Optional[str] = None
  every_k_steps: Optional[int] = None
  sparsity_schedule: Optional[Tuple[Tuple[int, float], ...]] = None
  layers: Optional[str] = None
  weights: str = "kernel"
  seed: int = 0
  public_batch_size: Optional[int] = None
  dirichlet_epochs: Optional[int] = None
  dirichlet_learning_rate: Optional[float] = None
  dirichlet_prior: Optional[float] = None

  DEFAULT_PUBLIC_BATCH_SIZE = 64
  DEFAULT_DIRICHLET_EPOCHS = 1
  DEFAULT_DIRICHLET_LEARNING_RATE = 0.1
  DEFAULT_DIRICHLET_PRIOR = 2.0

  def __post_init__(self):
    _one_of("mode", self.mode, _MODES)
    _one_of("method", self.method, _METHODS)
    _one_of("scope", self.scope, _SCOPES)
    if self.granularity is None:
      object.__setattr__(self, "granularity", "neuron"
                         if self.method == "dirichlet" else "weight")
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
      if self.method == "dirichlet":
        raise ValueError(
            "PruneConfig.method='dirichlet' is supported with mode='freeze' "
            "only (its variational inference runs once, before training); "
            "with mode='select' use 'random', 'magnitude', 'public_gradient' "
            "or 'public_saliency'")
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
    self._check_public_fields()

  def _check_public_fields(self):
    if self.method == "dirichlet" and self.granularity != "neuron":
      raise ValueError(
          f"PruneConfig.granularity={self.granularity!r} is not allowed with "
          "method='dirichlet'; allowed: 'neuron' (Dirichlet pruning ranks "
          "the output units of layers)")
    if self.public_batch_size is not None:
      if not self.steps_through_public_data:
        raise ValueError(
            f"PruneConfig.public_batch_size={self.public_batch_size!r} is "
            "only used with method='dirichlet', or with mode='select' and "
            "method='public_gradient' or 'public_saliency'")
      _check_int("public_batch_size", self.public_batch_size, 1)
    for name in ("dirichlet_epochs", "dirichlet_learning_rate",
                 "dirichlet_prior"):
      value = getattr(self, name)
      if value is None:
        continue
      if self.method != "dirichlet":
        raise ValueError(f"PruneConfig.{name}={value!r} is only used with "
                         "method='dirichlet'")
      if name == "dirichlet_epochs":
        _check_int(name, value, 1)
      elif (isinstance(value, bool) or not isinstance(value, (int, float)) or
            not 0 < value < float("inf")):
        raise ValueError(f"PruneConfig.{name}={value!r} must be a finite "
                         "number > 0")

  @property
  def uses_public_data(self) -> bool:
    """Whether the masks are computed from `public_data`."""
    return self.method in PUBLIC_GRADIENT_METHODS or self.method == "dirichlet"

  @property
  def steps_through_public_data(self) -> bool:
    """Whether the method reads public data batch by batch."""
    return self.method == "dirichlet" or (
        self.mode == "select" and self.method in PUBLIC_GRADIENT_METHODS)

  @property
  def effective_public_batch_size(self) -> Optional[int]:
    if not self.steps_through_public_data:
      return None
    return self.public_batch_size or self.DEFAULT_PUBLIC_BATCH_SIZE

  @property
  def effective_dirichlet(self) -> Optional[DirichletSettings]:
    """The Dirichlet VI's settings (defaults filled in), or None."""
    if self.method != "dirichlet":
      return None
    def pick(value, default):
      return default if value is None else value
    return DirichletSettings(
        epochs=pick(self.dirichlet_epochs, self.DEFAULT_DIRICHLET_EPOCHS),
        learning_rate=float(pick(self.dirichlet_learning_rate,
                                 self.DEFAULT_DIRICHLET_LEARNING_RATE)),
        prior=float(pick(self.dirichlet_prior, self.DEFAULT_DIRICHLET_PRIOR)))

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


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"PruneConfig.{name}={value!r} must be an integer >= "
                     f"{minimum}")


def _check_sparsity(name, value):
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or
      not 0.0 <= value < 1.0):
    raise ValueError(
        f"PruneConfig.{name}={value!r} must be in [0, 1) (the fraction of "
        "eligible coordinates not updated)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One DP training run (`python -m tfdpprune.train`); fields = flag names.

  Data-dependent checks (delta < 1/N, the data set and model names) happen
  when the run starts, with messages naming the flag.

  `validation_fraction` > 0 holds out that fraction of the private training
  set as a validation set for hyper-parameter tuning: training (and N) use
  the rest; the validation set is evaluated at every epoch end beside the
  test set, and its metrics (computed on private examples, outside the DP
  guarantee) are reported under their own labelled names
  (`nonprivate/validation/*`), never under the test set's `eval/*`.

  `num_classes` (the model's output size) defaults to the data set's
  metadata, else the largest test label + 1: public information only.

  `seed` seeds public things only (initialization, random mask scores, the
  public/private split, public pre-training). DP noise and Poisson sampling
  are secret (OS entropy) unless `noise_seed` is given, which makes them
  reproducible and public (experiments only). `nonprivate_metrics` opts in to
  statistics of private training batches (loss, accuracy, clip fraction),
  which are outside the DP guarantee.
  """
  dataset: str = "digits"
  data_dir: Optional[str] = None
  num_classes: Optional[int] = None  # default: metadata, else the test set
  model: str = "mlp"
  keras: int = 2
  model_width: int = 1
  model_norm: Optional[str] = None
  features: Optional[str] = None
  public_dataset: Optional[str] = None
  public_fraction: float = 0.0
  validation_fraction: float = 0.0
  public_pretrain_epochs: int = 0
  batch_size: int = 128
  epochs: Optional[float] = None     # default 30 when --steps is not given
  steps: Optional[int] = None
  optimizer: str = "sgd"
  augmult: int = 1
  ema_decay: float = 0.0
  lr_schedule: str = "constant"
  lr_warmup_steps: int = 0
  learning_rate: float = 0.05
  momentum: float = 0.9
  l2_norm_clip: float = 1.0
  noise_multiplier: Optional[float] = None
  target_epsilon: Optional[float] = None  # default 3 without --noise_multiplier
  delta: float = 1e-5
  accountant: str = "rdp"
  prune: Optional[PruneConfig] = None
  init_checkpoint: Optional[str] = None
  seed: int = 0
  noise_seed: Optional[int] = None
  nonprivate_metrics: bool = False
  eval_batch_size: int = 1024
  physical_batch_size: Optional[int] = None
  jit_compile: bool = False
  mixed_precision: Optional[str] = None

  DEFAULT_TARGET_EPSILON = 3.0
  DEFAULT_EPOCHS = 30.0

  def __post_init__(self):
    def fail(name, why):
      raise ValueError(f"--{name}={getattr(self, name)!r} {why}")
    if self.noise_multiplier is None and self.target_epsilon is None:
      object.__setattr__(self, "target_epsilon", self.DEFAULT_TARGET_EPSILON)
    if self.epochs is None and self.steps is None:
      object.__setattr__(self, "epochs", self.DEFAULT_EPOCHS)
    if (self.noise_multiplier is None) == (self.target_epsilon is None):
      raise ValueError(
          "give exactly one of --target_epsilon (the noise multiplier is "
          "calibrated to it) or --noise_multiplier (epsilon is reported); got "
          f"--target_epsilon={self.target_epsilon!r} and "
          f"--noise_multiplier={self.noise_multiplier!r}")
    if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
      fail("noise_multiplier", "must be >= 0")
    if self.target_epsilon is not None and not 0 < self.target_epsilon < 1e6:
      fail("target_epsilon", "must be in (0, 1e6)")
    if not 0 < self.delta < 1:
      fail("delta", "must be in (0, 1) (and below 1/N, checked at start)")
    if not self.l2_norm_clip > 0:
      fail("l2_norm_clip", "must be > 0")
    if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
      fail("batch_size", "must be an integer >= 1")
    if (self.epochs is None) == (self.steps is None):
      raise ValueError("give exactly one of --epochs or --steps; got "
                       f"--epochs={self.epochs!r} and --steps={self.steps!r}")
    if self.epochs is not None and not self.epochs > 0:
      fail("epochs", "must be > 0")
    if self.steps is not None and not (isinstance(self.steps, int) and
                                       self.steps >= 1):
      fail("steps", "must be an integer >= 1")
    if not self.learning_rate > 0:
      fail("learning_rate", "must be > 0")
    if not 0 <= self.momentum < 1:
      fail("momentum", "must be in [0, 1)")
    if self.optimizer not in ("sgd", "adam"):
      fail("optimizer", "must be 'sgd' or 'adam'")
    if self.keras not in (2, 3):
      fail("keras", "must be 2 (tf_keras) or 3 (Keras 3, TensorFlow backend)")
    if not (isinstance(self.model_width, int) and self.model_width >= 1):
      fail("model_width", "must be an integer >= 1")
    if self.model_norm not in (None, "group"):
      fail("model_norm", "must be unset or 'group'")
    if self.features not in (None, "scattering"):
      fail("features", "must be unset or 'scattering'")
    if self.features is not None and self.augmult != 1:
      fail("augmult", f"must be 1 with --features={self.features} (the "
           "augmentations crop and flip images, not features)")
    if not (self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0):
      fail("ema_decay", "must be 0 (off) or in (0, 1)")
    if self.lr_schedule not in ("constant", "cosine"):
      fail("lr_schedule", "must be 'constant' or 'cosine'")
    if not (isinstance(self.lr_warmup_steps, int) and
            self.lr_warmup_steps >= 0):
      fail("lr_warmup_steps", "must be an integer >= 0")
    if not (isinstance(self.augmult, int) and not isinstance(
        self.augmult, bool) and 1 <= self.augmult <= 64):
      fail("augmult", "must be an integer in [1, 64]")
    if self.accountant not in ("rdp", "pld"):
      fail("accountant", "must be 'rdp' or 'pld'")
    if not 0 <= self.public_fraction < 1:
      fail("public_fraction", "must be in [0, 1)")
    if not 0 <= self.validation_fraction < 1:
      fail("validation_fraction", "must be in [0, 1)")
    if self.num_classes is not None and (
        isinstance(self.num_classes, bool) or
        not isinstance(self.num_classes, int) or self.num_classes < 2):
      fail("num_classes", "must be an integer >= 2 (or unset)")
    if self.public_fraction > 0 and self.public_dataset is not None:
      raise ValueError("give at most one of --public_dataset and "
                       "--public_fraction")
    if not (isinstance(self.public_pretrain_epochs, int) and
            self.public_pretrain_epochs >= 0):
      fail("public_pretrain_epochs", "must be an integer >= 0")
    has_public = self.public_dataset is not None or self.public_fraction > 0
    if self.public_pretrain_epochs and not has_public:
      fail("public_pretrain_epochs",
           "needs public data: --public_dataset or --public_fraction")
    if (self.prune is not None and self.prune.uses_public_data and
        not has_public):
      raise ValueError(
          f"--prune_method={self.prune.method!r} needs public data: give "
          "--public_dataset or --public_fraction")
    for name in ("seed", "noise_seed"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or
                                not isinstance(value, int)):
        fail(name, "must be an integer")
    if not isinstance(self.nonprivate_metrics, bool):
      fail("nonprivate_metrics", "must be True or False")
    if not (isinstance(self.eval_batch_size, int) and
            self.eval_batch_size >= 1):
      fail("eval_batch_size", "must be an integer >= 1")
    if self.physical_batch_size is not None and not (
        isinstance(self.physical_batch_size, int) and
        not isinstance(self.physical_batch_size, bool) and
        self.physical_batch_size >= 1):
      fail("physical_batch_size", "must be an integer >= 1 (or unset)")
    if not isinstance(self.jit_compile, bool):
      fail("jit_compile", "must be True or False")
    if self.mixed_precision not in (None, "mixed_bfloat16", "mixed_float16"):
      fail("mixed_precision", "must be unset, 'mixed_bfloat16' or "
           "'mixed_float16'")

  def to_dict(self):
    out = dataclasses.asdict(self)
    out["prune"] = None if self.prune is None else self.prune.to_dict()
    return out
