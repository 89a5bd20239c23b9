"""Whole refiners to the original's layout and back (`idgbr export --to=idgbr` -> `idgbr convert
--from=idgbr`): the export holds everything the original's inference loads (unet_ori, scheduler,
a text encoder giving the run's context); nets the original cannot load are refused; an imported
refiner refines bit for bit like the run it came from (`idgbr refine --checkpoint=<imported>`)
and is a fine-tuning init (`config.init.refiner`) with its own unet_ori."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from idgbr_configs import demo, potsdam_stage2, stage2_synthetic
from idgbr_jax import checkpoints
from idgbr_jax.assembly import stage2 as assembly
from idgbr_jax.convert import ConversionError, checkpoint_io, files, idgbr
from idgbr_jax.data import transforms
from idgbr_jax.inference import refine as refine_lib
from idgbr_jax.inference.stage1 import write_png
from idgbr_jax.models import denoiser, label_embedding, refiner
from idgbr_jax.parallel import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # image side: a 2x2 latent under the tiny x8 autoencoder


def _same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _tiny(config):
  """A 2-level SD-layout denoiser at SIZE px: every export path, little compile."""
  config.model.denoiser_overrides = ml_collections.ConfigDict(dict(
      block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
  config.data.image_size = SIZE
  if "resize" in config.data:
    config.data.resize = SIZE
  config.diffusion.num_inference_steps = 3
  return config


def _save_run(config, workdir, seed=9):
  """A Stage II run directory as a trainer writes it (params and step; its frozen parts are
  rebuilt from the config), the params moved off their init so that the trained unet's encoder
  is not unet_ori. Attention params left all-zero (the released `code` init) stay zero, so the
  CG net stays inert. Returns (params, frozen)."""
  mesh = sharding.make_mesh(config.mesh_shape.to_dict())
  rules = tuple(config.sharding_rules)
  ref = assembly.build_refiner(config)
  params, shardings = sharding.create_sharded(assembly.trainable_init_fn(ref, config),
                                              assembly.trainable_key(config), mesh, rules)
  rng = np.random.default_rng(seed)

  def move(path, x):
    inert = not x.any() and any(getattr(k, "key", None) == "attn" for k in path)
    return x if inert else x + np.float32(0.02) * rng.standard_normal(x.shape, np.float32)
  params = jax.device_put(jax.tree_util.tree_map_with_path(move, jax.device_get(params)),
                          shardings)
  frozen, _ = assembly.init_frozen(ref, config, mesh, rules, with_teacher=False,
                                   unet_ori=assembly.initial_unet_encoder(ref, config, mesh,
                                                                          rules))
  ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
  ckpt.save(0, {"params": params, "step": jnp.zeros((), jnp.int32)}, config=config)
  ckpt.wait_until_finished()
  ckpt.close()
  return params, frozen


@pytest.fixture(scope="module")
def loadable(tmp_path_factory):
  """The synthetic family at the original's CG width (512, 8 heads, the released all-zero
  attention init) with a 4-token context: exported without --allow_unloadable, then imported."""
  root = tmp_path_factory.mktemp("loadable")
  config = _tiny(stage2_synthetic.get_config("runlocal"))
  config.model.guidance_width, config.model.guidance_heads = 512, 8
  config.model.context_length = 4
  np.save(root / "context.npy", np.random.default_rng(3).normal(size=(1, 4, 32)).astype(
      np.float32))
  config.init.context = str(root / "context.npy")
  params, frozen = _save_run(config, root / "run")
  warnings = []
  written = checkpoint_io.export_checkpoint(str(root / "run"), "idgbr", str(root / "export"),
                                            warn=warnings.append)
  imported = checkpoint_io.convert_to_checkpoints("idgbr", str(root / "export"),
                                                  str(root / "imported"), warn=warnings.append)
  return dict(root=root, config=config, params=params, frozen=frozen, written=written,
              imported=imported, warnings=warnings,
              run=assembly.load_refiner(str(root / "run")),
              imp=assembly.load_refiner(str(root / "imported")))


def test_export_holds_what_the_original_inference_loads(loadable):
  root, written = loadable["root"], loadable["written"]
  assert loadable["warnings"] == []  # width 512, label hidden 128, strength 1: nothing to say
  exp = root / "export"
  # Complete for tools/infer.py --model_path=exp: a checkpoint dir that is its own base source.
  assert all((exp / name).exists() for name in idgbr.BASE_COMPONENTS + (
      idgbr.UNET_DIR, idgbr.GUIDANCE_DIR, idgbr.LABEL_EMBED_DIR))
  assert set(written) == set(idgbr.EXPORTED_PARTS)
  # unet_ori: the whole *initial* UNet (the seed's random init here), not the trained one.
  config = loadable["config"]
  loaded = loadable["run"]
  initial, encoder_only = assembly.initial_unet(loaded.refiner, config, loaded.mesh,
                                                tuple(config.sharding_rules))
  assert not encoder_only
  ori = json.loads((exp / "unet_ori" / "config.json").read_text())
  assert ori["_class_name"] == "UNet2DConditionModel"
  module, ori_params, enc_only = idgbr.load_unet_ori(str(exp / "unet_ori"))
  assert not enc_only and module.config == loaded.refiner.config.denoiser
  _same(ori_params, initial)
  _same(denoiser.encoder_params(ori_params), loaded.frozen["unet_ori"])
  assert not np.array_equal(ori_params["conv_in"]["kernel"],
                            loadable["params"]["unet"]["conv_in"]["kernel"])
  # Refinement settings, and the scheduler as diffusers reads it.
  settings = json.loads((exp / idgbr.SETTINGS_FILE).read_text())
  assert settings == assembly.refine_settings(config)
  np.testing.assert_array_equal(np.load(exp / idgbr.CONTEXT_FILE), loaded.frozen["context"])
  diffusers = pytest.importorskip("diffusers")
  sched = diffusers.DDIMScheduler.from_pretrained(str(exp / "scheduler"))
  ours = assembly.make_schedule(config)
  np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ours.alphas_cumprod, atol=1e-7)
  sched.set_timesteps(25)
  assert sched.timesteps[:2].tolist() == [961, 921] and not sched.config.set_alpha_to_one


@pytest.mark.torch
def test_exported_text_encoder_gives_the_run_context(loadable):
  """The original builds its prompt states from tokenizer/ + text_encoder/ (use_fast=False,
  padding to model_max_length); ours return the run's context for "" (and for any prompt)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  exp = loadable["root"] / "export"
  tok = transformers.AutoTokenizer.from_pretrained(str(exp), subfolder="tokenizer",
                                                   use_fast=False)
  enc = transformers.CLIPTextModel.from_pretrained(str(exp), subfolder="text_encoder").eval()
  want = np.load(exp / idgbr.CONTEXT_FILE)
  for prompt in ("", "a road"):
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
      got = enc(ids)[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_imported_refiner_is_the_run(loadable, tmp_path):
  root = loadable["root"]
  imported_dir = str(root / "imported")
  assert set(loadable["imported"]) == {"unet", "guidance", "label_embed", "vae", "projector",
                                       "unet_ori", "context", "settings"}
  run, imp = loadable["run"], loadable["imp"]

  def arch(c):
    return c.denoiser, c.autoencoder, c.guidance, c.label_embed, c.context_length
  assert arch(imp.refiner.config) == arch(run.refiner.config)
  assert imp.refiner.config.teacher is None  # refinement only
  assert set(imp.trainable) == {"unet", "guidance"}
  _same(imp.trainable, run.trainable)
  _same(imp.frozen, run.frozen)
  for key in ("image_size", "normalization"):
    assert imp.config.data[key] == run.config.data[key]
  assert assembly.refine_settings(imp.config) == assembly.refine_settings(run.config)

  assert imp.refiner.config.guidance.skip_inert_attention  # all-zero attention: "code" mode

  # The export of an imported refiner is the first export again (original -> ours -> original).
  again = checkpoint_io.export_checkpoint(imported_dir, "idgbr", str(tmp_path / "again"))
  for part in ("unet", "guidance", "label_embed", "vae", "unet_ori", "projector"):
    sub = again[part]
    name = (os.path.basename(sub) if os.path.isfile(sub) else
            os.path.join(os.path.basename(sub), "diffusion_pytorch_model.safetensors"))
    a = files.read_state_dict(str(root / "export" / name))
    b = files.read_state_dict(os.path.join(str(tmp_path / "again"), name))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), part


