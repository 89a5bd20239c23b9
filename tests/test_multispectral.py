"""Multispectral (C-band, e.g. RGBIR) input: the first-conv adaptation rule and its invariance,
Stage I backbones and Stage II's autoencoder / refiner on 4 bands, the data path (normalisation,
resizing, the 4-band synthetic dataset, band-count errors) and a 4-band Stage I run through
`idgbr train`'s code path."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from idgbr_configs import stage1_synthetic, stage2_synthetic
from idgbr_datasets.synthetic_rs import scenes
from idgbr_datasets.synthetic_rs import synthetic_rs
from idgbr_jax.assembly import stage1 as assembly1
from idgbr_jax.assembly import stage2 as assembly2
from idgbr_jax.checkpoints import params as params_ckpt
from idgbr_jax.convert import bands
from idgbr_jax.data import pipeline, sources, transforms
from idgbr_jax.models import autoencoder, backbones, refiner

TINY_AE = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8)


def _with_mean_band(x, extra=1):
  """x (..., 3) -> (..., 3 + extra) whose extra bands equal the mean of the three."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return jnp.concatenate([x] + [mean] * extra, axis=-1)


# ----- the adaptation rule ----------------------------------------------------------------------
@pytest.mark.parametrize("channels", [4, 5])
def test_expanded_kernel_keeps_outputs_when_extra_bands_equal_the_rgb_mean(channels):
  k = jax.random.normal(jax.random.key(0), (3, 3, 3, 8))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  k4 = autoencoder.expand_input_kernel(np.asarray(k), channels)
  assert k4.shape == (3, 3, channels, 8)
  np.testing.assert_allclose(conv(_with_mean_band(x, channels - 3), k4), conv(x, k), atol=1e-5)
  # An extra band that differs from the RGB mean enters through V = mean of the RGB kernels.
  x4 = _with_mean_band(x, channels - 3).at[..., 3].add(1.0)
  np.testing.assert_allclose(conv(x4, k4) - conv(x, k),
                             conv(jnp.ones_like(x[..., :1]), np.mean(k, axis=2, keepdims=True)),
                             atol=1e-5)


def test_expanded_kernel_respects_band_positions():
  k = np.random.default_rng(0).normal(size=(1, 1, 3, 2)).astype(np.float32)
  k4 = autoencoder.expand_input_kernel(k, 4, rgb_bands=(1, 2, 3))  # an IR-first order
  x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
  x4 = np.concatenate([x.mean(-1, keepdims=True), x], axis=-1)
  np.testing.assert_allclose(x4 @ k4[0, 0], x @ k[0, 0], atol=1e-6)
  with pytest.raises(ValueError, match="rgb_bands"):
    autoencoder.expand_input_kernel(k, 4, rgb_bands=(0, 1, 4))


