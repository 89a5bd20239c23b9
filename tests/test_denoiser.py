"""Tests for the Stage II denoiser UNet and its diffusers converter."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import numerics
from idgbr_jax.convert import diffusers_unet
from idgbr_jax.convert.diffusers_folder import denoiser_config_from_diffusers
from idgbr_jax.models import denoiser
from idgbr_jax.models.denoiser import DenoiserConfig, UNet2DConditionModel
from idgbr_jax.parallel import sharding

# SD-1.5's unet/config.json (runwayml/stable-diffusion-v1-5), verbatim keys and values.
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
SD15_PARAM_COUNT = 859_520_964

TINY = denoiser.get_config("tiny")
# diffusers kwargs that build the torch twin of TINY.
TINY_DIFFUSERS = dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=2,
                      cross_attention_dim=32, norm_num_groups=8)
# Two levels, same block kinds as SD (attention shallow, plain deep): cheap to compile.
MICRO = DenoiserConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",
                       "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                       num_heads=2, cross_attention_dim=16, norm_num_groups=4)


def _rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- config (no torch)

def test_sd15_variant_matches_diffusers_config_json():
  assert denoiser_config_from_diffusers(SD15_CONFIG_JSON) == denoiser.get_config("sd15")
  # The "attention_head_dim: 8" naming trap: it is the number of heads.
  assert denoiser.get_config("sd15").heads_per_level == (8, 8, 8, 8)


def test_from_diffusers_rejects_unsupported_keys_and_values():
  with pytest.raises(ValueError, match="class_embed_type"):
    denoiser_config_from_diffusers({**SD15_CONFIG_JSON, "class_embed_type": "timestep"})
  with pytest.raises(ValueError, match="not_a_key"):
    denoiser_config_from_diffusers({**SD15_CONFIG_JSON, "not_a_key": 1})
  with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
    denoiser_config_from_diffusers({**SD15_CONFIG_JSON, "down_block_types": [
        "SimpleCrossAttnDownBlock2D"] * 4})
  # Defaults written out explicitly (as newer diffusers saves them) are accepted.
  explicit = {**SD15_CONFIG_JSON, "class_embed_type": None, "dropout": 0.0,
              "transformer_layers_per_block": 1, "upcast_attention": False}
  assert denoiser_config_from_diffusers(explicit) == denoiser.get_config("sd15")


def test_get_config_errors_and_skip_layout():
  with pytest.raises(ValueError, match="sd99"):
    denoiser.get_config("sd99")
  with pytest.raises(ValueError, match="bogus"):
    denoiser.get_config("tiny", bogus=1)
  sd15 = denoiser.get_config("sd15")
  # Dossier §1.4 skip table for a 64x64 latent.
  assert sd15.skip_channels == (320,) * 4 + (640,) * 3 + (1280,) * 5
  assert tuple(64 // f for f in sd15.skip_downscale) == (64,) * 3 + (32,) * 3 + (16,) * 3 + (8,) * 3
  assert len(TINY.skip_channels) == 12


def test_sd15_param_count():
  params = denoiser.abstract_params(denoiser.get_config("sd15"))
  assert denoiser.count_params(params) == SD15_PARAM_COUNT


def test_every_param_has_logical_axes_and_shards():
  model = UNet2DConditionModel(MICRO)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                                            jnp.zeros((1,)), jnp.zeros((1, 3, 16))))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shard = sharding.param_shardings(boxed, mesh)
  q = shard["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
  assert q.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_timestep_embedding_values():
  # Hand-computed: dim 4, half 2, freqs exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01]; flip -> cos|sin.
  emb = denoiser.timestep_embedding(jnp.array([0.0, 50.0]), 4)
  want = np.array([[1, 1, 0, 0], [np.cos(50), np.cos(0.5), np.sin(50), np.sin(0.5)]])
  np.testing.assert_allclose(emb, want, atol=1e-6)


# ----------------------------------------------------------------------------- model (no torch)

@pytest.fixture(scope="module")
def micro_setup():
  model = UNet2DConditionModel(MICRO)
  rng = np.random.RandomState(0)
  sample = jnp.asarray(rng.randn(2, 8, 8, 4), jnp.float32)
  context = jnp.asarray(rng.randn(2, 5, 16), jnp.float32)
  t = jnp.array([10, 900])
  params = jax.jit(model.init)(jax.random.key(0), sample, t, context)
  params = nn.unbox(params)["params"]
  # Random norms/biases so no zero/one init hides a bug.
  flat = traverse_util.flatten_dict(params)
  flat = {p: np.asarray(v) + 0.1 * rng.randn(*v.shape).astype(np.float32) for p, v in flat.items()}
  params = traverse_util.unflatten_dict(flat)
  shapes = MICRO.skip_shapes(8, 8)
  res = tuple(jnp.asarray(rng.randn(2, *s), jnp.float32) for s in shapes)
  mid_res = jnp.asarray(rng.randn(2, *shapes[-1]), jnp.float32)
  return model, params, sample, t, context, res, mid_res


def test_split_path_equals_call_and_encoder_only_params(micro_setup):
  model, params, sample, _, context, res, mid_res = micro_setup
  # Same timestep in both rows, so the scalar-timestep split path must equal the (B,) full path.
  t = jnp.array([10, 10])

  @jax.jit
  def run(p, enc_p, res, mid_res):
    full = model.apply({"params": p}, sample, t, context, res, mid_res)
    skips, mid = model.apply({"params": enc_p}, sample, t[0], context,
                             method=UNet2DConditionModel.encode)
    split = model.apply({"params": p}, skips, mid, t[0], context, res, mid_res,
                        method=UNet2DConditionModel.decode)
    return full, split, skips, mid

  enc_p = denoiser.encoder_params(params)
  assert sorted(enc_p) == ["conv_in", "down_blocks_0", "down_blocks_1", "mid_block",
                           "time_embedding"]
  assert denoiser.encoder_params({"params": params}) == {"params": enc_p}
  full, split, skips, mid = run(params, enc_p, res, mid_res)
  np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-5)
  assert [s.shape[1:] for s in skips] == list(MICRO.skip_shapes(8, 8))
  assert mid.shape[1:] == MICRO.skip_shapes(8, 8)[-1]
  # The residuals are used: zeroing them changes the output.
  zeros = jax.tree.map(jnp.zeros_like, (res, mid_res))
  plain, _, _, _ = run(params, enc_p, *zeros)
  assert _rel_err(plain, np.asarray(full)) > 1e-2


def test_skip_shapes_odd_sizes():
  sd15 = denoiser.get_config("sd15")
  shapes = sd15.skip_shapes(63, 50)
  assert shapes[0] == (63, 50, 320) and shapes[3] == (32, 25, 320)
  assert shapes[6] == (16, 13, 640) and shapes[-1] == (8, 7, 1280)


def test_bf16_close_to_fp32(micro_setup):
  model, params, sample, t, context, res, mid_res = micro_setup
  bf16_model = UNet2DConditionModel(MICRO, dtype=jnp.bfloat16)

  @jax.jit
  def run(p):
    return (model.apply({"params": p}, sample, t, context, res, mid_res),
            bf16_model.apply({"params": p}, sample, t, context, res, mid_res))

  f32, bf16 = run(params)
  assert bf16.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(bf16, np.float32)))
  assert _rel_err(bf16, np.asarray(f32)) < 3e-2


def test_remat_same_values_and_grads(micro_setup):
  model, params, sample, t, context, _, _ = micro_setup
  remat_model = UNet2DConditionModel(dataclasses.replace(MICRO, remat=True))
  # Odd latent size exercises the static upsample-size argument through nn.remat.
  odd = sample[:, :7, :5]

  @jax.jit
  def grads(p):
    loss = lambda m, p: jnp.mean(m.apply({"params": p}, odd, t, context) ** 2)
    return (jax.value_and_grad(lambda p: loss(model, p))(p),
            jax.value_and_grad(lambda p: loss(remat_model, p))(p))

  (l0, g0), (l1, g1) = grads(params)
  # The same sums, fused differently: equal to float32 rounding (tests/numerics.py); n: the
  # 2 x 7 x 5 x 4 outputs the loss averages.
  n = odd.size
  numerics.assert_close_up_to_rounding(l1, l0, n_terms=n, err_msg="loss")
  numerics.assert_close_up_to_rounding(g1, g0, n_terms=n, err_msg="grad")


# ----------------------------------------------------------------------------- torch parity

@pytest.fixture(scope="module")
def torch_tiny():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(**TINY_DIFFUSERS).eval()
  with torch.no_grad():  # randomise norms and biases too (defaults are ones/zeros)
    for name, p in ref.named_parameters():
      if p.ndim == 1 and name.endswith("weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  state = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
  return torch, ref, state


def _torch_inputs(torch, h, w, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(2, 4, h, w).astype(np.float32)
  ctx = rng.randn(2, 7, 32).astype(np.float32)
  t = np.array([3, 701])
  return x, ctx, t


@pytest.mark.torch
def test_config_and_param_count_agree_with_diffusers(torch_tiny):
  torch, ref, state = torch_tiny
  import diffusers
  cfg = denoiser_config_from_diffusers(dict(ref.config))
  assert cfg == TINY
  n_torch = sum(v.size for v in state.values())
  assert denoiser.count_params(denoiser.abstract_params(TINY)) == n_torch
  with torch.device("meta"):
    sd15 = diffusers.UNet2DConditionModel(**{k: v for k, v in SD15_CONFIG_JSON.items()
                                             if not k.startswith("_")})
  assert sum(p.numel() for p in sd15.parameters()) == SD15_PARAM_COUNT
  assert denoiser_config_from_diffusers(dict(sd15.config)) == denoiser.get_config("sd15")


@pytest.mark.torch
@pytest.mark.parametrize("h,w,with_residuals", [(16, 16, False), (16, 16, True), (13, 18, True)])
def test_forward_matches_diffusers(torch_tiny, h, w, with_residuals):
  torch, ref, state = torch_tiny
  params = diffusers_unet.unet_params_from_torch(state, TINY)
  x, ctx, t = _torch_inputs(torch, h, w)
  model = UNet2DConditionModel(TINY)
  kwargs, res, mid_res = {}, None, None
  if with_residuals:
    rng = np.random.RandomState(5)
    shapes = TINY.skip_shapes(h, w)
    res = tuple(rng.randn(2, *s).astype(np.float32) for s in shapes)
    mid_res = rng.randn(2, *shapes[-1]).astype(np.float32)
    kwargs = dict(down_block_additional_residuals=tuple(torch.from_numpy(_nchw(r)) for r in res),
                  mid_block_additional_residual=torch.from_numpy(_nchw(mid_res)))
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample
  got = jax.jit(lambda p: model.apply({"params": p}, _nhwc(x), t, ctx, res, mid_res))(params)
  assert got.shape == (2, h, w, 4)
  assert _rel_err(_nchw(got), want.numpy()) <= 1e-4


@pytest.mark.torch
def test_encode_matches_diffusers_down_path(torch_tiny):
  torch, ref, state = torch_tiny
  enc = denoiser.encoder_params(diffusers_unet.unet_params_from_torch(state, TINY))
  x, ctx, t = _torch_inputs(torch, 16, 16, seed=3)
  with torch.no_grad():  # diffusers' forward steps 1-4, by hand
    tx, tc = torch.from_numpy(x), torch.from_numpy(ctx)
    temb = ref.time_embedding(ref.time_proj(torch.from_numpy(t)))
    h = ref.conv_in(tx)
    want = [h]
    for block in ref.down_blocks:
      if getattr(block, "has_cross_attention", False):
        h, res = block(hidden_states=h, temb=temb, encoder_hidden_states=tc)
      else:
        h, res = block(hidden_states=h, temb=temb)
      want += list(res)
    want_mid = ref.mid_block(h, temb, encoder_hidden_states=tc)
  model = UNet2DConditionModel(TINY)
  skips, mid = jax.jit(lambda p: model.apply({"params": p}, _nhwc(x), t, ctx,
                                             method=UNet2DConditionModel.encode))(enc)
  assert len(skips) == len(want) == 12
  for got, w in zip(skips, want):
    assert _rel_err(_nchw(got), w.numpy()) <= 1e-4
  assert _rel_err(_nchw(mid), want_mid.numpy()) <= 1e-4


@pytest.mark.torch
def test_converter_round_trip_exact(torch_tiny):
  _, _, state = torch_tiny
  params = diffusers_unet.unet_params_from_torch(state, TINY)
  back = diffusers_unet.unet_params_to_torch(params, TINY)
  assert set(back) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v)
  again = diffusers_unet.unet_params_from_torch(back, TINY)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  assert diffusers_unet.unet_params_to_torch({"params": params}, TINY).keys() == back.keys()


@pytest.mark.torch
def test_converter_errors_name_the_key(torch_tiny):
  _, _, state = torch_tiny
  key = "down_blocks.1.resnets.0.conv_shortcut.weight"
  with pytest.raises(ValueError, match=f"missing keys.*{key}"):
    diffusers_unet.unet_params_from_torch({k: v for k, v in state.items() if k != key}, TINY)
  with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
    diffusers_unet.unet_params_from_torch({**state, "extra.weight": np.zeros(1)}, TINY)
  bad = {**state, "conv_in.weight": np.zeros((32, 4, 1, 1), np.float32)}
  with pytest.raises(ValueError,
                     match=r"conv_in.weight: expected \(32, 4, 3, 3\), got \(32, 4, 1, 1\)"):
    diffusers_unet.unet_params_from_torch(bad, TINY)
  params = diffusers_unet.unet_params_from_torch(state, TINY)
  params["conv_out"]["bias"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError, match="conv_out/bias"):
    diffusers_unet.unet_params_to_torch(params, TINY)
  # A config that disagrees with the weights (SD-1.5 layout vs tiny weights) fails loudly.
  with pytest.raises(ValueError, match="shape mismatch"):
    diffusers_unet.unet_params_from_torch(state, denoiser.get_config("tiny", num_heads=4,
                                                                     cross_attention_dim=16))


def test_sharded_apply_matches_unsharded(micro_setup):
  # One example per data shard on a 3-axis mesh: the case where XLA's partitioner went wrong
  # before the token-state constraints (denoiser._constrain_tokens) were added.
  model, params, sample, _, context, res, mid_res = micro_setup
  x, ctx, t = jnp.tile(sample, (2, 1, 1, 1)), jnp.tile(context, (2, 1, 1)), jnp.arange(4) * 100
  want = model.apply({"params": params}, x, t, ctx)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx))["params"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    p = jax.device_put(params, nn.unbox(sharding.param_shardings(boxed, mesh)))
    got = jax.jit(lambda p, x, c: model.apply({"params": p}, x, t, c))(
        p, jax.device_put(x, sharding.batch_sharding(mesh, 4)),
        jax.device_put(ctx, sharding.batch_sharding(mesh, 3)))
  assert _rel_err(got, np.asarray(want)) < 1e-5