def _examples(normalization, n=3):
  """The examples `idgbr refine` builds from PNGs (their uint8 arrays under "uint8")."""
  rng = np.random.default_rng(0)
  examples = []
  for i in range(n):
    image = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    coarse = rng.integers(0, 6, (SIZE, SIZE), dtype=np.uint8)
    examples.append({"image": transforms.normalize_image(image, normalization),
                     "label": coarse.astype(np.int32), "coarse": coarse.astype(np.int32),
                     "id": f"im{i}", "uint8": (image, coarse)})
  return examples


def _refine(loaded, examples, batch_size=8):
  """{stem: map} as `idgbr refine --batch_size=8` computes them."""
  config = loaded.config
  config.eval_batch_size = batch_size
  fn = refine_lib.make_refine_fn(loaded.refiner, config, loaded.mesh,
                                 jax.tree.map(lambda x: x.sharding, loaded.trainable),
                                 jax.tree.map(lambda x: x.sharding, loaded.frozen))
  ds = [{k: v for k, v in ex.items() if k != "uint8"} for ex in examples]
  return {stem: refined for stem, refined, _, _ in refine_lib.refine_dataset(
      fn, loaded.trainable, loaded.frozen, ds, config, loaded.mesh)}


def _refine_command_routes_imported_folders() -> bool:
  with open(os.path.join(REPO, "idgbr_jax", "commands", "refine.py"), encoding="utf-8") as f:
    source = f.read()
  return "assembly.load_config(" in source