# ----- Stage I backbones -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet", "deeplabv3plus", "segformer"])
def test_backbone_trains_a_step_on_four_bands(name):
  model = backbones.get_backbone(name, 3, "tiny", in_channels=4)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 4))
  labels = jnp.tile(jnp.arange(32) % 3, (2, 32, 1))
  variables = nn.meta.unbox(model.init(jax.random.key(1), x, train=False))
  assert "batch_stats" in variables

  def loss_fn(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
  first = bands.FIRST_CONV[name][:-1]
  kernel_grad = grads
  for key in first:
    kernel_grad = kernel_grad[key]
  assert np.isfinite(float(loss))
  assert kernel_grad["kernel"].shape[2] == 4
  assert float(jnp.abs(kernel_grad["kernel"][:, :, 3]).sum()) > 0  # the 4th band learns
  with pytest.raises(ValueError, match="in_channels=4"):
    model.apply(variables, x[..., :3], train=False)


@pytest.mark.parametrize("name", ["unet", "deeplabv3plus", "segformer"])
def test_adapted_backbone_keeps_logits_for_a_mean_fourth_band(name):
  x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  model3 = backbones.get_backbone(name, 3, "tiny")
  variables = nn.meta.unbox(model3.init(jax.random.key(1), x, train=False))
  model4 = backbones.get_backbone(name, 3, "tiny", in_channels=4)
  adapted = bands.adapt_backbone(variables, name, 4)
  want = model3.apply(variables, x, train=False)
  got = model4.apply(adapted, _with_mean_band(x), train=False)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_stage1_assembly_builds_the_configured_band_count():
  config = stage1_synthetic.get_config("runlocal,channels=4")
  assert config.data.in_channels == 4
  model = assembly1.build_model(config, 6)
  assert model.config.in_channels == 4
  shapes = jax.eval_shape(assembly1.variables_init_fn(model, 32), jax.random.key(0))
  kernel = nn.meta.unbox(shapes)["params"]["down0"]["block0"]["conv"]["kernel"]
  assert kernel.shape[2] == 4
  assert stage1_synthetic.get_config("runlocal").data.in_channels == 3


# ----- Stage II autoencoder ----------------------------------------------------------------------
def test_autoencoder_image_stem_keeps_the_label_path_and_adapts_like_the_rgb_one():
  cfg3 = autoencoder.get_config("tiny", **TINY_AE, sample_posterior=False)
  cfg4 = dataclasses.replace(cfg3, image_channels=4)
  ae3, ae4 = autoencoder.AutoencoderKL(cfg3), autoencoder.AutoencoderKL(cfg4)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  p3 = nn.meta.unbox(ae3.init(jax.random.key(1), x, None, False))["params"]
  # Random init with a stem: both stems exist whichever band count init saw.
  p4_init = nn.meta.unbox(ae4.init(jax.random.key(1), x, None, False))["params"]
  assert p4_init["encoder"]["conv_in_image"]["kernel"].shape[2] == 4
  assert p4_init["decoder"]["conv_out_image"]["kernel"].shape[3] == 4
  # Adapting a 3-band VAE: every 3-band param is kept, so label colours encode as before.
  p4 = autoencoder.with_image_stem(p3, cfg4)
  for path in (("encoder", "conv_in"), ("decoder", "conv_out"), ("quant_conv",)):
    a, b = p3, p4
    for key in path:
      a, b = a[key], b[key]
    np.testing.assert_array_equal(np.asarray(a["kernel"]), np.asarray(b["kernel"]))
  enc = lambda m, p, x: m.apply({"params": p}, x, method=m.encode).mean  # noqa: E731
  np.testing.assert_array_equal(enc(ae4, p4, x), enc(ae3, p3, x))        # label / RGB path
  np.testing.assert_allclose(enc(ae4, p4, _with_mean_band(x)), enc(ae3, p3, x), atol=1e-5)
  z = enc(ae3, p3, x)
  rgb = ae3.apply({"params": p3}, z, method=ae3.decode)
  img = ae4.apply({"params": p4}, z, image=True, method=ae4.decode)
  assert img.shape[-1] == 4
  np.testing.assert_allclose(img[..., :3], rgb, atol=1e-5)
  np.testing.assert_allclose(img[..., 3], rgb.mean(-1), atol=1e-5)
  # __call__ reconstructs the bands it was given; the loss trains the 4-band path.
  recon, _ = ae4.apply({"params": p4}, _with_mean_band(x), None, False)
  assert recon.shape[-1] == 4
  with pytest.raises(ValueError, match="5 bands"):
    ae4.apply({"params": p4}, jnp.zeros((1, 16, 16, 5)), method=ae4.encode)


def test_autoencoder_checkpoint_adaptation(tmp_path):
  cfg3 = autoencoder.get_config("tiny", **TINY_AE)
  p3 = nn.meta.unbox(autoencoder.AutoencoderKL(cfg3).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), None, False))["params"]
  params_ckpt.save_params(str(tmp_path / "ae3"), p3,
                          {"kind": "autoencoder", "config": dataclasses.asdict(cfg3)})
  bands.adapt_autoencoder_checkpoint(str(tmp_path / "ae3"), str(tmp_path / "ae4"), 4)
  meta = params_ckpt.load_meta(str(tmp_path / "ae4"))
  assert meta["config"]["image_channels"] == 4
  p4 = params_ckpt.load_params(str(tmp_path / "ae4"))
  np.testing.assert_allclose(p4["encoder"]["conv_in_image"]["kernel"],
                             autoencoder.expand_input_kernel(
                                 np.asarray(p3["encoder"]["conv_in"]["kernel"]), 4), atol=1e-7)


