"""Per-example gradients and norms over selected variables (public names).

The engines live in `tfdpprune.core.engines`, the samplers (one file per
layer family, registered by layer class as in Opacus) in
`tfdpprune.core.samplers`; this module keeps their public names and
registers the `tf_keras` layer classes (`tfdpprune.keras2.samplers`).
Register a sampler of your own layer class with `register_sampler`.
"""

# pylint: disable=unused-import,wildcard-import
from tfdpprune.core.engines import *  # noqa: F401,F403
from tfdpprune.core.engines import _positions  # noqa: F401
from tfdpprune.core.samplers import register_sampler
from tfdpprune.core.samplers import sampler_for
from tfdpprune.core.samplers import Sampler
from tfdpprune.core.samplers import supported_layer_classes
from tfdpprune.core.samplers import without_activation
from tfdpprune.core.samplers.dense import *  # noqa: F401,F403
from tfdpprune.core.samplers.embedding import EmbeddingSampler
from tfdpprune.core.samplers.normalization import AffineNormSampler
from tfdpprune.keras2 import samplers as _registered
