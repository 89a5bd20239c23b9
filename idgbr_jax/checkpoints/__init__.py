"""orbax checkpoints: train state, data-iterator state and the config, saved together."""
from idgbr_jax.checkpoints.manager import Checkpointer, CheckpointError, load_config
