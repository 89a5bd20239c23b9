"""AutoencoderKL: config variants, diffusers parity and conversion, sampling switch, training."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

import numerics
from idgbr_jax.convert import diffusers_vae
from idgbr_jax.convert.diffusers_folder import autoencoder_config_from_diffusers
from idgbr_jax.models import autoencoder as ae
from idgbr_jax.parallel import sharding

SD15_PARAMS = 83_653_863  # diffusers AutoencoderKL with the SD-1.5 vae/config.json

# runwayml/stable-diffusion-v1-5 vae/config.json (diffusers 0.6.0: no scaling_factor key).
SD15_DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# tiny with 2 resnets per level so multi-resnet and shortcut paths are exercised.
PARITY_CONFIG = ae.get_config("tiny", layers_per_block=2)


def _init(config, size=32, batch=1, seed=0):
  model = ae.AutoencoderKL(config)
  key = jax.random.key(seed)
  # jit: one compile (persistently cached) instead of op-by-op dispatch.
  variables = jax.jit(model.init)(key, jnp.zeros((batch, size, size, config.in_channels)), key)
  return model, nn.meta.unbox(variables)["params"]


def _max_rel_err(actual, expected):
  """max |a - e| / max |e|: a relative error that stays meaningful where e crosses zero."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


# ---------------------------------------------------------------- config


def test_sd15_param_count_and_table_match_model():
  config = ae.get_config("sd15")
  key = jax.random.key(0)
  shapes = jax.eval_shape(ae.AutoencoderKL(config).init, key, jnp.zeros((1, 8, 8, 3)), key)
  boxed = traverse_util.flatten_dict(shapes["params"])
  # Every parameter carries logical axis names for the sharding rules.
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed.values())
  # ... and the rules table places them: a 512->512 conv splits over fsdp (in) and tensor (out).
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = traverse_util.flatten_dict(sharding.param_shardings(shapes["params"], mesh))
  kernel = ("decoder", "up_blocks_0_resnets_0", "conv1", "kernel")
  assert tuple(shardings[kernel].spec) == (None, None, "fsdp", "tensor")
  flat = {k: v.value for k, v in boxed.items()}
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == SD15_PARAMS
  assert diffusers_vae.vae_param_count(config) == SD15_PARAMS
  # The converter's table covers exactly the model's params, with the right flax shapes.
  table = {e.flax_path: diffusers_vae._flax_shape(e) for e in diffusers_vae._param_table(config)}
  assert table == {k: tuple(v.shape) for k, v in flat.items()}


def test_variants_and_from_diffusers():
  sd15 = ae.get_config("sd15")
  assert sd15.block_out_channels == (128, 256, 512, 512) and sd15.layers_per_block == 2
  assert sd15.latent_channels == 4 and sd15.norm_num_groups == 32 and sd15.norm_eps == 1e-6
  assert sd15.scaling_factor == 0.18215 and sd15.downsample_factor == 8
  assert sd15.sample_posterior  # IDGBR encodes with a posterior sample
  assert ae.get_config("tiny").downsample_factor == 8
  assert ae.get_config("small").downsample_factor == 8
  assert autoencoder_config_from_diffusers(SD15_DIFFUSERS_CONFIG) == sd15
  assert autoencoder_config_from_diffusers(SD15_DIFFUSERS_CONFIG, remat=True).remat
  assert ae.get_config("tiny", sample_posterior=False).sample_posterior is False


