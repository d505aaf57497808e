"""The Keras 2 (`tf_keras`) front end: TF Privacy optimizer subclasses (the
"use it as a Keras optimizer" path), `tf_keras` wrappers and their sampler
registrations. Everything else comes from `tfdpprune.core`."""
