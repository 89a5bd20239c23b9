"""Guidance net: torch parity of one block, the code-mode zero-gradient property, sizes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from idgbr_jax.convert import idgbr as idgbr_convert
from idgbr_jax.models import guidance as gd
import torch_reference


def _tiny_cfg(**kw):
  base = dict(skip_channels=(8, 8, 16), mid_channels=16, skip_resolutions=(4, 4, 2),
              mid_resolution=2, width=16, heads=4)
  base.update(kw)
  return gd.GuidanceConfig(**base)


def _features(cfg, batch=2, seed=0, sizes=None):
  rng = np.random.default_rng(seed)
  sizes = sizes or [(r, r) for r in cfg.skip_resolutions]
  msize = (cfg.mid_resolution, cfg.mid_resolution)

  def make(c, hw):
    return jnp.asarray(rng.normal(size=(batch,) + tuple(hw) + (c,)).astype(np.float32))

  feats = []
  for _ in range(3):
    feats.append(tuple(make(c, hw) for c, hw in zip(cfg.skip_channels, sizes)))
    feats.append(make(cfg.mid_channels, msize))
  return feats  # noisy_skips, noisy_mid, img_skips, img_mid, coarse_skips, coarse_mid


def _n_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_for_denoiser_sd15_table():
  cfg = gd.get_config("sd15")
  assert cfg.skip_channels == (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280)
  assert cfg.skip_resolutions == (64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8)
  assert (cfg.mid_channels, cfg.mid_resolution) == (1280, 8)
  with pytest.raises(ValueError, match="only exact with init_mode='code'"):
    gd.get_config("sd15", init_mode="paper")
  with pytest.raises(ValueError, match="unknown GuidanceConfig fields"):
    gd.get_config("sd15", depth=2)
  with pytest.raises(ValueError, match="unknown guidance variant"):
    gd.get_config("sd21")


def _block_params(c, r, width, mlp=4, layers=1):
  """Independent count of one DformerBlock's parameters."""
  attn_layer = (4 * width * width + 4 * width) + 4 * 2 * width + (
      width * mlp * width + mlp * width + mlp * width * width + width)
  return ((3 * c * c + c) + c * width + 2 * c * width + r * r * width + 2 * 2 * width
          + layers * attn_layer + 2 * width + width * c)


def test_sd15_param_count():
  cfg = gd.get_config("sd15")
  feats = jax.eval_shape(lambda: _features(cfg, batch=1))
  boxed = jax.eval_shape(gd.GuidanceNet(cfg).init, jax.random.PRNGKey(0), *feats)
  params = nn.unbox(boxed)["params"]
  total = _n_params(params)
  res = sum(_n_params(params[k]["res"]) for k in params)
  expected = sum(_block_params(c, r, 512) for c, r in zip(
      cfg.skip_channels + (cfg.mid_channels,), cfg.skip_resolutions + (cfg.mid_resolution,)))
  assert total == expected == 106_135_680  # dossier: ~106.1M
  assert res == 34_417_280  # dossier: ~34.4M, the only live part in code mode
  # Logical axis names on every leaf.
  names = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in names)


def test_code_mode_attention_branch_gets_zero_gradient_and_stays_zero():
  cfg = _tiny_cfg(init_mode="code")
  model = gd.GuidanceNet(cfg)
  feats = _features(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *feats))["params"]
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(params))
  targets = _features(cfg, seed=1)

  def loss_fn(p):
    skips, mid = model.apply({"params": p}, *feats)
    t_skips, t_mid = targets[0], targets[1]
    return sum(jnp.mean((a - b) ** 2) for a, b in zip(skips, t_skips)) + jnp.mean(
        (mid - t_mid) ** 2)

  tx = optax.adamw(1e-2, weight_decay=1e-2)
  opt = tx.init(params)
  step = jax.jit(lambda p, o: (lambda g: (g,) + tx.update(g, o, p))(jax.grad(loss_fn)(p)))
  for i in range(10):
    grads, updates, opt = step(params, opt)
    for block in grads:
      for leaf in jax.tree.leaves(grads[block]["attn"]):
        assert np.all(np.asarray(leaf) == 0.0), block
      assert np.abs(np.asarray(grads[block]["res"]["kernel"])).max() > 0, block
    params = optax.apply_updates(params, updates)
  for block in params:
    assert all(np.all(np.asarray(x) == 0.0) for x in jax.tree.leaves(params[block]["attn"]))
    assert np.abs(np.asarray(params[block]["res"]["kernel"])).max() > 0

  # With trained res (and the inert branch), skipping the branch is bit-identical.
  full = jax.jit(model.apply)({"params": params}, *feats)
  skipped = jax.jit(gd.GuidanceNet(_tiny_cfg(init_mode="code", skip_inert_attention=True)).apply)(
      {"params": params}, *feats)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(skipped)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and equals the res conv alone.
  x, fi, fc = feats[0][0], feats[2][0], feats[4][0]
  p = params["skip_0"]["res"]
  res = jnp.concatenate([x, fi, fc], -1) @ p["kernel"][0, 0] + p["bias"]
  np.testing.assert_allclose(np.asarray(full[0][0]), np.asarray(res), rtol=1e-5, atol=1e-5)


