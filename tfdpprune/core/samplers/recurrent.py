"""Per-example gradients of LSTM, GRU, SimpleRNN and Bidirectional layers.

The wrapper runs the recurrence itself (the cells' exact math, on Keras'
`backend.rnn`, so masks, `go_backwards`, `return_sequences`/`return_state`
and `zero_output_for_mask` behave as in Keras) with the input projection
moved out of the loop:

    A = X W + b                  [B, T, G]   outside the loop
    z_t = A_t + h_{t-1} U        inside the loop

`A` is a tensor of the outer graph, so the optimizer's single backward pass
gives `delta_t = dL/dA_t = dL/dz_t` for every step at once, and each step also
outputs the `h_{t-1}` it used. Per-example gradients then follow without any
per-example backward pass:

    dW_i = sum_t x_it (x) delta_it,   dU_i = sum_t h_i,t-1 (x) delta_it,
    db_i = sum_t delta_it

(einsums over time, or ghost norms when cheaper; `linear_engine`). GRU's
candidate uses the reset gate on the recurrent term, so its recurrent
gradients use `r_t * delta_t` (reset_after) or `r_t * h_{t-1}` (reset
before), with `r_t` output by the step as well.

Supported: no dropout / recurrent dropout, not stateful, batch-major inputs,
dense (not ragged) inputs. Other configurations use the generic sampler.
"""

from typing import Dict, Optional

from tfdpprune.core import engines
from tfdpprune.core import samplers
from tfdpprune.core._tf import tf

_LSTM, _GRU, _SIMPLE = "lstm", "gru", "simple_rnn"
_KINDS = {"LSTM": _LSTM, "GRU": _GRU, "SimpleRNN": _SIMPLE}
_CELLS = {_LSTM: "LSTMCell", _GRU: "GRUCell", _SIMPLE: "SimpleRNNCell"}
_KERAS_PACKAGES = ("tf_keras", "keras")


def _package(obj) -> str:
  return type(obj).__module__.split(".")[0]


def _kind(layer) -> Optional[str]:
  """"lstm" / "gru" / "simple_rnn" for Keras' own classes, else None."""
  if _package(layer) not in _KERAS_PACKAGES:
    return None
  return _KINDS.get(type(layer).__name__)


def _supports(layer) -> Optional[str]:
  kind = _kind(layer)
  if kind is None:
    return f"{type(layer).__name__} is not LSTM, GRU or SimpleRNN"
  cell = layer.cell
  if (type(cell).__name__ != _CELLS[kind] or
      _package(cell) != _package(layer)):
    return f"custom cell {type(cell).__name__}"
  if layer.stateful:
    return "stateful RNN"
  if getattr(layer, "time_major", False):
    return "time_major inputs"
  if cell.dropout or cell.recurrent_dropout:
    return "dropout / recurrent_dropout"
  return None


def _dot(x, w):
  return tf.tensordot(x, tf.cast(w, x.dtype), axes=[[x.shape.rank - 1], [0]])


