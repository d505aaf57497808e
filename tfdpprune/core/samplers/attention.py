"""Per-example gradients of EinsumDense and MultiHeadAttention layers.

EinsumDense computes `z = einsum("I,K->O", x, kernel) + bias`. Its kernel's
gradient is `einsum("I,O->K", x, delta)` summed over the batch, so with the
batch letter kept in the output the same einsum gives every example's
gradient at once: `einsum("I,O->bK", x, delta)` (b = the batch letter). The
bias gradient is `delta` summed over the axes the bias is broadcast along.

MultiHeadAttention is four EinsumDense projections (query, key, value,
output) around a softmax attention. The sampler runs the layer with its four
projections replaced by recorders for the duration of the call, so each
projection's input and pre-activation output are captured inside the real
Keras computation; their output gradients from the single backward pass then
give the per-example gradients of all four projections by the EinsumDense
rule above.
"""

import re
import string
from typing import Dict, List, Optional, Tuple

from tfdpprune.core import engines
from tfdpprune.core import samplers
from tfdpprune.core._tf import tf


def _expand_ellipsis(equation: str, input_rank: int) -> Tuple[str, str, str]:
  """`(I, K, O)` of an EinsumDense equation with "..." made explicit."""
  match = re.fullmatch(r"([a-zA-Z.]+),([a-zA-Z.]+)->([a-zA-Z.]+)",
                       equation.replace(" ", ""))
  if match is None:
    raise ValueError(f"cannot parse einsum equation {equation!r}")
  inp, ker, out = match.groups()
  if "..." in inp:
    used = set(inp + ker + out)
    free = [c for c in string.ascii_letters if c not in used]
    n = input_rank - (len(inp) - 3)
    letters = "".join(free[:n])
    inp, out = inp.replace("...", letters), out.replace("...", letters)
  return inp, ker, out


def _einsum_parts(layer, input_rank: int) -> Optional[Tuple[str, str, str]]:
  try:
    inp, ker, out = _expand_ellipsis(layer.equation, input_rank)
  except ValueError:
    return None
  if not inp or inp[0] != out[0] or inp[0] in ker:
    return None  # the batch axis must be the first input and output axis
  return inp, ker, out


def einsum_dense_results(layer, calls, masks, prefix=""):
  """`{role: LayerResult}` of an EinsumDense from `[(x, delta)]` calls."""
  results = {}
  kernel_mask = masks.get(prefix + "kernel")
  if kernel_mask is not None:
    g = None
    for x, delta in calls:
      inp, ker, out = _einsum_parts(layer, x.shape.rank)
      term = tf.einsum(f"{inp},{out}->{inp[0]}{ker}",
                       tf.cast(x, layer.kernel.dtype),
                       tf.cast(delta, layer.kernel.dtype))
      g = term if g is None else g + term
    results[prefix + "kernel"] = engines.materialized_engine(
        g, kernel_mask)
  bias_mask = masks.get(prefix + "bias")
  if layer.bias is not None and bias_mask is not None:
    shape = list(layer.bias.shape)
    g = None
    for _, delta in calls:
      delta = tf.cast(delta, layer.bias.dtype)
      lead = delta.shape.rank - 1 - len(shape)
      if lead > 0:
        delta = tf.reduce_sum(delta, axis=list(range(1, 1 + lead)))
      axes = [1 + j for j, s in enumerate(shape)
              if s == 1 and delta.shape[1 + j] != 1]
      if axes:
        delta = tf.reduce_sum(delta, axis=axes, keepdims=True)
      g = delta if g is None else g + delta
    results[prefix + "bias"] = engines.materialized_engine(g, bias_mask)
  return results


def _einsum_roles(layer, prefix="") -> Dict[str, tf.Variable]:
  out = {prefix + "kernel": layer.kernel}
  if layer.bias is not None:
    out[prefix + "bias"] = layer.bias
  return out


class EinsumDenseSampler(samplers.Sampler):
  """EinsumDense: `einsum("I,O->bK", x, delta)` per-example kernels."""

  name = "einsum dense: per-example einsum"

  def supports(self, layer):
    if not layer.built:
      return "not built"
    shape = getattr(layer, "_build_input_shape", None)
    rank = len(tf.TensorShape(shape)) if shape is not None else None
    if rank is not None and _einsum_parts(layer, rank) is None:
      return f"equation {layer.equation!r} mixes the batch axis"
    return None

  def roles(self, layer):
    return _einsum_roles(layer)

  def forward(self, layer, inputs, *args, **kwargs):
    outputs, z = samplers.without_activation(
        layer, inputs, *args, **kwargs)
    if _einsum_parts(layer, inputs.shape.rank) is None:
      raise ValueError(f"EinsumDense {layer.name!r}: equation "
                       f"{layer.equation!r} mixes the batch axis")
    return outputs, inputs, z

  def per_example(self, layer, captures, masks):
    return engines.combine(einsum_dense_results(
        layer, [(c.inputs, d) for c, d in captures], masks))


_PROJECTIONS = (("query", "_query_dense"), ("key", "_key_dense"),
                ("value", "_value_dense"), ("output", "_output_dense"))


class _Recorder:
  """Stands in for a projection during the call: runs it, records (x, z)."""

  def __init__(self, layer, records: List):
    self.layer = layer
    self.records = records

  def __call__(self, x, *args, **kwargs):
    outputs, z = samplers.without_activation(
        self.layer, x, *args, **kwargs)
    self.records.append((x, z))
    return outputs


class MultiHeadAttentionSampler(samplers.Sampler):
  """MultiHeadAttention: the four projections' per-example einsums."""

  name = "attention: per-example einsum per projection"

  def supports(self, layer):
    for _, attr in _PROJECTIONS:
      sub = getattr(layer, attr, None)
      if type(sub).__name__ != "EinsumDense":
        return f"projection {attr} is not an EinsumDense"
    return None

  def roles(self, layer):
    out = {}
    for name, attr in _PROJECTIONS:
      out.update(_einsum_roles(getattr(layer, attr), prefix=name + "/"))
    return out

  def forward(self, layer, *args, **kwargs):
    records = {name: [] for name, _ in _PROJECTIONS}
    saved = {attr: layer.__dict__[attr] for _, attr in _PROJECTIONS}
    try:
      for name, attr in _PROJECTIONS:
        object.__setattr__(layer, attr, _Recorder(saved[attr], records[name]))
      outputs = layer.call(*args, **kwargs)
    finally:
      for attr, sub in saved.items():
        object.__setattr__(layer, attr, sub)
    if any(len(r) != 1 for r in records.values()):
      raise ValueError(f"MultiHeadAttention {layer.name!r}: expected one "
                       "call of each projection")
    inputs = {name: r[0][0] for name, r in records.items()}
    zs = {name: r[0][1] for name, r in records.items()}
    return outputs, inputs, zs

  def per_example(self, layer, captures, masks):
    results = {}
    for name, attr in _PROJECTIONS:
      calls = [(c.inputs[name], tf.zeros_like(c.outputs[name])
                if d[name] is None else d[name]) for c, d in captures]
      results.update(einsum_dense_results(getattr(layer, attr), calls, masks,
                                          prefix=name + "/"))
    return engines.combine(results)