def test_refine_command_on_an_imported_refiner(loadable, tmp_path):
  """`idgbr refine --checkpoint=<imported folder>` writes the run's refined maps."""
  if not _refine_command_routes_imported_folders():
    pytest.skip("commands/refine.py reads the config with checkpoints.load_config(<dir>/"
                "checkpoints); it takes imported refiners once it calls "
                "assembly.load_config(<dir>) (issue #18)")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root, run = loadable["root"], loadable["run"]
  examples = _examples(run.config.data.normalization)
  (tmp_path / "images").mkdir()
  for ex in examples:
    image, coarse = ex["uint8"]
    Image.fromarray(image).save(tmp_path / "images" / f"{ex['id']}.png")
    write_png(str(tmp_path / "coarse" / f"{ex['id']}.png"), coarse)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  res = subprocess.run(
      [sys.executable, "-m", "idgbr_jax.cli", "refine", f"--checkpoint={root / 'imported'}",
       f"--images={tmp_path / 'images'}", f"--coarse={tmp_path / 'coarse'}",
       f"--out={tmp_path / 'refined'}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  want = _refine(run, examples)
  assert sorted(want) == sorted(p[:-4] for p in os.listdir(tmp_path / "refined"))
  for stem, refined in want.items():
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "refined" / f"{stem}.png")),
                                  refined, err_msg=stem)


def test_init_refiner_takes_unet_ori_from_the_import_not_the_trained_unet(loadable, tmp_path):
  """`config.init.refiner`: unet + guidance (+ projector) start from the import; unet_ori, VAE,
  label embedding and context are the imported run's. (The trainer calls
  `load_initial_trainable` and `init_frozen`; here they are called as it does.)"""
  root = loadable["root"]
  config = _tiny(stage2_synthetic.get_config("runlocal"))
  config.init.refiner = str(root / "imported")
  run = loadable["run"]
  cfg = assembly.refiner_config(config, 6)
  assert (cfg.denoiser, cfg.guidance, cfg.autoencoder, cfg.label_embed) == (
      run.refiner.config.denoiser, run.refiner.config.guidance, run.refiner.config.autoencoder,
      run.refiner.config.label_embed)
  assert cfg.guidance.width == 512  # from the weights, not config.model.guidance_width (32)
  ref = refiner.Refiner(cfg)
  mesh = sharding.make_mesh(config.mesh_shape.to_dict())
  rules = tuple(config.sharding_rules)
  abstract, shardings = sharding.abstract_sharded(assembly.trainable_init_fn(ref, config),
                                                  assembly.trainable_key(config), mesh, rules)
  params = assembly.load_initial_trainable(config, abstract, shardings)
  _same({k: params[k] for k in ("unet", "guidance")}, run.trainable)
  # The tiny teacher's projector has the shape of the exported one: it is taken over too.
  _same(params["projector"], loadable["params"]["projector"])
  # The trainer passes the encoder of its state's unet (here: the trained one); under
  # init.refiner unet_ori is the import's all the same.
  trained_encoder = denoiser.encoder_params(params["unet"])
  frozen, _ = assembly.init_frozen(ref, config, mesh, rules, with_teacher=False,
                                   unet_ori=(trained_encoder,
                                             denoiser.encoder_params(shardings["unet"])))
  for key in ("unet_ori", "vae", "label_embed", "context"):
    _same(frozen[key], run.frozen[key])
  assert not np.array_equal(np.asarray(frozen["unet_ori"]["conv_in"]["kernel"]),
                            np.asarray(trained_encoder["conv_in"]["kernel"]))
  # A run fine-tuned from it keeps that unet_ori when loaded back (refine / export).
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ft" / "checkpoints"))
  ckpt.save(0, {"params": params, "step": jnp.zeros((), jnp.int32)}, config=config)
  ckpt.wait_until_finished()
  ckpt.close()
  ft = assembly.load_refiner(str(tmp_path / "ft"))
  _same(ft.frozen["unet_ori"], run.frozen["unet_ori"])
  # init.unet beside init.refiner is ambiguous (which initial UNet is unet_ori?).
  config.init.unet = str(root / "imported" / "unet")
  with pytest.raises(ValueError, match="init.unet.*init.refiner.*both set"):
    assembly.refiner_config(config, 6)


