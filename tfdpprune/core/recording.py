"""What the forward pass records for the DP step, and who owns a variable.

A front end's wrapper (`PruneWrapper` of `tf_keras` or Keras 3) records
every call of its layer in a `CaptureBuffer`: what the layer saw and its
pre-activation output, for the graph being traced. The DP step then finds,
for each selected variable, the wrapper(s) that own it (`owners_of`) and
their calls in its graph.

* Every call of a layer in one trace is kept (a layer called 100 times in a
  step has 100 captures): dropping calls would silently drop their part of
  the per-example gradient. Eagerly, calls accumulate until a DP step uses
  them (`take`); past `EAGER_LIMIT` unused calls the buffer is marked
  incomplete and the DP step falls back rather than miss a call.
* A variable may be owned by several wrappers (a tied embedding used by an
  `Embedding` and an output layer): all of them are listed, and the DP step
  sums the uses before taking norms. A variable also held by a layer that is
  not wrapped is marked `foreign`: its per-example gradient cannot come from
  the wrappers alone, so the step falls back to the whole-model jacobian.
"""

from typing import List, Optional
import weakref

from tfdpprune.core import variables
from tfdpprune.core._tf import tf

# Unused eager calls kept per layer before the buffer is marked incomplete.
EAGER_LIMIT = 4096


def current_graph():
  """The graph being traced, or None when executing eagerly."""
  if tf.executing_eagerly():
    return None
  return tf.compat.v1.get_default_graph()


class CaptureBuffer:
  """One wrapper's recorded calls for the graph being traced (or eagerly).

  A plain object (not a list attribute) so Keras does not track its tensors.
  Calls of another graph are dropped when a call of a new graph arrives.
  """

  def __init__(self):
    self.items = []
    self.complete = True

  def add(self, capture):
    if self.items and self.items[-1].graph is not capture.graph:
      self.items, self.complete = [], True
    self.items.append(capture)
    if capture.graph is None and len(self.items) > EAGER_LIMIT:
      del self.items[:-EAGER_LIMIT]
      self.complete = False

  def for_graph(self, graph) -> list:
    """The calls recorded in `graph` (None: eager), oldest first."""
    return [c for c in self.items if c.graph is graph]

  def take(self, graph) -> Optional[list]:
    """The calls of `graph`, removed from the buffer when eager (a step
    consumes them); None if some eager calls were dropped."""
    calls = self.for_graph(graph)
    if graph is None:
      complete, self.items, self.complete = self.complete, [], True
      if not complete:
        return None
    return calls


_OWNERS = {}       # variable key -> [weakref(wrapper)]
_FOREIGN = set()   # keys of variables also held by layers without a wrapper


def register_owner(var, wrapper) -> None:
  """Records that `wrapper` records calls that use `var`."""
  refs = _OWNERS.setdefault(variables.key(var), [])
  refs[:] = [r for r in refs if r() is not None and r() is not wrapper]
  refs.append(weakref.ref(wrapper))


def owners_of(var) -> List[object]:
  """The live wrappers whose layers use `var` (several if it is tied)."""
  refs = _OWNERS.get(variables.key(var), [])
  return [w for w in (r() for r in refs) if w is not None]


def mark_foreign(var) -> None:
  """`var` is also held by a layer without a wrapper."""
  _FOREIGN.add(variables.key(var))


def unmark_foreign(var) -> None:
  _FOREIGN.discard(variables.key(var))


def is_foreign(var) -> bool:
  return variables.key(var) in _FOREIGN
