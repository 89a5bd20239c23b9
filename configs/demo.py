r"""The demo: the whole method on the embedded synthetic dataset, sized for a 2-core CPU.

  idgbr demo --workdir=workdir/demo [--config=configs/demo.py[:runlocal]]

Stage I (a small UNet) -> coarse maps -> evaluation table. `runlocal` is a smoke-test size.
"""
import ml_collections

from configs import common, stage1_synthetic


def get_config(arg=None):
  arg = common.parse_arg(arg, task="multiclass6", runlocal=False)
  config = ml_collections.ConfigDict()
  config.stage1 = stage1_synthetic.get_config(
      f"task={arg.task},backbone=unet,variant=small,image_size=64")
  s1 = config.stage1
  s1.data.num_train = 256
  s1.data.num_test = 64
  s1.batch_size = 16
  s1.eval_batch_size = 32
  s1.num_train_steps = 400
  s1.optim.learning_rate = 3e-3
  s1.optim.warmup_steps = 40
  s1.log_every_steps = 50
  s1.eval_every_steps = 0
  s1.checkpoint_every_steps = 200
  config.num_folds = 0          # >0: cross-fitted train-split coarse maps (costs k trainings)
  config.edge_size = 3
  if arg.runlocal:
    s1.data.image_size = 32
    s1.data.num_train = 16
    s1.data.num_test = 8
    s1.model.variant = "tiny"
    s1.batch_size = 8
    s1.eval_batch_size = 8
    s1.num_train_steps = 4
    s1.optim.warmup_steps = 1
    s1.log_every_steps = 2
    s1.checkpoint_every_steps = 4
  return config