def test_cfg_halves_order_does_not_change_eps(loadable):
  """The original batches CFG as [uncond | cond], ours as [cond | uncond]: every example's pass
  through the up path is independent of its batch position, so ε is the same."""
  run = loadable["run"]
  ref, tr, fr = run.refiner, run.trainable, run.frozen
  rng = np.random.default_rng(1)
  z_img, z_coarse, z_t = (jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)
                          for _ in range(3))
  t = jnp.int32(500)

  @jax.jit
  def both(tr, fr, z_img, z_coarse, z_t):
    z = jnp.concatenate([z_img, z_coarse])
    skips, mid = ref.unet.apply({"params": fr["unet_ori"]}, z, jnp.full((4,), 1),
                                ref.context(fr, 4), method=ref.unet.encode)
    cond = refiner.Conditions(tuple(s[:2] for s in skips), mid[:2], tuple(s[2:] for s in skips),
                              mid[2:])
    eps_c, eps_u = ref.eps_cfg(tr, fr, z_t, t, cond)
    # The original's order: the same decode with the halves swapped.
    # pylint: disable-next=protected-access
    s2, m2, res, mres, ctx, _ = ref._guided(tr, fr, z_t, t, cond)
    two = lambda x: jnp.concatenate([x, x])  # noqa: E731
    swapped = ref.unet.apply(
        {"params": tr["unet"]}, [two(s) for s in s2], two(m2), jnp.full((4,), t), two(ctx),
        [jnp.concatenate([jnp.zeros_like(r), r]) for r in res],
        jnp.concatenate([jnp.zeros_like(mres), mres]), method=ref.unet.decode)
    return eps_c, eps_u, swapped[2:], swapped[:2]

  eps_c, eps_u, orig_c, orig_u = both(tr, fr, z_img, z_coarse, z_t)
  np.testing.assert_array_equal(orig_c, eps_c)
  np.testing.assert_array_equal(orig_u, eps_u)
  assert float(jnp.abs(eps_c - eps_u).max()) > 1e-4  # the branches differ


