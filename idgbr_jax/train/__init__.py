"""Trainers: Stage I (discriminative segmenter) and Stage II (the IDGBR refiner)."""
