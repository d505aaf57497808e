"""The Keras 3 front end (TensorFlow backend): the model-level DP step
(`make_private`: the optimizer never sees the loss in Keras 3), Keras 3
wrappers and their sampler registrations, and the masked update that keeps
unselected coordinates and their optimizer state still for any Keras 3
optimizer. Everything else comes from `tfdpprune.core`.

Imported only when a Keras 3 object is used (`tfdpprune.frontends`).
"""