# ----- data --------------------------------------------------------------------------------------
def test_normalisation_of_extra_bands():
  image = np.random.default_rng(0).integers(0, 256, (4, 4, 4), dtype=np.uint8)
  out = transforms.normalize_image(image, "imagenet")
  np.testing.assert_array_equal(out[..., :3], transforms.normalize_image(image[..., :3],
                                                                         "imagenet"))
  np.testing.assert_allclose(out[..., 3], (image[..., 3] / 255.0 - transforms.EXTRA_BAND_MEAN)
                             / transforms.EXTRA_BAND_STD, rtol=1e-6)
  for mode in ("minus_one_one", "unit"):
    np.testing.assert_array_equal(transforms.normalize_image(image, mode)[..., :3],
                                  transforms.normalize_image(image[..., :3], mode))


def test_resize_keeps_rgb_of_a_four_band_image():
  # PIL would treat a 4-band uint8 image as RGBA and premultiply by the 4th band.
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
  image[..., 3] = rng.integers(0, 8, (16, 16))  # a dark NIR band, a near-transparent "alpha"
  label = np.zeros((16, 16), np.int32)
  out = transforms.Resize(8).map({"image": image, "label": label})["image"]
  ref = transforms.Resize(8).map({"image": image[..., :3].copy(), "label": label})["image"]
  assert out.shape == (8, 8, 4)
  np.testing.assert_array_equal(out[..., :3], ref)


def test_band_count_mismatch_names_the_key_and_the_record():
  parse = transforms.ParseExample(6, num_channels=4, source="isprs/rgbir[train]")
  record = {"image": np.zeros((8, 8, 3), np.uint8), "label": np.zeros((8, 8, 1), np.uint8),
            "id": b"top_potsdam_2_10_y0_x0"}
  with pytest.raises(sources.DataError) as e:
    parse.map(record)
  msg = str(e.value)
  assert "config.data.in_channels=4" in msg and "top_potsdam_2_10_y0_x0" in msg
  assert "isprs/rgbir[train]" in msg and "3 bands" in msg


def test_synthetic_four_band_scene_keeps_rgb_and_adds_a_vegetation_bright_nir():
  for index in range(3):
    rgb, label = scenes.generate_example("multiclass6", 64, 0, "train", index)
    rgbn, label4 = scenes.generate_example("multiclass6", 64, 0, "train", index, channels=4)
    np.testing.assert_array_equal(rgbn[..., :3], rgb)
    np.testing.assert_array_equal(label4, label)
    nir = rgbn[..., 3].astype(np.float32)
    vegetation = np.isin(label, (2, 3))  # low vegetation, tree
    impervious = label == 0
    if vegetation.any() and impervious.any():
      assert nir[vegetation].mean() > nir[impervious].mean() + 40
  assert synthetic_rs.config_name("multiclass6", 64, 8, 4, 0) == "multiclass6_s64_tr8_te4_seed0"
  assert synthetic_rs.config_name("multiclass6", 64, 8, 4, 0, channels=4).endswith("_c4")
  with pytest.raises(ValueError, match="channels"):
    scenes.generate_example("multiclass6", 64, 0, "train", 0, channels=5)


def test_data_config_has_in_channels():
  assert sources.data_config("potsdam").in_channels == 3
  with pytest.raises(ValueError, match="bogus"):
    sources.data_config("potsdam", bogus=1)
  from idgbr_configs import potsdam_stage1, potsdam_stage2  # pylint: disable=g-import-not-at-top
  c1 = potsdam_stage1.get_config("segformer,channels=rgbir")
  assert c1.data.in_channels == 4 and c1.data.tfds_config.startswith("rgbir_")
  c2 = potsdam_stage2.get_config("channels=rgbir,runlocal")
  assert c2.data.in_channels == 4 and c2.data.tfds_config.startswith("rgbir_")
  assert potsdam_stage1.get_config("unet").data.in_channels == 3
  with pytest.raises(ValueError, match="channels"):
    potsdam_stage1.get_config("unet,channels=rgbx")