class _Recurrence:
  """The forward pass of one LSTM / GRU / SimpleRNN layer, with captures.

  `rnn` is the front end's Keras loop (`backend.rnn`: the exact semantics of
  masks, `go_backwards` and `zero_output_for_mask` of that Keras version).
  """

  def __init__(self, layer, rnn=None):
    self.layer = layer
    self.rnn = rnn
    self.kind = _kind(layer)
    self.cell = layer.cell
    self.units = self.cell.units

  def roles(self) -> Dict[str, tf.Variable]:
    out = {"kernel": self.cell.kernel,
           "recurrent_kernel": self.cell.recurrent_kernel}
    if self.cell.use_bias:
      out["bias"] = self.cell.bias
    return out

  def _input_projection(self, x):
    cell = self.cell
    a = _dot(x, cell.kernel)
    if cell.use_bias:
      bias = cell.bias
      if self.kind == _GRU and cell.reset_after:
        bias = bias[0]
      a = a + tf.cast(bias, a.dtype)
    return a

  def _step(self):
    cell, units = self.cell, self.units
    act, rec_act = cell.activation, getattr(cell, "recurrent_activation",
                                            None)
    u = cell.recurrent_kernel
    kind = self.kind

    def lstm(a_t, states):
      h, c = states
      z = a_t + tf.matmul(h, tf.cast(u, h.dtype))
      z0, z1, z2, z3 = tf.split(z, 4, axis=-1)
      c_new = rec_act(z1) * c + rec_act(z0) * act(z2)
      h_new = rec_act(z3) * act(c_new)
      return tf.concat([h_new, h], -1), [h_new, c_new]

    def simple(a_t, states):
      h = states[0]
      h_new = act(a_t + tf.matmul(h, tf.cast(u, h.dtype)))
      return tf.concat([h_new, h], -1), [h_new]

    def gru(a_t, states):
      h = states[0]
      x_z, x_r, x_h = tf.split(a_t, 3, axis=-1)
      uc = tf.cast(u, h.dtype)
      if cell.reset_after:
        inner = tf.matmul(h, uc)
        if cell.use_bias:
          inner = inner + tf.cast(cell.bias[1], h.dtype)
        rec_z, rec_r, rec_h = tf.split(inner, 3, axis=-1)
        z = rec_act(x_z + rec_z)
        r = rec_act(x_r + rec_r)
        rec_h = r * rec_h
      else:
        inner = tf.matmul(h, uc[:, :2 * units])
        rec_z, rec_r = tf.split(inner, 2, axis=-1)
        z = rec_act(x_z + rec_z)
        r = rec_act(x_r + rec_r)
        rec_h = tf.matmul(r * h, uc[:, 2 * units:])
      hh = act(x_h + rec_h)
      h_new = z * h + (1 - z) * hh
      return tf.concat([h_new, h, r], -1), [h_new]

    return {_LSTM: lstm, _GRU: gru, _SIMPLE: simple}[kind]

  def run(self, inputs, mask=None, initial_state=None):
    """`(keras outputs, a, z)` of the layer on `inputs`."""
    layer, units = self.layer, self.units
    if isinstance(mask, (list, tuple)):
      mask = mask[0]
    x = tf.cast(inputs, self.cell.kernel.dtype)
    a = self._input_projection(x)
    if initial_state is None:
      zeros = tf.zeros([tf.shape(x)[0], units], a.dtype)
      states = [zeros, zeros] if self.kind == _LSTM else [zeros]
    else:
      states = list(initial_state) if isinstance(
          initial_state, (list, tuple)) else [initial_state]
      states = [tf.cast(s, a.dtype) for s in states]
    last, outputs, new_states = self.rnn(
        self._step(), a, states, go_backwards=layer.go_backwards, mask=mask,
        unroll=layer.unroll, input_length=x.shape[1], time_major=False,
        zero_output_for_mask=layer.zero_output_for_mask,
        return_all_outputs=True)
    output = outputs[..., :units] if layer.return_sequences else (
        last[..., :units])
    keras_out = [output] + list(new_states) if layer.return_state else output
    # Per-step values in input (time) order, for the per-example sums.
    steps = tf.reverse(outputs, [1]) if layer.go_backwards else outputs
    steps = tf.stop_gradient(steps)
    captured = {"x": x, "h_prev": steps[..., units:2 * units]}
    if self.kind == _GRU:
      captured["r"] = steps[..., 2 * units:]
    return keras_out, captured, a

  def per_example(self, calls, masks, prefix=""):
    """`{role: LayerResult}` from `[(captured, dL/dA)]`, one per call (a
    layer called several times sums over all calls' time steps)."""
    cell, units = self.cell, self.units

    def joined(key):
      return tf.concat([c[key] for c, _ in calls], axis=1)
    x, h_prev = joined("x"), joined("h_prev")
    delta = tf.concat([tf.cast(d, x.dtype) for _, d in calls], axis=1)
    positions = x.shape[1] if len(calls) == 1 else None
    results = {}

    def mask(role):
      return masks.get(prefix + role)

    if mask("kernel") is not None:
      results[prefix + "kernel"] = engines.linear_engine(
          x, delta, mask("kernel"), cell.kernel.shape, positions)
    rec_delta = delta
    if self.kind == _GRU:
      r = joined("r")
      d_zr, d_h = delta[..., :2 * units], delta[..., 2 * units:]
      if cell.reset_after:
        rec_delta = tf.concat([d_zr, r * d_h], -1)
    if mask("recurrent_kernel") is not None:
      if self.kind == _GRU and not cell.reset_after:
        g = tf.concat([tf.einsum("btu,btg->bug", h_prev, d_zr),
                       tf.einsum("btu,btg->bug", r * h_prev, d_h)], -1)
        results[prefix + "recurrent_kernel"] = engines.materialized_engine(
            g, mask("recurrent_kernel"))
      else:
        results[prefix + "recurrent_kernel"] = engines.linear_engine(
            h_prev, rec_delta, mask("recurrent_kernel"),
            cell.recurrent_kernel.shape, positions)
    if cell.use_bias and mask("bias") is not None:
      g = tf.reduce_sum(delta, axis=1)
      if self.kind == _GRU and cell.reset_after:
        g = tf.stack([g, tf.reduce_sum(rec_delta, axis=1)], axis=1)
      results[prefix + "bias"] = engines.materialized_engine(
          g, mask("bias"))
    return results