def test_unloadable_export_is_refused_and_refines_like_the_run_with_allow(tmp_path):
  """The real-data family at `runlocal` size (CG width 32; here with a live attention branch):
  the original cannot load it, our import refines bit for bit like the run."""
  config = _tiny(potsdam_stage2.get_config("runlocal"))
  assert config.model.guidance_width == 32
  config.model.guidance_init_mode = "paper"
  params, frozen = _save_run(config, tmp_path / "run")
  with pytest.raises(ConversionError,
                     match=r"attention width is 32 \(config.model.guidance_width=32\).*"
                           r"hard-codes 512.*--config.model.guidance_width=512.*"
                           r"--allow_unloadable"):
    checkpoint_io.export_checkpoint(str(tmp_path / "run"), "idgbr", str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()
  warnings = []
  checkpoint_io.export_checkpoint(str(tmp_path / "run"), "idgbr", str(tmp_path / "export"),
                                  allow_unloadable=True, warn=warnings.append)
  assert len(warnings) == 1 and "cannot load this export" in warnings[0]
  checkpoint_io.convert_to_checkpoints("idgbr", str(tmp_path / "export"), str(tmp_path / "imp"))
  imp = assembly.load_refiner(str(tmp_path / "imp"))
  assert imp.refiner.config.guidance.init_mode == "paper"
  _same(imp.trainable, {k: params[k] for k in ("unet", "guidance")})
  _same(imp.frozen, frozen)
  assert imp.config.data.image_size == SIZE
  # Refined maps: the same bits (same program, same seed and batches).
  run = assembly.load_refiner(str(tmp_path / "run"))
  examples = _examples(run.config.data.normalization)
  _same(_refine(imp, examples), _refine(run, examples))


def test_settings_the_original_samples_differently():
  s2 = demo.get_config().stage2
  # The demo samples as the original does (pure noise, strength 1, scale 3 > 1).
  assert (s2.diffusion.strength, s2.diffusion.start) == (1.0, "noise")
  assert not any("strength" in f or "guidance" in f
                 for f in assembly.original_refine_differences(s2))
  # Ours, the img2img start (the demo's option): the original cannot sample it.
  s2.diffusion.strength, s2.diffusion.start = 0.2, "coarse"
  found = assembly.original_refine_differences(s2)
  assert any("start='coarse'" in f and "start=noise" in f for f in found)
  s2.diffusion.start = "noise"
  assert not any("strength" in f for f in assembly.original_refine_differences(s2))
  s2.diffusion.guidance_scale = 1.0
  assert any("guidance_scale <= 1" in f for f in assembly.original_refine_differences(s2))
  # An imported original run samples as the original does: pure noise, 25 steps, scale 3.
  base = assembly.merged_settings(None)["diffusion"]
  assert (base["start"], base["num_inference_steps"], base["guidance_scale"],
          base["strength"]) == ("noise", 25, 3.0, 1.0)
  assert assembly.original_refine_differences(stage2_synthetic.get_config()) == []
  assert idgbr.original_load_problems(None, label_embedding.LabelEmbedConfig(2, 32))


@pytest.mark.torch
def test_the_original_code_loads_the_export(loadable):
  """With the original repository at $IDGBR_ORIGINAL_SRC (KeyanHu-git/IDGBR: src/, tools/), its
  own `tools/infer.py` loaders read the export with no base SD folder, its prompt states are the
  run's context, and its `SIDModel.predict` gives our Control-CFG ε for the same latents."""
  src = os.environ.get("IDGBR_ORIGINAL_SRC")
  if not src:
    pytest.skip("set IDGBR_ORIGINAL_SRC to a checkout of the original IDGBR code")
  torch = pytest.importorskip("torch")
  import pathlib  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, src)
  try:
    from tools import infer  # pylint: disable=import-outside-toplevel
    from src.models.SuperModel import SIDModel  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(src)
  exp = pathlib.Path(loadable["root"] / "export")
  # pylint: disable=protected-access
  root, ckpt = infer._resolve_checkpoint_dir(exp, "latest")
  base = infer._resolve_base_source(root, None)
  assert base == exp  # nothing falls back to a base SD folder
  pipe = infer._load_pipeline_from_checkpoint(
      root, ckpt, base, infer._resolve_label_embed_source(root, None), torch.device("cpu"))
  # pylint: enable=protected-access
  run = loadable["run"]
  ref, tr, fr = run.refiner, run.trainable, run.frozen
  with torch.no_grad():
    pos, neg = pipe.encode_prompt("", "cpu", 1, True, None)
  ctx = np.asarray(fr["context"])
  for states in (pos, neg):
    np.testing.assert_allclose(states.numpy(), ctx, atol=1e-6 * np.abs(ctx).max())
  rng = np.random.default_rng(0)
  z_img, z_coarse, z_t = (rng.normal(size=(1, 2, 2, 4)).astype(np.float32) for _ in range(3))
  z = jnp.concatenate([z_img, z_coarse])
  skips, mid = ref.unet.apply({"params": fr["unet_ori"]}, z, jnp.full((2,), 1),
                              ref.context(fr, 2), method=ref.unet.encode)
  cond = refiner.Conditions(tuple(s[:1] for s in skips), mid[:1], tuple(s[1:] for s in skips),
                            mid[1:])
  eps_c, eps_u = ref.eps_cfg(tr, fr, jnp.asarray(z_t), jnp.int32(500), cond)
  ours = np.asarray(eps_u + 3.0 * (eps_c - eps_u))
  sid = SIDModel(unet_gen=pipe.unet_gen, interact_net=pipe.interact_net,
                 label_embed_net=pipe.label_embed_net, unet_ori=pipe.unet_ori)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  with torch.no_grad():
    pred, _ = sid.predict(noise_latents=torch.cat([nchw(z_t)] * 2), img_latents=nchw(z_img),
                          seg_latents=nchw(z_coarse), timesteps=torch.tensor(500),
                          encoder_hidden_states=torch.cat([neg, pos]))
  uncond, cond_eps = pred.chunk(2)  # the original's [uncond | cond]
  theirs = (uncond + 3.0 * (cond_eps - uncond)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())
