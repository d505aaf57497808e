"""`prune`, `strip` and the public-data entry points, for either Keras.

`prune(model)` wraps every layer with trainable weights of a Sequential or
functional model (Keras 2 or Keras 3) in its front end's `PruneWrapper`
(`tfdpprune.wrapping`): the same layer and variable objects, every call
recorded for per-example gradients, masks as non-trainable weights. A
`PruneConfig` then sets freeze masks (once, here) or select masks (re-drawn
in the training step). Public data reach masks only through `prune(...,
public_data=...)` and `attach_public_data`, never through the private
training data.
"""

from typing import Optional

from absl import logging

from tfdpprune import config as config_lib
from tfdpprune import dirichlet
from tfdpprune import frontends
from tfdpprune import public
from tfdpprune import wrapping
from tfdpprune.core import masks
from tfdpprune.core import randomness
from tfdpprune.core import recording
from tfdpprune.core import samplers as samplers_lib
from tfdpprune.core import validation
from tfdpprune.core import variables as variables_lib
from tfdpprune.keras2.wrapper import PruneWrapper  # tdp.PruneWrapper (Keras 2)

choose_sampler = wrapping.choose_sampler


def wrapper_of(var) -> Optional[wrapping.WrapperMixin]:
  """The (first) wrapper owning variable `var`, or None."""
  owners = recording.owners_of(var)
  return owners[0] if owners else None


def is_wrapper(layer) -> bool:
  return isinstance(layer, wrapping.WrapperMixin)


def supported_layer_names():
  """Layer classes with a dedicated (fast) sampler."""
  return sorted({cls.__name__ for cls in samplers_lib.supported_layer_classes()})


def _nested_graph_model(fe, layer) -> bool:
  return fe.is_model(layer) and fe.is_graph_model(layer)


def report(model):
  """`[(layer name, layer class, sampler)]` of the wrapped layers of `model`
  (nested models included), and of layers with weights left unwrapped
  (sampler "NOT WRAPPED: ...")."""
  fe = frontends.of(model)
  out = []
  for layer in model.layers:
    if is_wrapper(layer):
      out.append((layer.layer.name, type(layer.layer).__name__,
                  layer.sampler.name))
    elif _nested_graph_model(fe, layer):
      out.extend(report(layer))
    elif layer.trainable_weights:
      out.append((layer.name, type(layer).__name__,
                  "NOT WRAPPED: the whole-model per-example fallback"))
  return out


def _wrap_model(fe, model, wrap_fn):
  if not fe.is_graph_model(model):
    raise ValueError(
        "tdp.prune supports Sequential and functional Keras models (their "
        f"layers are wrapped one by one); {model.name!r} is a subclassed "
        f"{type(model).__name__}. Build it with the functional API or "
        "keras.Sequential for the fast per-layer path; DP training still "
        "works on it unwrapped, through the slower whole-model per-example "
        "fallback.")
  validation.validate(model, strict=True)
  return fe.clone_model(model, wrap_fn)


def _holders(fe, model):
  """`{variable key: [layers holding it]}` over the layers with weights that
  would be wrapped or left alone (nested graph models walked)."""
  out = {}
  for layer in model.layers:
    if is_wrapper(layer):
      layer = layer.layer
    if _nested_graph_model(fe, layer):
      for key, users in _holders(fe, layer).items():
        out.setdefault(key, []).extend(users)
      continue
    for var in layer.trainable_weights:
      out.setdefault(variables_lib.key(var), []).append(layer)
  return out


def wrap(model, make_wrapper=None):
  """Wraps every layer with trainable weights; other layers are reused as is.

  Layers with a dedicated sampler use it; the others get the generic
  per-layer sampler, and so do layers that share a variable with another
  layer (their uses are summed per example before the norm). Nested
  Sequential / functional models are wrapped layer by layer. What was
  wrapped with which sampler is logged (and given by `report(model)`).

  Args:
    model: a built Sequential or functional model (Keras 2 or Keras 3).
    make_wrapper: `(layer, generic) -> PruneWrapper`, by default an unmasked
      wrapper of the model's front end.

  Returns:
    A new model over the same layers and variable objects.
  """
  fe = frontends.of(model)
  make_wrapper = make_wrapper or (
      lambda layer, generic: fe.wrapper_class(layer, generic=generic))
  holders = _holders(fe, model)
  tied = {key for key, users in holders.items()
          if len({id(u) for u in users}) > 1}

  def clone(layer):
    if is_wrapper(layer):
      return layer
    if _nested_graph_model(fe, layer):
      return _wrap_model(fe, layer, clone)
    if choose_sampler(layer) is None:
      return layer
    generic = any(variables_lib.key(v) in tied
                  for v in layer.trainable_weights)
    return make_wrapper(layer, generic)

  wrapped = _wrap_model(fe, model, clone)
  _mark_foreign(fe, wrapped)
  _log_report(wrapped)
  return wrapped