def _optim(lr):
  return dict(learning_rate=lr, weight_decay=0.0, b1=0.9, b2=0.999, schedule="constant",
              warmup_steps=0, clip_norm=0.0)


@pytest.mark.slow  # compiles a Stage II / autoencoder training step
def test_autoencoder_pretraining_on_four_bands_trains_the_image_stem(tmp_path):
  from idgbr_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  le_cfg = ml_collections.ConfigDict(dict(num_classes=6, hidden=8, steps=1, batch_size=2,
                                          size=8, noise_std=0.15, seed=0, train_table=False,
                                          optim=_optim(1e-2)))
  pretrain.train_label_embedding(le_cfg, str(tmp_path / "le"))
  data_config = stage2_synthetic.get_config("runlocal,channels=4")
  data_config.data.data_dir = str(tmp_path / "tfds")
  data_config.mesh_shape.data = 1
  ae_cfg = ml_collections.ConfigDict(dict(
      variant="tiny", overrides=dict(block_out_channels=(8, 16, 16), norm_num_groups=8),
      steps=2, kl_weight=1e-6, label_ce_weight=1.0, seed=0, optim=_optim(1e-3)))
  out = pretrain.train_autoencoder(ae_cfg, data_config, str(tmp_path / "le"),
                                   str(tmp_path / "ae"))
  assert np.isfinite(out["l1"]) and 0.0 <= out["label_accuracy"] <= 1.0
  assert out["params"]["encoder"]["conv_in_image"]["kernel"].shape[2] == 4
  assert out["params"]["encoder"]["conv_in"]["kernel"].shape[2] == 3
  # Stage II takes the 4-band stem from the checkpoint as it is.
  data_config.init.autoencoder = str(tmp_path / "ae")
  data_config.init.label_embed = str(tmp_path / "le")
  assert assembly2.refiner_config(data_config, 6).autoencoder.image_channels == 4
  data_config.data.in_channels = 5
  with pytest.raises(ValueError, match="image stem for 4 bands"):
    assembly2.refiner_config(data_config, 6)


# ----- Stage II refiner --------------------------------------------------------------------------
def _stage2_config(tmp_path):
  config = stage2_synthetic.get_config("runlocal,channels=4")
  config.model.denoiser_overrides = ml_collections.ConfigDict(dict(
      block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")))
  config.model.guidance_width = 16
  config.model.guidance_heads = 2
  config.data.image_size = 32
  config.optim.schedule = "constant"
  config.optim.learning_rate = 1e-3
  config.mesh_shape.data = 1
  # A 3-band autoencoder checkpoint (as converted SD-1.5 is): adapted to 4 bands on load.
  cfg3 = autoencoder.get_config("tiny")
  p3 = nn.meta.unbox(autoencoder.AutoencoderKL(cfg3).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), None, False))["params"]
  params_ckpt.save_params(str(tmp_path / "ae3"), p3,
                          {"kind": "autoencoder", "config": dataclasses.asdict(cfg3)})
  config.init.autoencoder = str(tmp_path / "ae3")
  return config, p3


