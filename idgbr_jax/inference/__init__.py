"""Inference: Stage I coarse maps and Stage II refinement, from saved checkpoints."""