def _mark_foreign(fe, model):
  """Variables held by a layer that is not wrapped: their per-example
  gradients cannot come from the wrappers alone."""
  unwrapped = set()
  for layer in model.layers:
    if _nested_graph_model(fe, layer):
      _mark_foreign(fe, layer)
    elif not is_wrapper(layer):
      for var in layer.trainable_weights:
        unwrapped.add(variables_lib.key(var))
  for layer in model.layers:
    if is_wrapper(layer):
      for var in layer.layer.trainable_weights:
        if variables_lib.key(var) in unwrapped:
          recording.mark_foreign(var)


def _log_report(model):
  rows = report(model)
  if rows:
    logging.info("tdp.prune: %d layers with weights:\n%s", len(rows),
                 "\n".join(f"  {n} ({c}): {s}" for n, c, s in rows))
  slow = [f"{n} ({c})" for n, c, s in rows if s.startswith("generic")]
  if slow:
    logging.warning(
        "tdp.prune: %s use the generic per-layer sampler (a vectorized "
        "per-example VJP of the layer: O(B), but slower than a dedicated "
        "sampler). To speed them up, freeze them (PruneConfig(mode='freeze', "
        "granularity='layer', scope='global', layers='<name regex>') or "
        "layer.trainable = False) or register a dedicated sampler "
        "(tfdpprune.per_example.register_sampler).", ", ".join(slow))
  unwrapped = [f"{n} ({c})" for n, c, s in rows if s.startswith("NOT")]
  if unwrapped:
    logging.warning(
        "tdp.prune: %s could not be wrapped (inside a subclassed model?): "
        "their variables send the whole model to the per-example fallback "
        "(about B times slower). Build those parts with the functional API, "
        "or freeze them.", ", ".join(unwrapped))


def strip(model):
  """A plain Keras model: wrappers removed, same layers and final weights.

  Masks gate updates, not the forward pass, so predictions are identical;
  the result is ready for `model.save` or SavedModel export. Nested models
  are stripped too. A Keras 3 private model (`tdp.make_private`) gives its
  stripped inner model.
  """
  inner = getattr(model, "private_model_of", None)
  if inner is not None:
    model = inner
  fe = frontends.of(model)

  def unwrap(layer):
    if is_wrapper(layer):
      return layer.layer
    if _nested_graph_model(fe, layer):
      return fe.clone_model(layer, unwrap)
    return layer
  return fe.clone_model(model, unwrap)


def wrappers(model):
  """The wrappers of `model` (and of nested models), in order."""
  return masks.masked_layers(model)


def prune(model, config=None, *, public_data=None):
  """Prepares `model` for masked DP training; returns the wrapped model.

  Args:
    model: a built Sequential or functional `tf_keras` model.
    config: a `PruneConfig` (freeze or select masks), or a sequence of them
      (e.g. a freeze and a select config: the updated set is their
      intersection); None only wraps the layers for fast per-example
      gradients, with every coordinate trained.
    public_data: public examples for the public-data mask methods
      (public_gradient, public_saliency, dirichlet): `(x, y)` arrays or a
      `tf.data` dataset of `(x, y)`, read once; never the private training
      data. Select-mode public methods keep it in memory to score every
      re-draw; a model loaded from a file gets it back with
      `attach_public_data`.

  Returns:
    A model over the same variable objects, with `PruneWrapper` layers.
  """
  if config is None:
    if public_data is not None:
      raise ValueError("public_data is only used with a PruneConfig whose "
                       "method is public_gradient, public_saliency or "
                       "dirichlet")
    return wrap(model)
  configs = ([config] if isinstance(config, config_lib.PruneConfig)
             else list(config))
  for c in configs:
    if not isinstance(c, config_lib.PruneConfig):
      raise TypeError(f"config must be a PruneConfig, got {type(c).__name__}")
  uses_public = [c for c in configs if c.uses_public_data]
  if public_data is not None and not uses_public:
    raise ValueError("public_data is only used by the public_gradient, "
                     "public_saliency and dirichlet methods")
  if uses_public:
    public_data = public.as_arrays(public_data)  # read once
  if not model.built:
    raise ValueError(
        "tdp.prune(model, config) needs a built model, since masks are chosen "
        "from its weights: start it with keras.Input(shape) or call "
        "model.build(input_shape) first")
  model = wrap(model)
  for c in configs:
    _add_masks(model, c, public_data)
  return model


