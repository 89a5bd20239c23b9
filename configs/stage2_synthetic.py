r"""Stage II (the IDGBR refiner) on the embedded synthetic dataset.

  idgbr train --config=configs/stage2_synthetic.py:ablation=full \
      --workdir=/tmp/stage2 --config.data.coarse_dir=/tmp/stage1/coarse \
      --config.init.autoencoder=/tmp/ae --config.init.label_embed=/tmp/le

Ablations (as the original's configs): full | no_rough | no_align | cubic | no_cubic.
`:channels=4`: the 4-band (RGB + NIR) build of the dataset.
Ours, as flags: --config.model.guidance_init_mode=paper, --config.diffusion.guidance_scale=...,
--config.diffusion.num_inference_steps=..., --config.diffusion.cond_dropout=0.1,
--config.diffusion.strength=0.2 --config.diffusion.start=coarse|noise.
Fine-tune an imported original run: --config.init.refiner=DIR (from `idgbr convert --from=idgbr`).
`sd15` sizes: --config.model.denoiser=sd15 with real weights (see README).
"""
import ml_collections

from idgbr_configs import common

ABLATIONS = ("full", "no_rough", "no_align", "cubic", "no_cubic")


def get_config(arg=None):
  arg = common.parse_arg(arg, task="multiclass6", ablation="full", image_size=64, channels=3,
                         runlocal=False)
  if arg.ablation not in ABLATIONS:
    raise ValueError(f"ablation {arg.ablation!r}; allowed: {ABLATIONS}")
  config = ml_collections.ConfigDict()
  config.stage = "stage2"
  config.seed = 42

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_rs"
  config.data.task = arg.task
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.image_size = arg.image_size
  config.data.num_train = 256
  config.data.num_test = 64
  config.data.dataset_seed = 0
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.coarse_dir = ml_collections.FieldReference(None, field_type=str)  # <dir>/<split>/<id>.png
  config.data.crop_size = 0
  config.data.augment = "fliprot"          # the released HEAD trains without; paper-time used it
  config.data.normalization = "imagenet"   # the original's quirk (fed to the VAE and DINOv2)
  # Image bands: 3 (RGB) | 4 (RGB + NIR; the VAE gets a 4-band image stem, label colours keep
  # its 3-band one, the REPA teacher reads rgb_bands).
  config.data.in_channels = arg.channels
  config.data.rgb_bands = (0, 1, 2)
  config.data.binarize_labels = False
  config.data.ignore_index = 255
  config.data.num_folds = 0
  config.data.fold = 0
  config.data.num_workers = 0

  config.model = ml_collections.ConfigDict()
  config.model.denoiser = "tiny"           # tiny | sd15 (exact SD-1.5 shapes)
  config.model.denoiser_overrides = ml_collections.ConfigDict()  # DenoiserConfig fields
  config.model.guidance_init_mode = "code"  # code (released: attention inert) | paper
  config.model.guidance_width = 32
  config.model.guidance_heads = 4
  config.model.teacher = "tiny"            # DINOv2 variant, or "" for none
  config.model.context_length = 1          # 77 for real CLIP states
  config.model.dtype = "float32"
  # ours: bfloat16 stores the frozen weights (VAE, label embedding, unet_ori, teacher) in bf16,
  # half their memory; layers still compute in model.dtype (the weights are rounded, the
  # numbers move by bf16 rounding). Export writes them as read.
  config.model.frozen_dtype = "float32"
  config.model.remat = False
  # ours: the denoiser's and CG net's attention: "" (default) | chunked (long sequences: the
  # [T, S] logits a block of 1024 queries at a time, forward and backward) | xla | cudnn.
  config.model.attention = ""

  config.init = ml_collections.ConfigDict()  # params checkpoints (idgbr_jax.checkpoints.params)
  config.init.autoencoder = ml_collections.FieldReference(None, field_type=str)
  config.init.label_embed = ml_collections.FieldReference(None, field_type=str)
  config.init.unet = ml_collections.FieldReference(None, field_type=str)     # None: random init
  config.init.teacher = ml_collections.FieldReference(None, field_type=str)  # None: random init
  config.init.context = ml_collections.FieldReference(None, field_type=str)  # .npy; None: zeros
  # A whole refiner from `idgbr convert --from=idgbr` (an original IDGBR run, or our export):
  # unet + guidance (+ projector) start from it, and its own unet_ori, vae, label_embed and
  # context are the frozen parts (an init.autoencoder / label_embed / context set here wins).
  config.init.refiner = ml_collections.FieldReference(None, field_type=str)

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.beta_schedule = "scaled_linear"
  config.diffusion.beta_start = 0.00085
  config.diffusion.beta_end = 0.012
  config.diffusion.num_train_timesteps = 1000
  config.diffusion.timestep_strategy = "cubic" if arg.ablation == "cubic" else "uniform"
  config.diffusion.use_coarse = arg.ablation != "no_rough"
  config.diffusion.cond_dropout = 0.0      # the original trains no unconditional branch
  config.diffusion.sample_posterior = True  # the original samples the VAE latent
  config.diffusion.num_inference_steps = 25
  config.diffusion.guidance_scale = 3.0
  # 1.0 runs every DDIM step from pure noise (the original). s < 1 runs only the last
  # int(s * steps) steps, starting (`start`) from "coarse" (ours, diffusers' img2img: the coarse
  # latent noised to that step, keeping the coarse layout) or "noise" (the original pipeline's
  # strength: the early steps are skipped but the start is still pure noise).
  config.diffusion.strength = 1.0
  config.diffusion.start = "coarse"
  # ours: 0 trains on all T timesteps (the original); m > 0 only on t < m, the range an
  # img2img start at strength <= m / T uses (uniform strategy only).
  config.diffusion.train_max_timestep = 0
  config.diffusion.sampling_seed = 42

  config.repa = ml_collections.ConfigDict()
  config.repa.enabled = arg.ablation != "no_align"
  config.repa.weight = 0.5
  config.repa.active_steps = 200
  # After active_steps the trainer switches to a step compiled without the teacher and frees it
  # (the original deletes DINOv2 after acc_steps); False keeps the one warm-up program.
  config.repa.drop_teacher = True
  config.repa.projector_hidden = 2048

  config.optim = ml_collections.ConfigDict()
  config.optim.optimizer = "adamw"  # adamw | sgd (b1, b2, weight_decay are AdamW's)
  config.optim.learning_rate = 1e-5
  config.optim.weight_decay = 1e-2
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 500
  config.optim.clip_norm = 1.0

  config.batch_size = 4
  # ours: encode every (example, flip/rot) with the frozen VAE once and draw latents from the
  # cached posterior moments (train/latent_cache.py): same draws, 3 VAE passes fewer per step.
  config.latent_cache = False
  # ours: jit the train step as three programs (prepare, grads, apply; train/stage2.py
  # SplitTrainStep), the same function: no single compile holds the whole step (the sd15 step
  # whole needs more host memory to compile than 24 GiB).
  config.split_step = False
  config.num_train_steps = 80000
  config.log_every_steps = 100
  config.eval_every_steps = 0              # N: every N steps and the end; 0: the end; -1: never
  config.eval_max_examples = 0             # 0: the whole split
  config.checkpoint_every_steps = 5000
  # TensorBoard event files ("": the workdir). Checkpoints always go to <workdir>/checkpoints.
  config.summary_dir = ""
  config.max_checkpoints_to_keep = 2
  # A non-finite loss or gradient never reaches a checkpoint. "stop": end the run at it (the
  # last checkpoint is kept); "skip": leave that step's update out, up to nan_max_skips steps.
  config.nan_policy = "stop"
  config.nan_max_skips = 10
  config.eval_batch_size = 8
  # Pictures of the first N eval examples at every evaluation (<workdir>/panels/step_<N>/ and
  # TensorBoard images); 0: none.
  config.num_eval_panels = 4

  config.mesh_shape = common.mesh_config(data=-1)
  # Multi-slice: slices per axis over the data-centre network (granules: TPU slices, else
  # processes), e.g. --config.dcn_mesh_shape.data=2; mesh_shape is then per slice.
  config.dcn_mesh_shape = common.mesh_config(data=1)
  config.sharding_rules = common.sharding_rules()

  if arg.runlocal:
    config.data.image_size = 32
    config.data.num_train = 16
    config.data.num_test = 8
    config.batch_size = 8
    config.num_train_steps = 4
    config.optim.warmup_steps = 1
    config.repa.active_steps = 2
    config.repa.projector_hidden = 16
    config.diffusion.num_inference_steps = 3
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
  return config
