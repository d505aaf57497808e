"""The backend-neutral core: TensorFlow and dp_accounting only, never Keras.

Everything the privacy claim rests on lives here, once, for both Keras front
ends (`tfdpprune.keras2`, `tfdpprune.keras3`):

* `engines`: per-example norms and clipped sums from a layer's recorded
  inputs and output gradients (pure, batched functions);
* `samplers`: which engine a layer family uses, with its recording step;
  registered per layer class by each front end;
* `mechanism`: clip, sum, noise once, divide by the expected batch size;
* `dp_step`: one DP gradient from a tape, per-example losses and the
  recorded layers (used by the Keras 2 optimizer and the Keras 3 train step);
* `masks`: mask math (pure functions) and select-mode re-draws;
* `sampling`: Poisson batches; `randomness`: secret and public keys;
  `ledger`: what epsilon depends on; `accounting`: epsilon;
  `validation`: which models DP-SGD can train.

Layers and variables are duck-typed: the same code serves `tf_keras` and
Keras 3 objects (`variables` says how a variable is keyed and shaped).
"""
