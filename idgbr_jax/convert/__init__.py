"""PyTorch <-> Flax weight conversion (diffusers, DINOv2, original IDGBR checkpoints)."""
