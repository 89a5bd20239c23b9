r"""The demo: the whole method on the embedded synthetic dataset, sized for a 2-core CPU.

  idgbr demo --workdir=workdir/demo [--config=configs/demo.py[:runlocal]]

Stage I (a small UNet) -> coarse maps (train split cross-fitted) -> label embedding -> a small
autoencoder trained on the data (SD weights are not available offline) -> Stage II (tiny
denoiser + CG net + REPA warm-up with a tiny random DINOv2) -> refine the test split as the
original does (25 DDIM steps from pure noise, Control-CFG 3) -> table of coarse vs refined.
`runlocal` is a smoke-test size; `backbone=unet|deeplabv3plus|segformer` picks Stage I and
`ablation=full|no_rough|no_align|cubic|no_cubic` Stage II (bench/claim.py runs them all).
"""
import ml_collections

from idgbr_configs import common, stage1_synthetic, stage2_synthetic


# Stage I per backbone (`backbone=`; bench/claim.py runs all three): CPU-sized real
# architectures, trained from scratch.
STAGE1_VARIANTS = {"unet": "small", "deeplabv3plus": "r18", "segformer": "b0"}


def get_config(arg=None):
  # binary_roads (CHN6-CUG-like) by default: its label maps survive the small autoencoder
  # (round-trip pixel accuracy ~0.99 vs ~0.89 for multiclass6, whose few-pixel cars it loses).
  arg = common.parse_arg(arg, task="binary_roads", image_size=64, backbone="unet",
                         ablation="full", runlocal=False)
  if arg.backbone not in STAGE1_VARIANTS:
    raise ValueError(f"config arg backbone={arg.backbone!r}; allowed: {sorted(STAGE1_VARIANTS)}")
  config = ml_collections.ConfigDict()
  config.num_folds = 2          # cross-fitted train coarse maps (0: predict train with the model)
  config.edge_size = 3

  config.stage1 = stage1_synthetic.get_config(
      f"task={arg.task},backbone={arg.backbone},variant={STAGE1_VARIANTS[arg.backbone]},"
      f"image_size={arg.image_size}")
  s1 = config.stage1
  s1.data.num_train = 256
  s1.data.num_test = 64
  s1.batch_size = 16
  s1.eval_batch_size = 32
  if arg.backbone == "unet":
    s1.model.overrides = ml_collections.ConfigDict(dict(features=(16, 32, 64, 128)))
  s1.num_train_steps = 150
  s1.optim.learning_rate = 3e-3
  s1.optim.warmup_steps = 30
  s1.log_every_steps = 50
  s1.eval_every_steps = -1  # the demo evaluates the coarse maps itself
  s1.checkpoint_every_steps = 150

  config.label_embed = ml_collections.ConfigDict(dict(
      hidden=32, steps=300, batch_size=8, size=32, noise_std=0.15, seed=0,
      train_table=True,  # ours: the original's script leaves the table at its random init
      optim=dict(learning_rate=1e-2, weight_decay=0.0, b1=0.9, b2=0.999,
                 schedule="warmup_cosine", warmup_steps=20, clip_norm=0.0)))

  config.autoencoder = ml_collections.ConfigDict(dict(
      variant="small", overrides=dict(block_out_channels=(16, 32, 64)),  # x4: 16x16 latents
      steps=140, kl_weight=1e-6, seed=0,
      label_ce_weight=1.0,  # ours: train for what Stage II needs, labels that survive a round trip
      optim=dict(learning_rate=2e-3, weight_decay=0.0, b1=0.9, b2=0.999,
                 schedule="warmup_cosine", warmup_steps=20, clip_norm=1.0)))

  # `ablation`: the original's Stage II ablations (stage2_synthetic.ABLATIONS), for bench/claim.py.
  config.stage2 = stage2_synthetic.get_config(
      f"task={arg.task},image_size={arg.image_size},ablation={arg.ablation}")
  s2 = config.stage2
  for key in ("num_train", "num_test", "dataset_seed", "normalization", "augment"):
    s2.data[key] = s1.data[key]
  s2.batch_size = 8
  # A 3-level, 1-layer denoiser: the SD layout at CPU size (compile time grows with depth).
  s2.model.denoiser_overrides = ml_collections.ConfigDict(dict(
      block_out_channels=(32, 64, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")))
  s2.latent_cache = True   # VAE moments per (example, flip/rot) once: +27 % steps/s (bench)
  # 1500 steps at a peak learning rate of 4e-3 (cosine to 0): the demo's 10-minute budget. Measured
  # on its artifacts (refined WF min / mIoU over coarse): lr 1e-3 +0.000 / -0.008, 2e-3
  # +0.028 / +0.005, 4e-3 +0.032 / +0.008; the cubic timestep sampling -0.014 (README: demo).
  s2.num_train_steps = 1500
  s2.optim.learning_rate = 4e-3
  s2.optim.warmup_steps = 50
  s2.repa.active_steps = 100
  s2.repa.projector_hidden = 64
  # The tiny teacher costs nothing to keep; dropping it would compile a second step on 2 cores.
  s2.repa.drop_teacher = False
  s2.model.guidance_init_mode = "paper"
  s2.diffusion.cond_dropout = 0.1  # trains the zero-residual branch that Control-CFG needs
  # The original's inference: every one of 25 DDIM steps from pure noise, guidance 3. (Ours,
  # faster to learn, not what the original can do: an img2img start from the noised coarse
  # latent, `diffusion.strength=0.2`, `start=coarse`, `train_max_timestep=300`.)
  s2.diffusion.strength = 1.0
  s2.diffusion.start = "noise"
  s2.diffusion.train_max_timestep = 0
  s2.diffusion.num_inference_steps = 25
  s2.diffusion.guidance_scale = 3.0
  s2.log_every_steps = 100
  s2.checkpoint_every_steps = 500
  s2.eval_batch_size = 32
  s2.eval_every_steps = -1  # the demo refines and evaluates the test split itself

  if arg.runlocal:
    config.num_folds = 0
    for s in (s1, s2):
      s.data.image_size = 32
      s.data.num_train = 16
      s.data.num_test = 8
      s.batch_size = 8
      s.eval_batch_size = 8
      s.num_train_steps = 4
      s.optim.warmup_steps = 1
      s.log_every_steps = 2
      s.checkpoint_every_steps = 4
    s1.model.variant = "tiny"
    s2.repa.active_steps = 2
    s2.diffusion.num_inference_steps = 3
    config.label_embed.steps = 10
    config.autoencoder.steps = 4
  return config
