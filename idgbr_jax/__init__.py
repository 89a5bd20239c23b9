"""idgbr-jax: IDGBR boundary refinement in JAX/Flax."""
