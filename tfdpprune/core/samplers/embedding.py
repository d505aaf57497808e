"""Embedding: token-sharing per-example norms (repeated tokens exact)."""

from tfdpprune.core._tf import tf
from tfdpprune.core.engines import group_positions
from tfdpprune.core.samplers import Sampler


class EmbeddingSampler(Sampler):
  """Embedding rows: `||g_i * m||^2 = sum_t sum_d m[id_t, d] d_td S_td`.

  `S = E delta` with `E_tt' = [id_t == id_t']` sums the output gradients of
  positions that share a token, so repeated tokens are counted exactly.
  """

  name = "embedding: token-sharing norms"

  def roles(self, layer):
    return {"embeddings": layer.embeddings}

  def forward(self, layer, inputs, *args, **kwargs):
    z = layer.call(inputs, *args, **kwargs)
    return z, inputs, z

  def per_example(self, layer, captures, masks):
    vocab, dim = layer.embeddings.shape
    ids = tf.concat([tf.reshape(tf.cast(c.inputs, tf.int32),
                                [tf.shape(c.inputs)[0], -1])
                     for c, _ in captures], axis=1)          # [B, T]
    d = tf.concat([tf.reshape(dl, [tf.shape(dl)[0], -1, dim])
                   for _, dl in captures], axis=1)           # [B, T, D]
    d = tf.cast(d, layer.embeddings.dtype)
    ids, d = group_positions(ids), group_positions(d)
    mask = masks["embeddings"]
    same = tf.cast(tf.equal(ids[:, :, tf.newaxis], ids[:, tf.newaxis, :]),
                   d.dtype)                                   # [B, T, T]
    s = tf.matmul(same, d)                                    # [B, T, D]
    prod = d * s
    if not mask.is_full:
      prod = prod * tf.gather(mask.value, ids)
    sq = tf.reduce_sum(prod, axis=[1, 2])

    def sum_fn(coef):
      weighted = d * coef[:, tf.newaxis, tf.newaxis]
      total = tf.math.unsorted_segment_sum(
          tf.reshape(weighted, [-1, dim]), tf.reshape(ids, [-1]), vocab)
      return {"embeddings": total if mask.is_full else total * mask.value}
    return sq, sum_fn
