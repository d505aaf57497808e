"""Per-example gradients of any layer: a vectorized per-example VJP of the layer.

For a layer without a dedicated sampler, the wrapper records the layer's call
arguments and its output `z`. The optimizer's single backward pass gives
`delta = dL/dz`, whose row i depends only on example i; the per-example
gradients of the layer's own weights are then

    g_i = VJP_theta(layer at example i)(delta_i),

computed for all i at once with `tf.vectorized_map` (pfor) over a batch-of-one
call of the layer alone — not of the model — so the cost is O(B) recomputation
of one layer while the rest of the model keeps its fast samplers. Keras RNNs
are unrolled for the recompute when their time dimension is static (pfor
cannot vectorize the gradient of their while loops); if pfor still fails, a
sequential `tf.map_fn` (O(B), slower) is used and a warning names the layer.

Dropout inside the layer draws new masks in the recompute: the per-example
gradient is then that of another dropout realization. Clipping still bounds
each example's contribution (privacy holds); only the gradient is noisier.
"""

from typing import Dict

from absl import logging

from tfdpprune.core import engines
from tfdpprune.core import samplers
from tfdpprune.core import variables as variables_lib
from tfdpprune.core._tf import tf


def generic_roles(layer) -> Dict[str, tf.Variable]:
  """The layer's trainable variables by role: the variable's name relative to
  the layer (e.g. "forward_lstm/lstm_cell/kernel"), unique."""
  out = {}
  prefix = layer.name + "/"
  for var in layer.trainable_weights:
    name = variables_lib.name(var)  # Keras 3: the path, with parents
    if name.startswith(prefix):
      name = name[len(prefix):]
    elif "/" + prefix in name:
      name = name[name.index("/" + prefix) + 1 + len(prefix):]
    key, i = name, 1
    while key in out:
      key, i = f"{name}_{i}", i + 1
    out[key] = var
  return out


def _is_rnn(layer) -> bool:
  """A Keras RNN layer (`tf_keras` or Keras 3): a subclass of `RNN`."""
  return any(c.__name__ == "RNN" for c in type(layer).__mro__)


class _UnrolledRNNs:
  """Context: Keras RNN sublayers unrolled for the recompute.

  Not for `go_backwards` with `zero_output_for_mask`: Keras' unrolled loop
  returns other outputs there than its while loop (TF 2.21), so those keep
  the while loop (and the sequential fallback).
  """

  def __init__(self, layer):
    self.rnns = [l for l in layer._flatten_layers(include_self=True)  # pylint: disable=protected-access
                 if _is_rnn(l) and not (
                     l.go_backwards and getattr(l, "zero_output_for_mask",
                                                False))]
    self.saved = []

  def __enter__(self):
    for rnn in self.rnns:
      self.saved.append((rnn, rnn.unroll,
                         rnn.__dict__.get("_could_use_gpu_kernel")))
      object.__setattr__(rnn, "unroll", True)
      if "_could_use_gpu_kernel" in rnn.__dict__:
        object.__setattr__(rnn, "_could_use_gpu_kernel", False)
    return self

  def __exit__(self, *exc):
    for rnn, unroll, gpu in self.saved:
      object.__setattr__(rnn, "unroll", unroll)
      if gpu is not None:
        object.__setattr__(rnn, "_could_use_gpu_kernel", gpu)


def _pair(t):
  """`[2, ...]`: the example twice (see `GenericSampler._grads`)."""
  return tf.stack([t, t])


def _split_batched(structure, batch):
  """(batched tensors, rebuild fn): tensors whose leading dim is `batch`;
  rebuild maps per-example slices to batches of two copies."""
  flat = tf.nest.flatten(structure)
  batched_idx = [i for i, t in enumerate(flat)
                 if isinstance(t, tf.Tensor) and t.shape.rank and
                 t.shape[0] is not None and t.shape[0] == batch]
  if batch is None:  # dynamic batch: any tensor of rank >= 1
    batched_idx = [i for i, t in enumerate(flat)
                   if isinstance(t, tf.Tensor) and t.shape.rank]

  def rebuild(values):
    out = list(flat)
    for i, v in zip(batched_idx, values):
      out[i] = _pair(v)
    return tf.nest.pack_sequence_as(structure, out)
  return [flat[i] for i in batched_idx], rebuild


class GenericSampler(samplers.Sampler):
  """Any layer with weights: a vectorized per-example VJP of the layer."""

  name = "generic per-layer VJP (vectorized)"

  def roles(self, layer):
    return generic_roles(layer)

  def forward(self, layer, inputs, *args, **kwargs):
    outputs = layer(inputs, *args, **kwargs)
    call = {"args": (inputs,) + tuple(args), "kwargs": kwargs}
    return outputs, call, outputs

  def per_example(self, layer, captures, masks):
    roles = self.roles(layer)
    names = [r for r in roles if r in masks]
    total = self.example_grads(layer, captures, [roles[r] for r in names])
    results = {name: engines.materialized_engine(g, masks[name])
               for name, g in zip(names, total)}
    return engines.combine(results)

  def example_grads(self, layer, captures, variables):
    """`[B, *var.shape]` per-example gradients of `variables` summed over
    the recorded calls `[(capture, delta)]`."""
    total = None
    for capture, delta in captures:
      grads = self._grads(layer, capture, delta, variables)
      total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return total

  def _grads(self, layer, capture, delta, variables):
    """`[B, *var.shape]` per-example gradients for one recorded call."""
    z = capture.outputs
    # Cotangents in the outputs' dtype (float16 / bfloat16 under mixed
    # precision); the gradients of the (float32) variables are float32.
    deltas = [tf.zeros_like(t) if d is None else tf.cast(d, t.dtype)
              for t, d in zip(tf.nest.flatten(z), tf.nest.flatten(delta))]
    batch = tf.nest.flatten(z)[0].shape[0]
    call = capture.inputs
    elems, rebuild = _split_batched(call, batch)
    n_in = len(elems)

    def one(values):
      example = rebuild(values[:n_in])
      with tf.GradientTape() as tape:
        out = layer(*example["args"], **example["kwargs"])
      # A batch of two copies with cotangents (delta_i, 0) gives example
      # i's VJP exactly; a batch of one would make pfor emit batch-matmuls
      # with a size-1 batch axis, which crash TF 2.21's oneDNN kernels.
      grads = tape.gradient(
          tf.nest.flatten(out), variables,
          output_gradients=[tf.stack([d, tf.zeros_like(d)])
                            for d in values[n_in:]],
          unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return [tf.cast(g, tf.float32) for g in grads]

    with _UnrolledRNNs(layer):
      try:
        return tf.vectorized_map(one, elems + deltas)
      except (TypeError, ValueError, NotImplementedError) as e:
        logging.warning(
            "tdp per-example gradients of layer %r (%s): vectorization "
            "failed (%s); using a sequential per-example loop (correct, "
            "slower). Give it a dedicated sampler "
            "(tfdpprune.samplers.register_sampler) or freeze it.",
            layer.name, type(layer).__name__, str(e).splitlines()[-1][:200])
        dtypes = [tf.float32] * len(variables)
        return tf.map_fn(one, elems + deltas, fn_output_signature=dtypes)


GENERIC = GenericSampler()
