"""Shared test set-up: quiet TensorFlow and prepare the Keras 2 stack."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfdpprune  # noqa: E402,F401  (prepares tf_keras before any test imports TF)
