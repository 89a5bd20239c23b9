"""Stage II throughput: train step and refinement, JAX vs the same-size PyTorch/diffusers pipeline.

  python bench/bench_stage2.py [--variant=demo|tiny] [--image_size=64] [--batch_size=8]
                               [--num_steps=10] [--guidance_scale=3.0] [--train_iters=5]

Both sides build the same networks from one `RefinerConfig` (random weights; the UNet and VAE
parameter counts are asserted equal) and run the same batch:

* JAX: the project's jitted Stage II train step (`stage2.make_train_step`; also fed the latent
  cache's posterior moments, as `config.latent_cache=True` trains) and refinement
  (`refine.make_refine_fn`: frozen image/coarse features once per image, the denoiser encoder
  once per step, Control-CFG as one batched up-path call inside a `lax.scan`).
* PyTorch (CPU): diffusers `UNet2DConditionModel`, `AutoencoderKL`, `DDIMScheduler` (SD-1.5
  settings), a label embedding and a guidance net of `DformerBlock`s, with the original code's
  compute pattern: per train step the frozen "unet_ori" encoder runs on the image and coarse
  latents, the trainable encoder runs once for the CG net's noisy features and again inside the
  full UNet forward; per DDIM step the frozen features are recomputed and CFG is a batch-2B UNet
  call with zero residuals for the unconditional half.

Train steps are timed as each trainer runs them: PyTorch synchronously, JAX with asynchronous
dispatch, back-to-back steps and one wait at the end (no per-step host sync, as `stage2.train`
runs). The two sides' timings are interleaved over `--rounds` rounds and the best of each kept,
so load that drifts during a run does not land on one side only.

REPA is off on both sides (it is active only for the first `repa.active_steps` steps; this times
the steady state). The guidance net uses `init_mode="paper"` so the JAX side computes the
attention branch, as the PyTorch side always does. Numbers depend on the machine; say which
(and whether it was shared) when quoting them.
"""
import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idgbr_jax import xla_flags  # noqa: E402  (does not import jax)

xla_flags.apply_defaults()  # the `idgbr` command's XLA settings, before JAX starts

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from idgbr_configs import demo as demo_config  # noqa: E402
from idgbr_jax.assembly import stage2 as assembly  # noqa: E402
from idgbr_jax.data import pipeline  # noqa: E402
from idgbr_jax.inference import refine as refine_lib  # noqa: E402
from idgbr_jax.models import autoencoder, guidance, label_embedding, refiner  # noqa: E402
from idgbr_jax.parallel import sharding  # noqa: E402
from idgbr_jax.train import common, optim, stage2  # noqa: E402

# The torch `DformerBlock` reference is test code (tests/torch_reference.py, shared with the
# parity tests), not part of the package: put tests/ on sys.path as pytest does.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import torch_reference as torch_guidance  # noqa: E402

NUM_CLASSES = 6


# ----- configuration ------------------------------------------------------------------------------
def bench_config(args):
  """The demo's Stage II config at the requested sizes (REPA off, paper-mode guidance)."""
  config = demo_config.get_config(f"image_size={args.image_size}").stage2
  if args.variant == "tiny":  # the 4-level / 2-layer SD layout at test width
    config.model.denoiser_overrides = ml_collections.ConfigDict()
  config.data.image_size = args.image_size
  config.batch_size = args.batch_size
  config.eval_batch_size = args.batch_size
  config.repa.enabled = False
  config.diffusion.cond_dropout = 0.0  # as the original
  config.diffusion.num_inference_steps = args.num_steps
  config.diffusion.guidance_scale = args.guidance_scale
  config.model.guidance_init_mode = "paper"
  config.optim.schedule = "constant"
  config.mesh_shape.data = 1
  return config


def refiner_config(config):
  """`assembly.refiner_config` with the demo's small autoencoder (the demo loads it from disk)."""
  rc = assembly.refiner_config(config, NUM_CLASSES)
  ae = autoencoder.get_config("small", block_out_channels=(16, 32, 64),
                              sample_posterior=config.diffusion.sample_posterior)
  den = rc.denoiser
  latent = config.data.image_size // ae.downsample_factor
  m = config.model
  guid = guidance.GuidanceConfig.for_denoiser(
      den.block_out_channels, den.layers_per_block, latent, width=m.guidance_width,
      heads=m.guidance_heads, init_mode=m.guidance_init_mode)
  le = label_embedding.LabelEmbedConfig(num_classes=NUM_CLASSES, hidden=32)  # demo: hidden=32
  return dataclasses.replace(rc, autoencoder=ae, guidance=guid, label_embed=le)


