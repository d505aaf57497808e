r"""Dirichlet pruning: how important each output unit is, learned on public data.

Kamil Adamczewski and Mijung Park, "Dirichlet Pruning for Neural Network
Compression", AISTATS 2021. For each gated layer l with n output units
(units of a Dense layer, output channels of a convolution), a random vector
phi ~ Dir(alpha) on the simplex multiplies the layer's outputs, unit by unit
(broadcast on the last axis), normalized so that every unit's scale has
mean 1 under q = Dir(alpha):

    y_j  ->  (phi_j / E_q[phi_j]) * y_j,     E_q[phi_j] = alpha_j / sum(alpha)

With the network's weights held fixed, variational inference learns the
concentrations alpha by maximizing

    sum_{(x, y) public} E_q[log p(y | x, phi)]
    - sum_l KL(Dir(alpha_l) || Dir(prior, ..., prior)),

estimated at every step on a batch of B public examples with one
reparameterized sample per layer and example (B samples per step, at the
cost of one): the mean log-likelihood minus KL / N_public. A Dirichlet
sample is a vector of Gamma(alpha_j, 1) variates divided by their sum;
TensorFlow differentiates Gamma samples with respect to alpha (implicit
reparameterization). The importance of unit j is its posterior mean
alpha_j / sum(alpha); a layer's lowest units are pruned.

Why mean 1 per unit: the gated network equals the trained one in
expectation, and the data term measures only what the multiplicative noise
on each unit costs, whose relative size, sqrt((a0 - a_j) / (a_j (a0 + 1))),
falls as alpha_j grows. Units that matter raise their concentration; a unit
that carries nothing has no reason to, and is pushed down through the sum
a0. The gate `n * phi` (mean 1 only on average over units) ties a unit's
mean scale to its share, so a larger share also means more absolute noise:
on our public-data check (the tutorial CNN pre-trained on 1,200 public
Fashion-MNIST examples) its importances had Spearman correlation -0.24 to
-0.73 per layer with the loss increase from removing each unit, ranking
units backwards; the mean-1 gate gave +0.39 to +0.84 (weight magnitude:
+0.28 to +0.55; one epoch of inference each). The price: through E_q[phi],
the gated model depends on alpha itself, so the objective is a variational
objective in the manner of variational dropout's mean-1 multiplicative
noise rather than the ELBO of a model fixed in advance.

Cost: `epochs * max(1, N_public // B)` steps, each one forward and backward
pass of the fixed network on B public examples, with Adam on log(alpha)
(started at the prior). Only `public_data` is read; the batch order and the
Dirichlet samples come from public streams derived from the `PruneConfig`
seed (`randomness.PUBLIC_BATCHES`, `randomness.DIRICHLET`), so importances
are a function of (seed, public data, weights).

The layers producing the model's outputs are never gated: their units are
the model's outputs (e.g. the classes), not features to prune.
"""

import functools
from typing import List, Sequence

from absl import logging
import numpy as np

from tfdpprune import frontends
from tfdpprune import public
from tfdpprune.core import randomness
from tfdpprune.core._tf import tf
from tfdpprune.config import DirichletSettings


def sample(alpha, seed, num=1) -> tf.Tensor:
  """`[num, n]` reparameterized samples of Dir(alpha) (normalized Gamma
  variates)."""
  gammas = tf.random.stateless_gamma([num, tf.size(alpha)], seed, alpha=alpha)
  gammas = tf.maximum(gammas, np.finfo(np.float32).tiny)
  return gammas / tf.reduce_sum(gammas, axis=1, keepdims=True)


def kl_divergence(alpha, prior) -> tf.Tensor:
  """KL(Dir(alpha) || Dir(prior, ..., prior)), closed form."""
  alpha = tf.convert_to_tensor(alpha, tf.float32)
  n = tf.cast(tf.size(alpha), tf.float32)
  total = tf.reduce_sum(alpha)
  return (tf.math.lgamma(total) - tf.reduce_sum(tf.math.lgamma(alpha))
          - tf.math.lgamma(n * prior) + n * tf.math.lgamma(prior)
          + tf.reduce_sum((alpha - prior) *
                          (tf.math.digamma(alpha) - tf.math.digamma(total))))


def gated_layers(model, candidates: Sequence[object]) -> list:
  """The `candidates` Dirichlet pruning gates: all but the layers producing
  `model`'s outputs."""
  outputs = set(model.output_names)
  return [l for l in candidates if l.name not in outputs]


