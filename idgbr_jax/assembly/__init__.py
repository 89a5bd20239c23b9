"""Models from configs: the architecture a config names, its param init (sharded on a mesh) and
its params-only restore. One module per stage; trainers, inference, export, the benchmarks and
the tests build their models here, so each is assembled in one place.

Layering: `models`, `diffusion`, `parallel`, `checkpoints`, `data` < `assembly` < `inference` <
`train` < `commands`. Nothing here imports `train`, `inference` or `convert`.
"""
