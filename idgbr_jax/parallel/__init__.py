"""Device mesh and logical-axis sharding rules."""
from idgbr_jax.parallel.sharding import (
    DEFAULT_RULES, make_mesh, logical_to_sharding, param_shardings, batch_sharding, replicated,
)
