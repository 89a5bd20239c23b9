r"""Stage I (discriminative segmenter) on the embedded synthetic remote-sensing dataset.

  idgbr train --config=configs/stage1_synthetic.py:backbone=unet,variant=small \
      --workdir=/tmp/stage1 --config.num_train_steps=2000

`:runlocal` shrinks everything to a CPU-sized smoke run. `:channels=4` trains on the 4-band
(RGB + NIR) build of the dataset (`config.data.in_channels=4`). Architecture variants live in
`idgbr_jax/models/backbones/*` (unet: tiny/small/base, deeplabv3plus: tiny/r18/r50/r101,
segformer: tiny/b0..b5).
"""
import ml_collections

from idgbr_configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, task="multiclass6", backbone="unet", variant="small",
                         image_size=128, channels=3, runlocal=False)
  config = ml_collections.ConfigDict()
  config.stage = "stage1"
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_rs"       # a TFDS name; synthetic_rs is built on first use
  config.data.task = arg.task             # synthetic_rs config: binary_roads | multiclass6
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.image_size = arg.image_size
  config.data.num_train = 320
  config.data.num_test = 64
  config.data.dataset_seed = 0
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.crop_size = 0               # 0 = no random crop
  config.data.augment = "fliprot"         # none | flip | fliprot (the original's legacy paired aug)
  config.data.normalization = "imagenet"  # imagenet (the original's quirk) | minus_one_one | unit
  config.data.in_channels = arg.channels  # image bands: 3 (RGB) | 4 (RGB + NIR)
  config.data.rgb_bands = (0, 1, 2)       # positions of R, G, B among them
  config.data.binarize_labels = False     # the original maps label != 0 -> 1 for 2-class data
  config.data.ignore_index = 255
  config.data.num_folds = 0               # >0: k-fold cross-fitting; this run leaves out `fold`
  config.data.fold = 0
  config.data.num_workers = 0             # grain worker processes (0 = in-process)

  config.model = ml_collections.ConfigDict()
  config.model.backbone = arg.backbone
  config.model.variant = arg.variant
  config.model.overrides = ml_collections.ConfigDict()  # fields of the backbone's config class
  config.model.dtype = "float32"          # compute dtype; params stay float32

  config.loss = ml_collections.ConfigDict()
  config.loss.dice_weight = 0.0

  config.optim = ml_collections.ConfigDict()
  config.optim.optimizer = "adamw"  # adamw | sgd (b1, b2, weight_decay are AdamW's)
  config.optim.learning_rate = 1e-3
  config.optim.weight_decay = 1e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.schedule = "warmup_cosine"  # warmup_cosine | constant
  config.optim.warmup_steps = 100
  config.optim.clip_norm = 1.0

  config.batch_size = 16                  # global batch
  config.num_train_steps = 3000
  config.log_every_steps = 50
  config.eval_every_steps = 1000  # N: every N steps and at the end; 0: at the end; -1: never
  config.checkpoint_every_steps = 500
  # TensorBoard event files ("": the workdir). Checkpoints always go to <workdir>/checkpoints.
  config.summary_dir = ""
  config.max_checkpoints_to_keep = 2
  # A non-finite loss or gradient never reaches a checkpoint. "stop": end the run at it (the
  # last checkpoint is kept); "skip": leave that step's update out, up to nan_max_skips steps.
  config.nan_policy = "stop"
  config.nan_max_skips = 10
  config.eval_batch_size = 16
  # Pictures of the first N eval examples at every evaluation (<workdir>/panels/step_<N>/ and
  # TensorBoard images); 0: none.
  config.num_eval_panels = 4

  config.mesh_shape = common.mesh_config(data=-1)
  # Multi-slice: slices per axis over the data-centre network (granules: TPU slices, else
  # processes), e.g. --config.dcn_mesh_shape.data=2; mesh_shape is then per slice.
  config.dcn_mesh_shape = common.mesh_config(data=1)
  config.sharding_rules = common.sharding_rules()

  if arg.runlocal:
    config.data.image_size = 64
    config.data.num_train = 32
    config.data.num_test = 8
    config.model.variant = "tiny"
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 20
    config.optim.warmup_steps = 5
    config.log_every_steps = 5
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 10
  return config