def test_config_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="huge"):
    ae.get_config("huge")
  with pytest.raises(ValueError, match="latent_chans"):
    ae.get_config("tiny", latent_chans=8)
  with pytest.raises(ValueError, match="down_block_types"):
    autoencoder_config_from_diffusers(
        {**SD15_DIFFUSERS_CONFIG, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
  with pytest.raises(ValueError, match="shift_factor"):
    autoencoder_config_from_diffusers({**SD15_DIFFUSERS_CONFIG, "shift_factor": 0.1})
  with pytest.raises(ValueError, match="divisible"):
    ae.get_config("tiny", norm_num_groups=7)
  path = tmp_path / "config.json"
  path.write_text(__import__("json").dumps(SD15_DIFFUSERS_CONFIG))
  assert autoencoder_config_from_diffusers(str(path)) == ae.get_config("sd15")


# ---------------------------------------------------------------- diffusers parity


def _random_diffusers_vae(torch, config):
  from diffusers import AutoencoderKL as TorchAutoencoderKL
  n = len(config.block_out_channels)
  model = TorchAutoencoderKL(
      in_channels=config.in_channels, out_channels=config.out_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
      latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups)
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:  # fan-in scaled so activations stay O(1) through the deep stack
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:  # biases, incl. norm shifts
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


@pytest.mark.torch
def test_diffusers_parity_and_round_trip():
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  config = PARITY_CONFIG
  torch_model = _random_diffusers_vae(torch, config)
  state_dict = torch_model.state_dict()
  params = diffusers_vae.vae_params_from_torch(state_dict, config)
  model = ae.AutoencoderKL(config)

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    dist = torch_model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    ref_mean = dist.mean.numpy().transpose(0, 2, 3, 1)
    ref_logvar = dist.logvar.numpy().transpose(0, 2, 3, 1)
    ref_image = torch_model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
    ref_image = ref_image.numpy().transpose(0, 2, 3, 1)

  variables = {"params": params}
  posterior = jax.jit(functools.partial(model.apply, method=ae.AutoencoderKL.encode))(
      variables, jnp.asarray(x))
  image = jax.jit(functools.partial(model.apply, method=ae.AutoencoderKL.decode))(
      variables, jnp.asarray(z))
  assert np.std(ref_mean) > 0.05 and np.std(ref_image) > 0.05  # a non-degenerate comparison
  assert _max_rel_err(posterior.mean, ref_mean) <= 1e-4
  assert _max_rel_err(posterior.logvar, ref_logvar) <= 1e-4
  assert _max_rel_err(image, ref_image) <= 1e-4

  # Round trip is exact, in both attention namings.
  back = diffusers_vae.vae_params_to_torch(params, config)
  assert set(back) == set(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  legacy = diffusers_vae.vae_params_to_torch(params, config, legacy_attention_names=True)
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert not any(".to_q." in k for k in legacy)
  params_legacy = diffusers_vae.vae_params_from_torch(legacy, config)
  jax.tree.map(np.testing.assert_array_equal, params_legacy, params)


def _fake_state_dict(config):
  """A numpy state dict with the right keys and shapes (no torch needed)."""
  rng = np.random.default_rng(1)
  return {e.torch_key: rng.normal(size=e.torch_shape).astype(np.float32)
          for e in diffusers_vae._param_table(config)}


def test_conversion_errors_name_the_key():
  config = ae.get_config("tiny")
  sd = _fake_state_dict(config)
  params = diffusers_vae.vae_params_from_torch(sd, config)
  back = diffusers_vae.vae_params_to_torch({"params": params}, config)
  assert all(np.array_equal(back[k], sd[k]) for k in sd)

  key = "decoder.up_blocks.1.resnets.0.conv1.weight"
  with pytest.raises(ValueError, match="missing.*" + key):
    diffusers_vae.vae_params_from_torch({k: v for k, v in sd.items() if k != key}, config)
  with pytest.raises(ValueError, match="unexpected.*encoder.extra.weight"):
    diffusers_vae.vae_params_from_torch({**sd, "encoder.extra.weight": sd[key]}, config)
  with pytest.raises(ValueError, match="shape mismatch.*" + key):
    diffusers_vae.vae_params_from_torch({**sd, key: sd[key][:, :-1]}, config)
  with pytest.raises(ValueError, match="missing flax.*quant_conv"):
    diffusers_vae.vae_params_to_torch({k: v for k, v in params.items() if k != "quant_conv"},
                                      config)
  bad = dict(params)
  bad["quant_conv"] = {"kernel": np.zeros((1, 1, 8, 7), np.float32),
                       "bias": params["quant_conv"]["bias"]}
  with pytest.raises(ValueError, match="shape mismatch.*quant_conv/kernel"):
    diffusers_vae.vae_params_to_torch(bad, config)


# ---------------------------------------------------------------- sampling switch


def test_sample_vs_mode_and_scaling():
  config = ae.get_config("tiny")
  model, params = _init(config, size=16, batch=2)
  variables = {"params": params}
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  k1, k2 = jax.random.key(2), jax.random.key(3)

  @functools.partial(jax.jit, static_argnums=(1,))
  def latents(rng, sample_posterior):
    return model.apply(variables, x, rng, sample_posterior, method=ae.AutoencoderKL.encode_latents)

  posterior = jax.jit(functools.partial(model.apply, method=ae.AutoencoderKL.encode))(variables, x)
  assert posterior.mean.shape == (2, 2, 2, 4)
  assert float(jnp.max(posterior.logvar)) <= 20.0 and float(jnp.min(posterior.logvar)) >= -30.0
  np.testing.assert_allclose(posterior.std, np.exp(0.5 * np.asarray(posterior.logvar)),
                             rtol=1e-6)
  # KL(q || N(0, I)) matches its closed form.
  m, lv = np.asarray(posterior.mean), np.asarray(posterior.logvar)
  np.testing.assert_allclose(posterior.kl(), 0.5 * (m**2 + np.exp(lv) - 1 - lv).sum((1, 2, 3)),
                             rtol=1e-5)

  s1, s1b, s2 = latents(k1, True), latents(k1, True), latents(k2, True)
  np.testing.assert_array_equal(s1, s1b)
  assert float(jnp.max(jnp.abs(s1 - s2))) > 1e-3
  # The sample is mean + std * eps, scaled.
  eps = (np.asarray(s1) / config.scaling_factor - m) / np.asarray(posterior.std)
  np.testing.assert_allclose(eps, jax.random.normal(k1, m.shape), rtol=1e-4, atol=1e-4)
  # The mode ignores the rng and equals the scaled mean.
  np.testing.assert_array_equal(latents(k1, False), latents(k2, False))
  np.testing.assert_allclose(latents(None, False), m * config.scaling_factor, rtol=1e-5, atol=1e-6)
  # The config flag decides when the call does not.
  mean_model = ae.AutoencoderKL(dataclasses.replace(config, sample_posterior=False))
  np.testing.assert_allclose(  # separately compiled, so not bit-identical
      jax.jit(functools.partial(mean_model.apply, method=ae.AutoencoderKL.encode_latents))(
          variables, x, k1),
      latents(k2, False), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="rng"):
    latents(None, True)
  # decode_latents undoes the scaling.
  z = latents(k1, True)
  decoded, expected = jax.jit(lambda z: (
      model.apply(variables, z, method=ae.AutoencoderKL.decode_latents),
      model.apply(variables, z / config.scaling_factor, method=ae.AutoencoderKL.decode)))(z)
  np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training


def test_remat_matches_plain_loss_and_grads():
  config = ae.get_config("tiny")
  model, params = _init(config, size=16)
  remat_model = ae.AutoencoderKL(dataclasses.replace(config, remat=True))
  _, remat_params = _init(remat_model.config, size=16)
  assert jax.tree.structure(remat_params) == jax.tree.structure(params)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  key = jax.random.key(4)
  grad = jax.jit(jax.grad(lambda p, m: ae.autoencoder_loss(m, p, x, key)[0]), static_argnums=1)
  g_plain, g_remat = grad(params, model), grad(params, remat_model)
  # remat recomputes the forward pass inside the backward one: the same sums, compiled and fused
  # differently, so equal to float32 rounding (tests/numerics.py); n: the batch's 2 x 16 x 16
  # pixels, which the loss averages.
  numerics.assert_close_up_to_rounding(g_remat, g_plain, n_terms=2 * 16 * 16, err_msg="grad")


def test_adam_steps_lower_the_loss():
  config = ae.get_config("tiny")
  model, params = _init(config, size=16)
  # Smooth images (low-frequency patterns) that a tiny autoencoder can learn quickly.
  yy, xx = np.meshgrid(np.linspace(0, 1, 16), np.linspace(0, 1, 16), indexing="ij")
  images = np.stack([np.stack([np.sin(3 * xx + c + b), np.cos(2 * yy - c), xx * yy * 2 - 1], -1)
                     for b, c in ((0.0, 0.5), (1.0, 1.5))]).astype(np.float32)
  images = jnp.asarray(images)
  tx = optax.adam(2e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    (loss, aux), grads = jax.value_and_grad(ae.autoencoder_loss, argnums=1, has_aux=True)(
        model, params, images, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  losses = []
  for i in range(25):
    params, opt_state, aux = step(params, opt_state, jax.random.key(i))
    losses.append(float(aux["loss"]))
    assert np.isfinite(losses[-1]) and float(aux["kl"]) >= 0.0
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