def attach_public_data(model, public_data):
  """Gives the select-mode public methods of `model` their public data.

  `tdp.prune(..., public_data=...)` does this; a model loaded from a file
  (or restored into a model built without it) needs it before it trains on:
  each re-draw d of `PruneConfig(mode="select", method="public_gradient" |
  "public_saliency")` scores public batch d, which depends only on (seed,
  d, public data), so the same public data give the same re-draws.

  The model's traced train function (if any) is dropped, so that the next
  `fit` or `train_on_batch` traces one that scores these data.

  Args:
    model: a model from `tdp.prune` or `keras.models.load_model`.
    public_data: `(x, y)` arrays or a `tf.data` dataset; never private data.
  """
  owners = {}
  for w in wrappers(model):
    c = w.select_config
    if c is not None and c.method in config_lib.PUBLIC_GRADIENT_METHODS:
      owners.setdefault(c, []).append(w)
  if not owners:
    raise ValueError("attach_public_data: no layer of this model re-draws "
                     "its selection with a public-data method")
  x, y = public.as_arrays(public_data)
  scoring_model = strip(model)  # same variables, nothing recorded
  for c, ws in owners.items():
    key = randomness.derived_key(c.seed, randomness.PUBLIC_BATCHES)
    scorer = public.PublicScorer(scoring_model, public.PublicBatches(
        x, y, c.effective_public_batch_size, key))
    for w in ws:
      object.__setattr__(w, "public_scorer", scorer)
      w.set_select_config(c)  # rebuilds the selector with the scorer
  if getattr(model, "train_function", None) is not None:
    model.train_function = None  # traced with the previous (or no) scorer


def _add_masks(model, c, public_data):
  """Adds the masks of one `PruneConfig` to a wrapped model."""
  entries = masks.eligible(wrappers(model), c)
  if not entries:
    names = [w.layer.name for w in wrappers(model)]
    raise ValueError(f"PruneConfig.layers={c.layers!r} with weights="
                     f"{c.weights!r} selects no variable; supported layers "
                     f"of this model: {names}")
  if c.method == "dirichlet":
    _add_dirichlet_masks(model, c, entries, public_data)
    return
  kind = "freeze" if c.mode == "freeze" else "select"
  for w, role, _ in entries:
    w.add_masks(kind, [role], c.granularity)
  variables = [v for _, _, v in entries]
  if c.mode == "freeze":
    grads = (public.mean_gradients(model, variables, *public_data)
             if c.uses_public_data else None)
    for (w, role, var), m in zip(entries, masks.compute_masks(
        c, variables, public_grads=grads)):
      w.freeze_masks[role].assign(m)
      if c.effective_pruned == "zero":
        var.assign(var * m)
  else:
    for w, _, _ in entries:
      w.set_select_config(c)
    if c.uses_public_data:
      attach_public_data(model, public_data)
    masks.selectors(list({id(w): w for w, _, _ in entries}.values()))
    entries[0][0].selector.redraw(0)


def _add_dirichlet_masks(model, c, entries, public_data):
  """Freeze masks of whole output units ranked by Dirichlet pruning."""
  roles = {}
  for w, role, var in entries:
    roles.setdefault(w, []).append((role, var))
  plain = strip(model)  # the same layers and variables, nothing recorded
  gated = {id(l) for l in dirichlet.gated_layers(plain,
                                                 [w.layer for w in roles])}
  owners = [w for w in roles if id(w.layer) in gated]
  if not owners:
    raise ValueError(
        f"PruneConfig(method='dirichlet', layers={c.layers!r}) selects only "
        "layers producing the model's outputs, which Dirichlet pruning never "
        f"prunes; layers of this model: {[w.layer.name for w in roles]}")
  units = [int(roles[w][0][1].shape[-1]) for w in owners]
  found = dirichlet.importances(
      plain, [w.layer for w in owners], units, public_data,
      c.effective_dirichlet, batch_size=c.effective_public_batch_size,
      seed=c.seed)
  # Posterior means sum to 1 per layer; n * mean (1 = a uniform share)
  # compares units across layers of different widths (scope="global").
  layer_masks = masks.unit_masks(
      c, [n * f for n, f in zip(units, found)],
      [[v for _, v in roles[w]] for w in owners])
  for w, importance, ms in zip(owners, found, layer_masks):
    w.add_masks("freeze", [r for r, _ in roles[w]], "neuron")
    w.set_importance(importance)
    for (role, var), m in zip(roles[w], ms):
      w.freeze_masks[role].assign(m)
      if c.effective_pruned == "zero":
        var.assign(var * m)
