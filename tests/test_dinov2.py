"""DINOv2 teacher: parity with transformers Dinov2Model, official-layout converter, sizes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from idgbr_jax.convert import dinov2 as conv
from idgbr_jax.models import dinov2 as dv


def _n(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_variant_sizes():
  g = dv.get_config("vitg14")
  assert (g.embed_dim, g.depth, g.num_heads, g.ffn, g.ffn_hidden, g.pos_grid) == (
      1536, 40, 24, "swiglu", 4096, 37)
  assert dv.get_config("vitl14").ffn_hidden == 4096
  assert dv.get_config("vits14").ffn_hidden == 1536
  with pytest.raises(ValueError, match="unknown DINOv2 variant"):
    dv.get_config("vith14")
  with pytest.raises(ValueError, match="unknown DinoV2Config fields"):
    dv.get_config("tiny", registers=4)


def test_vitg14_param_count():
  cfg = dv.get_config("vitg14")
  x = jax.ShapeDtypeStruct((1, 14, 14, 3), jnp.float32)
  params = nn.unbox(jax.eval_shape(dv.DinoV2(cfg).init, jax.random.PRNGKey(0), x))["params"]
  d, h, n = 1536, 4096, 37 * 37 + 1
  per_block = 4 * (d * d + d) + 2 * d + 4 * d + (2 * (d * h + h) + h * d + d)
  expected = 14 * 14 * 3 * d + d + d + n * d + 40 * per_block + 2 * d
  # The official module also holds a (1, 1536) mask_token (unused here): 1_136_480_768 total.
  assert _n(params) == expected == 1_136_479_232


def _tiny_hf(torch, swiglu: bool):
  from transformers import Dinov2Config, Dinov2Model
  hf_cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        mlp_ratio=4, image_size=70, patch_size=14, use_swiglu_ffn=swiglu,
                        layerscale_value=1.0, attn_implementation="eager")
  torch.manual_seed(0)
  model = Dinov2Model(hf_cfg).eval()
  with torch.no_grad():  # random everything, layer scales and norms included
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.5 if "lambda1" in name else 0.2))
  return model


def _jax_cfg(swiglu: bool, offset: float):
  return dv.get_config("tiny", ffn="swiglu" if swiglu else "mlp", interpolate_offset=offset)


@pytest.mark.torch
@pytest.mark.parametrize("swiglu", [False, True])
def test_matches_transformers_dinov2(swiglu):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  model = _tiny_hf(torch, swiglu)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  cfg = _jax_cfg(swiglu, 0.0)  # transformers interpolates with size=, no offset
  params = conv.dinov2_params_from_transformers(sd, cfg)
  rng = np.random.default_rng(0)
  img = rng.normal(size=(2, 3, 56, 84)).astype(np.float32)  # 4x6 grid vs the 5x5 table
  with torch.no_grad():
    ref = model(torch.from_numpy(img)).last_hidden_state.numpy()
  out = jax.jit(dv.DinoV2(cfg).apply)({"params": params}, jnp.asarray(img.transpose(0, 2, 3, 1)))
  for got, want in ((out["x_norm_patchtokens"], ref[:, 1:]), (out["x_norm_clstoken"], ref[:, 0])):
    rel = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel
  # The position table really was interpolated (a 5x5 table cannot be used as is).
  assert params["pos_embed"].shape == (1, 26, 32)


def _official_from_hf(sd, swiglu):
  """Renames a transformers state dict into the facebookresearch checkpoint layout."""
  out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
         "pos_embed": sd["embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
  for i in range(2):
    p, q = f"encoder.layer.{i}.", f"blocks.{i}."
    for n in ("norm1", "norm2"):
      for t in ("weight", "bias"):
        out[f"{q}{n}.{t}"] = sd[f"{p}{n}.{t}"]
    for t in ("weight", "bias"):
      out[f"{q}attn.qkv.{t}"] = np.concatenate(
          [sd[f"{p}attention.{x}_proj.{t}"] for x in "qkv"], 0)
      out[f"{q}attn.proj.{t}"] = sd[f"{p}attention.o_proj.{t}"]
      if swiglu:
        out[f"{q}mlp.w12.{t}"] = np.concatenate(
            [sd[f"{p}mlp.gate_proj.{t}"], sd[f"{p}mlp.up_proj.{t}"]], 0)
        out[f"{q}mlp.w3.{t}"] = sd[f"{p}mlp.down_proj.{t}"]
      else:
        out[f"{q}mlp.fc1.{t}"] = sd[f"{p}mlp.fc1.{t}"]
        out[f"{q}mlp.fc2.{t}"] = sd[f"{p}mlp.fc2.{t}"]
    out[f"{q}ls1.gamma"] = sd[f"{p}layer_scale1.lambda1"]
    out[f"{q}ls2.gamma"] = sd[f"{p}layer_scale2.lambda1"]
  return out


def _hub_names_from_hf(sd, swiglu):
  """transformers < 5 / hub-file names (attention.attention.query, mlp.weights_in)."""
  out = {}
  for k, v in sd.items():
    k = k.replace("attention.q_proj", "attention.attention.query").replace(
        "attention.k_proj", "attention.attention.key").replace(
        "attention.v_proj", "attention.attention.value").replace(
        "attention.o_proj", "attention.output.dense")
    out[k] = v
  if swiglu:
    for i in range(2):
      p = f"encoder.layer.{i}.mlp."
      for t in ("weight", "bias"):
        out[f"{p}weights_in.{t}"] = np.concatenate([out.pop(f"{p}gate_proj.{t}"),
                                                    out.pop(f"{p}up_proj.{t}")], 0)
        out[f"{p}weights_out.{t}"] = out.pop(f"{p}down_proj.{t}")
  return out


@pytest.mark.torch
@pytest.mark.parametrize("swiglu", [False, True])
def test_official_and_hub_layouts_give_identical_params(swiglu):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  sd = {k: v.numpy() for k, v in _tiny_hf(torch, swiglu).state_dict().items()}
  cfg = _jax_cfg(swiglu, 0.1)
  ref = conv.dinov2_params_from_transformers(sd, cfg)
  for other in (conv.dinov2_params_from_official(_official_from_hf(sd, swiglu), cfg),
                conv.dinov2_params_from_transformers(_hub_names_from_hf(sd, swiglu), cfg)):
    assert jax.tree.structure(other) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.torch
def test_converter_errors_name_the_key():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  sd = _official_from_hf({k: v.numpy() for k, v in _tiny_hf(torch, True).state_dict().items()},
                         True)
  cfg = _jax_cfg(True, 0.1)
  bad = dict(sd)
  del bad["blocks.1.ls2.gamma"]
  with pytest.raises(KeyError, match=r"blocks\.1\.ls2\.gamma"):
    conv.dinov2_params_from_official(bad, cfg)
  bad = dict(sd, **{"blocks.0.attn.proj.weight": np.zeros((32, 16), np.float32)})
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.proj\.weight"):
    conv.dinov2_params_from_official(bad, cfg)
  with pytest.raises(ValueError, match="head.weight"):
    conv.dinov2_params_from_official(dict(sd, **{"head.weight": np.zeros(1)}), cfg)
  with pytest.raises(ValueError, match="config.depth is 3"):
    conv.dinov2_params_from_official(sd, dv.get_config("tiny", ffn="swiglu", depth=3))
  with pytest.raises(KeyError, match="mlp.fc1.weight"):  # swiglu checkpoint, mlp config
    conv.dinov2_params_from_official(sd, _jax_cfg(False, 0.1))


@pytest.mark.torch
def test_official_offset_interpolation_matches_torch():
  """The official scale_factor=(g + 0.1) / M trick (what IDGBR's vendored dinov2 runs)."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  m, d = 37, 8
  table = rng.normal(size=(1, m * m + 1, d)).astype(np.float32)
  for gh, gw in ((32, 32), (20, 45)):
    got = np.asarray(dv.interpolate_pos_embed(jnp.asarray(table), (gh, gw), (gh * 14, gw * 14),
                                              0.1))
    patch = torch.from_numpy(table[:, 1:]).reshape(1, m, m, d).permute(0, 3, 1, 2)
    ref = F.interpolate(patch, mode="bicubic", antialias=False,
                        scale_factor=((gh + 0.1) / m, (gw + 0.1) / m))
    assert tuple(ref.shape[-2:]) == (gh, gw)
    ref = ref.permute(0, 2, 3, 1).reshape(1, gh * gw, d).numpy()
    np.testing.assert_allclose(got[:, 1:], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, :1], table[:, :1])
  # The two conventions really differ at 37 -> 32 (why the config must choose).
  size_mode = dv.interpolate_pos_embed(jnp.asarray(table), (32, 32), (448, 448), 0.0)
  offset_mode = dv.interpolate_pos_embed(jnp.asarray(table), (32, 32), (448, 448), 0.1)
  assert np.abs(np.asarray(size_mode) - np.asarray(offset_mode)).max() > 1e-3
  # Square input at the table's grid: used as is.
  same = dv.interpolate_pos_embed(jnp.asarray(table), (37, 37), (518, 518), 0.1)
  np.testing.assert_array_equal(np.asarray(same), table)