def test_paper_mode_attention_learns():
  cfg = _tiny_cfg(init_mode="paper")
  model = gd.GuidanceNet(cfg)
  feats = _features(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *feats))["params"]
  blk = params["skip_0"]
  assert np.all(np.asarray(blk["res"]["kernel"]) == 0)
  assert np.all(np.asarray(blk["attn"]["proj"]["kernel"]) == 0)
  assert np.all(np.asarray(blk["attn"]["ln_post"]["scale"]) == 1)
  assert np.asarray(blk["attn"]["pos_embedding"]).std() > 0.1  # width**-0.5 = 0.25 here
  targets = _features(cfg, seed=1)

  def loss_fn(p):
    skips, mid = model.apply({"params": p}, *feats)
    return sum(jnp.mean((a - b) ** 2) for a, b in zip(skips, targets[0])) + jnp.mean(
        (mid - targets[1]) ** 2)

  grad_fn = jax.jit(jax.grad(loss_fn))
  grads = grad_fn(params)
  # ControlNet-style: at init only the zero output projection (and res) receive gradient.
  assert np.abs(np.asarray(grads["skip_0"]["attn"]["proj"]["kernel"])).max() > 0
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  @jax.jit
  def step(params, opt):
    upd, opt = tx.update(jax.grad(loss_fn)(params), opt, params)
    return optax.apply_updates(params, upd), opt

  for _ in range(3):
    params, opt = step(params, opt)
  grads = grad_fn(params)
  for block in grads:
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads[block]["attn"]):
      assert np.abs(np.asarray(leaf)).max() > 0, (block, jax.tree_util.keystr(path))


def test_batch_one_conditions_broadcast():
  """Image/coarse features computed once (batch 1) serve a larger noisy batch."""
  cfg = _tiny_cfg(init_mode="paper")
  model = gd.GuidanceNet(cfg)
  feats = _features(cfg, batch=2)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *feats))
  params = jax.tree.map(lambda x: x + 0.01, params)  # make res / proj non-zero
  apply = jax.jit(model.apply)
  first = lambda f: jax.tree.map(lambda a: a[:1], f)
  repeated = lambda f: jax.tree.map(lambda a: jnp.repeat(a[:1], 2, 0), f)
  noisy = feats[:2]
  a = apply(params, *noisy, *[repeated(f) for f in feats[2:]])
  b = apply(params, *noisy, *[first(f) for f in feats[2:]])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert np.abs(np.asarray(a[1])).max() > 0


# ------------------------------------------------------------------------------------------------
# Torch parity: one DformerBlock written from the description (nn.MultiheadAttention etc.).


def _torch_block_cls(torch):
  return torch_reference.dformer_block_cls(torch)


@pytest.mark.torch
@pytest.mark.parametrize("grid,layers", [((4, 4), 1), ((6, 5), 2)])
def test_block_matches_torch(grid, layers):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  c, width, heads, res = 8, 16, 4, 4
  block = _torch_block_cls(torch)(c, width, layers, heads, res)
  with torch.no_grad():  # random everything (LayerNorms, biases, out proj) so all paths count
    for p in block.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  block.eval()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, c) + grid).astype(np.float32)
  cond = rng.normal(size=(2, 2 * c) + grid).astype(np.float32)
  with torch.no_grad():
    ref = block(torch.from_numpy(x), torch.from_numpy(cond)).numpy()

  cfg = gd.GuidanceConfig(skip_channels=(), mid_channels=c, skip_resolutions=(),
                          mid_resolution=res, width=width, heads=heads, layers=layers,
                          init_mode="paper")
  params = idgbr_convert.guidance_block_params_from_torch(block.state_dict(), num_layers=layers)
  jblock = gd.GuidanceBlock(c, res, cfg)
  to_nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  init = nn.unbox(jblock.init(jax.random.PRNGKey(0), to_nhwc(x), to_nhwc(cond)))["params"]
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)
  out = np.asarray(jblock.apply({"params": params}, to_nhwc(x), to_nhwc(cond)))
  out = out.transpose(0, 3, 1, 2)
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel <= 1e-4, rel
  # The attention branch is a real contributor here (not just res).
  res_only = np.asarray(block.conv(torch.cat([torch.from_numpy(x), torch.from_numpy(cond)],
                                             1)).detach())
  assert np.abs(ref - res_only).max() > 1e-2


@pytest.mark.torch
def test_net_converter_key_layout_and_errors():
  torch = pytest.importorskip("torch")
  cls = _torch_block_cls(torch)
  cfg = _tiny_cfg(init_mode="paper")
  sd = {}
  for i, (c, r) in enumerate(zip(cfg.skip_channels, cfg.skip_resolutions)):
    sd.update({f"interact_net.attn_blocks_down.{i}.{k}": v
               for k, v in cls(c, cfg.width, 1, cfg.heads, r).state_dict().items()})
  sd.update({f"interact_net.attn_blocks_mid.{k}": v for k, v in cls(
      cfg.mid_channels, cfg.width, 1, cfg.heads, cfg.mid_resolution).state_dict().items()})
  params = idgbr_convert.guidance_params_from_torch(sd, cfg, prefix="interact_net.")
  ref = nn.unbox(jax.eval_shape(gd.GuidanceNet(cfg).init, jax.random.PRNGKey(0),
                                *_features(cfg)))["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, ref)
  del sd["interact_net.attn_blocks_mid.attn.ln_post.bias"]
  with pytest.raises(KeyError, match="attn_blocks_mid.attn.ln_post.bias"):
    idgbr_convert.guidance_params_from_torch(sd, cfg, prefix="interact_net.")