class _RNNSampler(samplers.Sampler):
  """A sampler that runs recurrences with its front end's `backend.rnn`."""

  def __init__(self, rnn):
    self.rnn = rnn

  def recurrence(self, layer):
    return _Recurrence(layer, self.rnn)


class RecurrentSampler(_RNNSampler):
  """LSTM / GRU / SimpleRNN: einsums over time of captured projections."""

  name = "recurrent: input projection outside the loop, einsum over time"

  def supports(self, layer):
    return _supports(layer)

  def roles(self, layer):
    return self.recurrence(layer).roles()

  def forward(self, layer, inputs, *args, mask=None, training=None,
              initial_state=None, **kwargs):
    del training, kwargs
    if args:
      raise TypeError(f"{layer.name}: unexpected positional arguments")
    if isinstance(inputs, (list, tuple)):  # Keras passes [x, *states]
      inputs, states = inputs[0], list(inputs[1:])
      initial_state = initial_state or states or None
    return self.recurrence(layer).run(inputs, mask, initial_state)

  def per_example(self, layer, captures, masks):
    return engines.combine(self.recurrence(layer).per_example(
        [(c.inputs, tf.zeros_like(c.outputs) if d is None else d)
         for c, d in captures], masks))


class BidirectionalSampler(_RNNSampler):
  """Bidirectional of LSTM / GRU / SimpleRNN: both directions' samplers."""

  name = ("bidirectional recurrent: input projections outside the loop, "
          "einsum over time")

  def supports(self, layer):
    for sub in (layer.forward_layer, layer.backward_layer):
      why = _supports(sub)
      if why is not None:
        return why
    if getattr(layer, "_num_constants", 0):
      return "constants"
    return None

  def roles(self, layer):
    out = {}
    for prefix, sub in (("forward/", layer.forward_layer),
                        ("backward/", layer.backward_layer)):
      out.update({prefix + r: v for r, v in self.recurrence(sub).roles().items()})
    return out

  def forward(self, layer, inputs, *args, training=None, mask=None,
              initial_state=None, constants=None, **kwargs):
    del training, constants, kwargs
    if args:
      raise TypeError(f"{layer.name}: unexpected positional arguments")
    if isinstance(inputs, (list, tuple)):  # Keras passes [x, *states]
      inputs, states = inputs[0], list(inputs[1:])
      initial_state = initial_state or states or None
    forward_state = backward_state = None
    if initial_state is not None:
      half = len(initial_state) // 2
      forward_state, backward_state = (initial_state[:half],
                                       initial_state[half:])
    y, a_fwd, z_fwd = self.recurrence(layer.forward_layer).run(
        inputs, mask, forward_state)
    y_rev, a_bwd, z_bwd = self.recurrence(layer.backward_layer).run(
        inputs, mask, backward_state)
    if layer.return_state:
      states = y[1:] + y_rev[1:]
      y, y_rev = y[0], y_rev[0]
    if layer.return_sequences:
      y_rev = tf.reverse(y_rev, [1])
    mode = layer.merge_mode
    if mode == "concat":
      output = tf.concat([y, y_rev], -1)
    elif mode == "sum":
      output = y + y_rev
    elif mode == "ave":
      output = (y + y_rev) / 2
    elif mode == "mul":
      output = y * y_rev
    else:
      output = [y, y_rev]
    if layer.return_state:
      output = (output + states) if mode is None else [output] + states
    return output, {"forward": a_fwd, "backward": a_bwd}, (z_fwd, z_bwd)

  def per_example(self, layer, captures, masks):
    results = {}
    for i, (direction, sub) in enumerate((("forward", layer.forward_layer),
                                          ("backward", layer.backward_layer))):
      calls = [(c.inputs[direction],
                tf.zeros_like(c.outputs[i]) if d[i] is None else d[i])
               for c, d in captures]
      results.update(self.recurrence(sub).per_example(
          calls, masks, prefix=direction + "/"))
    return engines.combine(results)