@functools.lru_cache(maxsize=None)
def _gate_class(keras):
  """The gate layer class of one Keras (a `Layer` subclass of it)."""

  class Gate(keras.layers.Layer):
    """`layer`'s outputs times `scale`, `[batch, units]` (one sample per
    example), which the inference sets before each call of the gated model
    (inside the same trace)."""

    def __init__(self, layer, units: int):
      super().__init__(name=f"dirichlet_gate_{layer.name}")
      self.inner = layer
      self.units = units
      object.__setattr__(self, "scale", tf.ones([1, units]))

    def call(self, inputs):
      if getattr(self.inner, "data_format", None) == "channels_first":
        raise ValueError(
            f"Dirichlet pruning gates the last axis of layer "
            f"{self.inner.name!r}, which is channels_first: use "
            "channels_last, or leave the layer out with PruneConfig.layers")
      outputs = self.inner(inputs)
      if outputs.shape[-1] != self.units:
        raise ValueError(
            f"layer {self.inner.name!r} ({type(self.inner).__name__}) has "
            f"{outputs.shape[-1]} outputs on its last axis but its pruned "
            f"variables have {self.units} units: Dirichlet pruning gates "
            "output units one to one. Leave it out with PruneConfig.layers")
      shape = tf.concat([tf.shape(self.scale)[:1],
                         tf.ones([outputs.shape.rank - 2], tf.int32),
                         [self.units]], 0)
      return outputs * tf.cast(tf.reshape(self.scale, shape), outputs.dtype)

    def compute_output_shape(self, input_shape):
      return self.inner.compute_output_shape(input_shape)

  return Gate


def importances(model, layers: Sequence[object], units: Sequence[int],
                public_data, settings: DirichletSettings, *, batch_size: int,
                seed: int) -> List[np.ndarray]:
  """Posterior-mean importances of the output units of `layers`.

  Args:
    model: a Keras model whose forward pass records nothing for the DP
      optimizer (e.g. `tdp.strip(model)`); its weights are not changed.
    layers: layers of `model` to gate (e.g. from `gated_layers`).
    units: the number of output units of each layer.
    public_data: public examples, `(x, y)` or a `tf.data` dataset; never the
      private training data.
    settings: `PruneConfig.effective_dirichlet` (epochs, learning rate,
      prior).
    batch_size: public examples per step.
    seed: the `PruneConfig` seed (public streams).

  Returns:
    One array per layer, `alpha / sum(alpha)` (sums to 1).
  """
  x, y = public.as_arrays(public_data)
  batches = public.PublicBatches(
      x, y, batch_size, randomness.derived_key(seed, randomness.PUBLIC_BATCHES))
  fe = frontends.of(model)
  gate = _gate_class(fe.keras)
  gates = {id(l): gate(l, n) for l, n in zip(layers, units)}
  gated = fe.clone_model(model, lambda l: gates.get(id(l), l))
  gates = [gates[id(l)] for l in layers]
  loss = public.loss_fn(model)
  key = randomness.derived_key(seed, randomness.DIRICHLET)
  prior = settings.prior
  scale = 1.0 / batches.batch_size
  kl_weight = 1.0 / batches.num_examples

  @tf.function
  def objective_and_grads(step, raws):
    with tf.GradientTape() as tape:
      tape.watch(raws)
      alphas = [tf.exp(r) for r in raws]
      xb, yb = batches.batch(step)
      for j, (gate, alpha) in enumerate(zip(gates, alphas)):
        phi = sample(alpha, randomness.step_seed(key, step, j),
                     batches.batch_size)
        object.__setattr__(gate, "scale", phi * (tf.reduce_sum(alpha) / alpha))
      nll = loss(yb, gated(xb, training=False)) * scale
      kl = tf.add_n([kl_divergence(a, prior) for a in alphas])
      value = nll + kl * kl_weight
    return value, tape.gradient(value, raws)

  # Adam on log(alpha), started at the prior.
  raw0 = float(np.log(prior))
  raws = [tf.fill([n], raw0) for n in units]
  m = [tf.zeros_like(r) for r in raws]
  v = [tf.zeros_like(r) for r in raws]
  b1, b2, eps, lr = 0.9, 0.999, 1e-8, settings.learning_rate
  steps = settings.epochs * batches.batches_per_epoch
  value = float("nan")
  for t in range(steps):
    value, grads = objective_and_grads(tf.constant(t, tf.int64), raws)
    m = [b1 * a + (1 - b1) * g for a, g in zip(m, grads)]
    v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, grads)]
    c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    raws = [r - lr * (a / c1) / (tf.sqrt(b / c2) + eps)
            for r, a, b in zip(raws, m, v)]
  logging.info("Dirichlet pruning: %d public steps (batch %d), final "
               "negative ELBO per example %.4f", steps, batches.batch_size,
               float(value))
  out = []
  for r in raws:
    alpha = tf.exp(r).numpy().astype(np.float64)
    out.append((alpha / alpha.sum()).astype(np.float32))
  return out