def random_batch(b, size, seed=0):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, NUM_CLASSES, (b, size, size)).astype(np.int32)
  coarse = np.roll(label, 2, axis=1)
  image = rng.normal(size=(b, size, size, 3)).astype(np.float32)
  return {"image": image, "label": label, "coarse": coarse}


def _median_time(fn, n):
  times = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ----- JAX ----------------------------------------------------------------------------------------
def bench_jax(config, rc, batch_np, args):
  mesh = sharding.mesh_from_config(config)
  rules = tuple(config.sharding_rules)
  ref = refiner.Refiner(rc)
  tx, lr = optim.make_optimizer(config.optim, config.num_train_steps)
  state, state_sh = stage2.init_state(ref, tx, config, mesh, rules)
  frozen, f_sh = stage2.init_frozen(ref, config, state, state_sh, mesh, rules)
  counts = {"unet": common.count_params(state["params"]["unet"]),
            "vae": common.count_params(frozen["vae"]),
            "guidance": common.count_params(state["params"]["guidance"]),
            "label_embed": common.count_params(frozen["label_embed"])}
  repl = sharding.replicated(mesh)
  train_step = stage2.make_train_step(ref, tx, lr, assembly.make_schedule(config), config)

  def jit_step(cached_keys=()):
    return jax.jit(train_step, in_shardings=(state_sh, f_sh,
                                             stage2.batch_shardings(mesh, rules, cached_keys),
                                             repl),
                   out_shardings=(state_sh, repl), donate_argnums=(0,))

  holder = {}

  def compile_and_warm(step, batch, rng):
    """Compiles a train step, runs it twice (warm-up), returns (compiled, compile seconds)."""
    start = time.perf_counter()
    compiled = step.lower(holder["state"], frozen, batch, rng).compile()
    compile_s = time.perf_counter() - start
    for _ in range(2):
      holder["state"], holder["m"] = compiled(holder["state"], frozen, batch, rng)
    jax.block_until_ready(holder["state"])
    return compiled, compile_s

  def steps_timer(compiled, batch, rng):
    def run():
      # As the trainer runs: steps dispatched back to back (JAX's asynchronous dispatch overlaps
      # the host's argument handling, ~10 ms for ~2k leaves here, with the previous step's
      # compute), metrics merged on device, one wait at the end. Seconds per step.
      start = time.perf_counter()
      metrics = None
      for _ in range(args.train_iters):
        holder["state"], m = compiled(holder["state"], frozen, batch, rng)
        metrics = m if metrics is None else metrics.merge(m)
      holder["m"] = jax.block_until_ready(metrics)
      return (time.perf_counter() - start) / args.train_iters
    return run

  refine_fn = refine_lib.make_refine_fn(ref, config, mesh, state_sh["params"], f_sh)
  out, timers = {"counts": counts}, {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = pipeline.to_global(batch_np, mesh, rules)
    rng = jax.random.key(0)
    holder["state"] = state
    plain, out["train_compile_s"] = compile_and_warm(jit_step(), batch, rng)
    timers["train_s"] = steps_timer(plain, batch, rng)
    # The same step fed the latent cache's posterior moments (config.latent_cache): the three
    # frozen VAE encoder passes happen once per (example, flip/rot) before training instead.
    moments = jax.jit(lambda f, b: {"image_moments": ref.image_moments(f, b["image"]),
                                    "label_moments": ref.label_moments(f, b["label"]),
                                    "coarse_moments": ref.label_moments(f, b["coarse"])})
    cached_batch = {**batch, **moments(frozen, batch)}
    cached, _ = compile_and_warm(jit_step(("image", "label", "coarse")), cached_batch, rng)
    timers["train_cached_s"] = steps_timer(cached, cached_batch, rng)
    out["loss"] = float(holder["m"].compute()["loss"])

    trainable = holder["state"]["params"]
    image, coarse = batch["image"], batch["coarse"]
    start = time.perf_counter()
    compiled_refine = refine_fn.lower(trainable, frozen, image, coarse, rng).compile()
    out["refine_compile_s"] = time.perf_counter() - start
    maps = jax.block_until_ready(compiled_refine(trainable, frozen, image, coarse, rng))
    out["maps_shape"] = tuple(maps.shape)

  def refine_timer():
    # The current parameters: the train timers donate (and so delete) the earlier ones.
    params = holder["state"]["params"]
    return _median_time(
        lambda: jax.block_until_ready(compiled_refine(params, frozen, image, coarse, rng)),
        args.refine_iters)

  timers["refine_s"] = refine_timer
  return out, timers


# ----- PyTorch ------------------------------------------------------------------------------------
def _torch_dformer_cls(torch):
  """The guidance block as the original defines it (see idgbr_jax/convert/torch_guidance.py)."""
  return torch_guidance.dformer_block_cls(torch)


def _torch_modules(torch, rc):
  """diffusers UNet / VAE / DDIM and the CG net + label embedding, from the JAX config."""
  import diffusers  # pylint: disable=import-outside-toplevel
  tnn = torch.nn
  d, a, g = rc.denoiser, rc.autoencoder, rc.guidance
  unet = diffusers.UNet2DConditionModel(
      in_channels=d.in_channels, out_channels=d.out_channels,
      block_out_channels=d.block_out_channels, layers_per_block=d.layers_per_block,
      down_block_types=d.down_block_types, up_block_types=d.up_block_types,
      attention_head_dim=d.num_heads, cross_attention_dim=d.cross_attention_dim,
      norm_num_groups=d.norm_num_groups, norm_eps=d.norm_eps, flip_sin_to_cos=d.flip_sin_to_cos,
      freq_shift=d.freq_shift, use_linear_projection=d.use_linear_projection,
      transformer_layers_per_block=d.transformer_layers_per_block,
      upcast_attention=d.upcast_attention)
  n = len(a.block_out_channels)
  vae = diffusers.AutoencoderKL(
      in_channels=a.in_channels, out_channels=a.out_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=a.block_out_channels, layers_per_block=a.layers_per_block,
      latent_channels=a.latent_channels, norm_num_groups=a.norm_num_groups,
      scaling_factor=a.scaling_factor, mid_block_add_attention=a.mid_block_attention,
      use_quant_conv=a.use_quant_conv, use_post_quant_conv=a.use_post_quant_conv)
  # SD-1.5 scheduler_config.json.
  scheduler = diffusers.DDIMScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
  dformer = _torch_dformer_cls(torch)

  class InteractNet(tnn.Module):
    """One guidance block per skip plus the mid block (the original's InteractNet)."""

    def __init__(self):
      super().__init__()
      self.attn_blocks_down = tnn.ModuleList(
          [dformer(c, g.width, g.layers, g.heads, r)
           for c, r in zip(g.skip_channels, g.skip_resolutions)])
      self.attn_blocks_mid = dformer(g.mid_channels, g.width, g.layers, g.heads,
                                     g.mid_resolution)

    def forward(self, skips, mid, img, coarse):
      (img_skips, img_mid), (c_skips, c_mid) = img, coarse
      down = [blk(x, torch.cat([fi, fc], 1)) for blk, x, fi, fc in
              zip(self.attn_blocks_down, skips, img_skips, c_skips)]
      return down, self.attn_blocks_mid(mid, torch.cat([img_mid, c_mid], 1))

  class LabelEmbedNet(tnn.Module):
    def __init__(self, k, hidden):
      super().__init__()
      self.embedding = tnn.Embedding(k, 3)
      self.embedding_conv = tnn.Sequential(tnn.Conv2d(3, hidden, 1), tnn.ReLU(),
                                           tnn.Conv2d(hidden, k, 1))

    def encode(self, idx):  # (B, H, W) -> (B, 3, H, W)
      return (torch.sigmoid(self.embedding(idx)) * 2 - 1).permute(0, 3, 1, 2)

    def decode(self, rgb):
      return self.embedding_conv(rgb)

  le = LabelEmbedNet(rc.label_embed.num_classes, rc.label_embed.hidden)
  return unet, vae, scheduler, InteractNet(), le


def _torch_encoder(unet, sample, t, ctx):
  """conv_in + time embedding + down blocks + mid, as diffusers' forward runs them."""
  t = t.expand(sample.shape[0]) if t.ndim == 0 else t
  emb = unet.time_embedding(unet.time_proj(t).to(sample.dtype))
  h = unet.conv_in(sample)
  skips = (h,)
  for blk in unet.down_blocks:
    if getattr(blk, "has_cross_attention", False):
      h, res = blk(hidden_states=h, temb=emb, encoder_hidden_states=ctx)
    else:
      h, res = blk(hidden_states=h, temb=emb)
    skips += res
  h = unet.mid_block(h, emb, encoder_hidden_states=ctx)
  return list(skips), h


def bench_torch(rc, config, batch_np, args):
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  unet, vae, scheduler, cg, le = _torch_modules(torch, rc)
  # unet_ori: a frozen copy of the initial UNet without its up path.
  unet_ori = copy.deepcopy(unet)
  unet_ori.up_blocks = torch.nn.ModuleList()
  for m in (unet_ori, vae, le):
    m.requires_grad_(False)
    m.eval()
  unet.train()
  cg.train()
  count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
  counts = {"unet": count(unet), "vae": count(vae), "guidance": count(cg),
            "label_embed": count(le)}
  params = list(unet.parameters()) + list(cg.parameters())
  opt = torch.optim.AdamW(params, lr=config.optim.learning_rate,
                          betas=(config.optim.b1, config.optim.b2),
                          weight_decay=config.optim.weight_decay)
  sf = rc.autoencoder.scaling_factor
  b = batch_np["image"].shape[0]
  image = torch.from_numpy(batch_np["image"].transpose(0, 3, 1, 2).copy())
  label = torch.from_numpy(batch_np["label"]).long()
  coarse = torch.from_numpy(batch_np["coarse"]).long()
  ctx = torch.zeros(b, config.model.context_length, rc.denoiser.cross_attention_dim)
  t_one = torch.tensor(1)

  def latent(x):
    return vae.encode(x).latent_dist.sample() * sf

  def train_step():
    with torch.no_grad():
      z_img, z_gt, z_coarse = latent(image), latent(le.encode(label)), latent(le.encode(coarse))
      f_img = _torch_encoder(unet_ori, z_img, t_one, ctx)
      f_coarse = _torch_encoder(unet_ori, z_coarse, t_one, ctx)
    noise = torch.randn_like(z_gt)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,))
    z_t = scheduler.add_noise(z_gt, noise, t)
    skips, mid = _torch_encoder(unet, z_t, t, ctx)
    down_res, mid_res = cg(skips, mid, f_img, f_coarse)
    eps = unet(z_t, t, ctx, down_block_additional_residuals=down_res,
               mid_block_additional_residual=mid_res).sample  # the encoder runs again
    loss = torch.nn.functional.mse_loss(eps, noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.optim.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  out = {"counts": counts}
  for _ in range(2):
    out["loss"] = train_step()

  def train_timer():  # seconds per step, over train_iters synchronous steps
    start = time.perf_counter()
    for _ in range(args.train_iters):
      out["loss"] = train_step()
    return (time.perf_counter() - start) / args.train_iters

  unet.eval()
  cg.eval()
  scale = config.diffusion.guidance_scale
  ctx2 = torch.cat([ctx, ctx])

  @torch.no_grad()
  def refine():
    z_img, z_coarse = latent(image), latent(le.encode(coarse))
    scheduler.set_timesteps(config.diffusion.num_inference_steps)
    z = torch.randn_like(z_img) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
      # The original recomputes the frozen features at every step.
      f_img = _torch_encoder(unet_ori, z_img, t_one, ctx)
      f_coarse = _torch_encoder(unet_ori, z_coarse, t_one, ctx)
      skips, mid = _torch_encoder(unet, z, t, ctx)
      down_res, mid_res = cg(skips, mid, f_img, f_coarse)
      res2 = [torch.cat([r, torch.zeros_like(r)]) for r in down_res]
      mid2 = torch.cat([mid_res, torch.zeros_like(mid_res)])
      eps_c, eps_u = unet(torch.cat([z, z]), t, ctx2, down_block_additional_residuals=res2,
                          mid_block_additional_residual=mid2).sample.chunk(2)
      z = scheduler.step(eps_u + scale * (eps_c - eps_u), t, z).prev_sample
    colours = vae.decode(z / sf).sample
    return le.decode(colours).softmax(1).argmax(1).to(torch.uint8)

  maps = refine()
  out["maps_shape"] = tuple(maps.shape)
  out["threads"] = torch.get_num_threads()
  out["version"] = torch.__version__

  def eval_mode(fn):  # train_timer puts the nets back in train mode; refine runs in eval mode
    def run():
      unet.eval()
      cg.eval()
      return fn()
    return run

  def train_mode(fn):
    def run():
      unet.train()
      cg.train()
      return fn()
    return run

  timers = {"train_s": train_mode(train_timer),
            "refine_s": eval_mode(lambda: _median_time(refine, args.refine_iters))}
  return out, timers


# ----- main ---------------------------------------------------------------------------------------
def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", choices=("demo", "tiny"), default="demo",
                      help="denoiser: the demo's 3-level/1-layer overrides, or the 4-level "
                           "'tiny' variant")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_steps", type=int, default=10, help="DDIM steps")
  parser.add_argument("--guidance_scale", type=float, default=3.0)
  parser.add_argument("--train_iters", type=int, default=10,
                      help="train steps per timed run (PyTorch synchronous; JAX back to back, "
                           "as each trainer runs them)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="interleaved JAX / PyTorch timing rounds; the best of each is kept")
  parser.add_argument("--refine_iters", type=int, default=3, help="timed refinements (median)")
  parser.add_argument("--skip_torch", action="store_true")
  args = parser.parse_args()

  config = bench_config(args)
  rc = refiner_config(config)
  batch = random_batch(args.batch_size, args.image_size)
  b = args.batch_size
  d, a, g = rc.denoiser, rc.autoencoder, rc.guidance
  latent = args.image_size // a.downsample_factor
  print(f"machine: os.cpu_count()={os.cpu_count()}, jax {jax.__version__} "
        f"({jax.default_backend()}, {jax.device_count()} device(s)), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"sizes: variant={args.variant}, image {args.image_size}px, batch {b}, latent "
        f"{latent}x{latent}x{d.in_channels}, DDIM steps {args.num_steps}, guidance scale "
        f"{args.guidance_scale}")
  print(f"  denoiser: block_out_channels={d.block_out_channels}, layers_per_block="
        f"{d.layers_per_block}, heads={d.num_heads}, cross_attention_dim={d.cross_attention_dim}, "
        f"context length {config.model.context_length}, {len(d.skip_channels)} skips")
  print(f"  autoencoder: block_out_channels={a.block_out_channels} (x{a.downsample_factor}), "
        f"layers_per_block={a.layers_per_block}")
  print(f"  guidance: width {g.width}, heads {g.heads}, layers {g.layers}, init_mode "
        f"{g.init_mode}; label embedding K={rc.label_embed.num_classes}, hidden "
        f"{rc.label_embed.hidden}")

  jx, jax_timers = bench_jax(config, rc, batch, args)
  print(f"JAX: train compile {jx['train_compile_s']:.1f} s, refine compile "
        f"{jx['refine_compile_s']:.1f} s, loss {jx['loss']:.4f}, maps {jx['maps_shape']}")
  if args.skip_torch:
    th = None
  else:
    th, torch_timers = bench_torch(rc, config, batch, args)
    print(f"PyTorch {th['version']}: torch.get_num_threads()={th['threads']}, loss "
          f"{th['loss']:.4f}, maps {th['maps_shape']}")
    print("parameters (JAX / PyTorch): " + ", ".join(
        f"{k} {jx['counts'][k]:,} / {th['counts'][k]:,}" for k in jx["counts"]))
    for k in ("unet", "vae"):
      assert jx["counts"][k] == th["counts"][k], (k, jx["counts"][k], th["counts"][k])
  # Both sides' timings interleaved, best of `rounds`: load from other jobs drifts over a run, and
  # timing one side after the other would charge the drift to one of them.
  sides = [(jx, jax_timers)] + ([] if th is None else [(th, torch_timers)])
  load_before = os.getloadavg()[0]
  for _ in range(args.rounds):
    for out, timers in sides:
      for key, timer in timers.items():
        out[key] = min(out.get(key, float("inf")), timer())
  print(f"timings: best of {args.rounds} interleaved rounds (train: {args.train_iters} steps "
        f"each; refine: median of {args.refine_iters}); load average (1 min) before / after: "
        f"{load_before:.2f} / {os.getloadavg()[0]:.2f}")
  print()
  print("| step (batch %d) | JAX img/s | PyTorch img/s | speed-up |" % b)
  print("| --- | ---: | ---: | ---: |")
  for name, key, torch_key in (
      ("train step", "train_s", "train_s"),
      ("train step, latent cache (JAX) vs encoding every step (PyTorch)", "train_cached_s",
       "train_s"),
      (f"refinement ({args.num_steps} DDIM steps, CFG)", "refine_s", "refine_s")):
    j = b / jx[key]
    if th is None:
      print(f"| {name} | {j:.2f} | - | - |")
    else:
      t = b / th[torch_key]
      print(f"| {name} | {j:.2f} | {t:.2f} | {j / t:.2f}x |")


if __name__ == "__main__":
  main()