@pytest.mark.slow  # compiles a Stage II / autoencoder training step
def test_refiner_trains_on_four_bands_from_a_three_band_autoencoder(tmp_path):
  from idgbr_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from idgbr_jax.train import optim, stage2  # pylint: disable=g-import-not-at-top
  config, p3 = _stage2_config(tmp_path)
  assert config.data.in_channels == 4
  rc = assembly2.refiner_config(config, 6)
  assert rc.autoencoder.image_channels == 4 and rc.autoencoder.in_channels == 3
  mesh = sharding.make_mesh(config.mesh_shape.to_dict())
  rules = tuple(config.sharding_rules)
  ref = refiner.Refiner(rc)
  tx, lr = optim.make_optimizer(config.optim, config.num_train_steps)
  state, state_sh = stage2.init_state(ref, tx, config, mesh, rules)
  frozen, f_sh = stage2.init_frozen(ref, config, state, state_sh, mesh, rules)
  vae = frozen["vae"]
  np.testing.assert_array_equal(np.asarray(vae["encoder"]["conv_in"]["kernel"]),
                                np.asarray(p3["encoder"]["conv_in"]["kernel"]))
  np.testing.assert_allclose(np.asarray(vae["encoder"]["conv_in_image"]["kernel"]),
                             autoencoder.expand_input_kernel(
                                 np.asarray(p3["encoder"]["conv_in"]["kernel"]), 4), atol=1e-7)
  rng = np.random.default_rng(0)
  label = np.zeros((8, 32, 32), np.int32)
  label[:, :, 16:] = 1
  image = rng.normal(size=(8, 32, 32, 4)).astype(np.float32) * 0.1 + label[..., None] * 0.5
  batch = {"image": image, "label": label, "coarse": np.roll(label, 2, axis=1)}
  # The teacher reads the RGB bands.
  tok4 = ref.teacher_tokens(frozen, jnp.asarray(image[:1]))
  tok3 = ref.teacher_tokens(frozen, jnp.asarray(image[:1, ..., :3]))
  np.testing.assert_array_equal(tok4, tok3)
  step = jax.jit(stage2.make_train_step(ref, tx, lr, assembly2.make_schedule(config), config),
                 in_shardings=(state_sh, f_sh, stage2.batch_shardings(mesh, rules),
                               sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)))
  before = jax.tree.map(np.asarray, state["params"]["guidance"])
  batch = pipeline.to_global(batch, mesh)
  for _ in range(2):
    state, m = step(state, frozen, batch, jax.random.key(0))
  metrics = m.compute()
  assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 2
  changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before,
                         state["params"]["guidance"])
  assert any(jax.tree.leaves(changed))
  # The latent cache encodes 4-band images through the image stem, as the step does.
  from idgbr_jax.train import latent_cache  # pylint: disable=g-import-not-at-top
  records = [{"image": (rng.random((32, 32, 4)) * 255).astype(np.uint8),
              "label": label[i, ..., None].astype(np.uint8),
              "coarse": np.roll(label[i], 2, axis=1)[..., None].astype(np.uint8),
              "id": f"r{i}"} for i in range(2)]
  real_source = sources.get_source
  sources.get_source = lambda cfg, split: records
  try:
    config.data.augment = "none"
    config.data.num_folds = 0
    with jax.set_mesh(mesh):
      cache = latent_cache.build(ref, frozen, f_sh, config, 6, mesh, rules, coarse_dir=None,
                                 batch_size=8)
  finally:
    sources.get_source = real_source
  e = transforms.Normalize(config.data.normalization, keep_id=True).map(dict(records[1]))
  want = jax.jit(ref.image_moments)(frozen, jnp.asarray(e["image"][None]))
  np.testing.assert_allclose(cache.moments["image"][cache.rows["r1"]], np.asarray(want),
                             rtol=1e-4, atol=1e-4)


# ----- end to end ----------------------------------------------------------------------------
def test_four_band_stage1_trains_through_idgbr_train(tmp_path):
  from idgbr_jax.commands import train as train_command  # pylint: disable=g-import-not-at-top
  config = stage1_synthetic.get_config("runlocal,channels=4")
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.image_size = 32
  config.data.num_train = 8
  config.data.num_test = 8
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.optim.warmup_steps = 1
  out = train_command.run(config, str(tmp_path / "run"))
  kernel = out["state"]["params"]["down0"]["block0"]["conv"]["kernel"]
  assert kernel.shape[2] == 4
  assert out["eval"] and all(np.isfinite(v) for v in jax.tree.leaves(out["eval"])
                             if np.ndim(v) == 0)
  source = sources.get_source(config.data, "train")
  assert np.asarray(source[0]["image"]).shape == (32, 32, 4)
