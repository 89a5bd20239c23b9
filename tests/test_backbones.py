"""Stage I backbones: shapes, values, published parameter counts, logical axes, BatchNorm
behaviour, trainability, input-size checks, dtype handling, and PyTorch parity of the parts that
have a PyTorch reference available offline."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from idgbr_jax.models import backbones
from idgbr_jax.models.backbones import get_backbone, list_variants, resnet
from idgbr_jax.parallel import sharding

NAMES = ("unet", "deeplabv3plus", "segformer")
NUM_CLASSES = 5
HW = 32  # divisible by every tiny model's total stride (4, 16, 32)


def _images(batch=2, hw=HW, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, hw, hw, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def _tiny(name, dtype=jnp.float32):
  model = get_backbone(name, NUM_CLASSES, "tiny", dtype=dtype)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), _images())
  return model, variables


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------- registry


def test_registry_lists_and_rejects_unknowns():
  assert set(backbones.BACKBONES) == set(NAMES)
  assert list_variants("unet") == ["base", "small", "tiny"]
  assert list_variants("deeplabv3plus") == ["r101", "r18", "r50", "tiny"]
  assert list_variants("segformer") == ["b0", "b1", "b2", "b3", "b4", "b5", "tiny"]
  with pytest.raises(ValueError, match=r"unknown backbone 'hrnet'.*deeplabv3plus.*segformer"):
    get_backbone("hrnet", 3)
  with pytest.raises(ValueError, match=r"unknown SegFormer variant 'b9'.*'b0'"):
    get_backbone("segformer", 3, "b9")
  with pytest.raises(ValueError, match=r"unknown UNetConfig field\(s\) \['widths'\].*features"):
    get_backbone("unet", 3, "tiny", widths=(1, 2))
  with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
    get_backbone("deeplabv3plus", 3, "tiny", output_stride=32)
  with pytest.raises(ValueError, match="num_classes"):
    get_backbone("unet", 0)
  # Overrides reach the config; the DeepLab encoder may be named.
  m = get_backbone("deeplabv3plus", 3, "r50", output_stride=8, encoder="r101")
  assert m.config.encoder == resnet.VARIANTS["r101"] and m.config.atrous_rates == (12, 24, 36)
  assert get_backbone("segformer", 3).config == backbones.segformer.VARIANTS["b0"]


# ------------------------------------------------------------------------- parameter counts

# Exact counts from jax.eval_shape (no allocation). Published figures they reproduce:
# SegFormer paper Table 1 / mmseg (ADE20K, 150 classes): B0 3.8M, B1 13.7M, B2 27.5M, B3 47.3M,
# B4 64.1M, B5 84.7M (ours: b3 47,337,814, b4 64,108,374, b5 84,708,694; not run, slow to trace).
# DeepLabv3+ R50, 21 classes: ResNet-50 trunk 23.51M + ASPP 15.47M + decoder (48-ch projection,
# two 3x3x256 convs) 1.37M = 40.35M (VainF's single-3x3 decoder is 39.76M); R101 59,344,309.
# U-Net base with transposed up-convs equals milesial/Pytorch-UNet (bilinear=False): 31.04M.
PARAM_COUNTS = [
    ("segformer", "b0", 150, 3_752_694),
    ("segformer", "b1", 150, 13_715_798),
    ("segformer", "b2", 150, 27_461_974),
    ("deeplabv3plus", "r50", 21, 40_352_181),
    ("deeplabv3plus", "r18", 21, 16_608_181),
    ("unet", "base", 2, 31_037_698),
    ("unet", "small", 2, 7_763_074),
]


@pytest.mark.parametrize("name,variant,num_classes,expected", PARAM_COUNTS)
def test_param_counts_match_published(name, variant, num_classes, expected):
  model = get_backbone(name, num_classes, variant)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  assert _count(nn.unbox(shapes["params"])) == expected


def test_deeplab_output_stride_changes_resolution_not_params():
  enc = resnet.VARIANTS["tiny"]
  shapes = {}
  for flags, stride in [((False, False, False), 32), ((False, False, True), 16),
                        ((False, True, True), 8)]:
    net = resnet.ResNet(enc, flags)
    out, variables = jax.eval_shape(
        lambda k, net=net: net.init_with_output(k, jnp.zeros((1, 64, 64, 3)), train=False),
        jax.random.key(0))
    assert out["layer1"].shape == (1, 16, 16, 8)
    assert out["layer4"].shape == (1, 64 // stride, 64 // stride, 32)
    shapes[stride] = jax.tree.map(lambda x: x.shape, nn.unbox(variables["params"]))
  assert shapes[32] == shapes[16] == shapes[8]


# ------------------------------------------------------------------- forward, axes, dtypes


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_values_and_logical_axes(name):
  model, variables = _tiny(name)
  assert set(variables) == {"params", "batch_stats"}
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, _images())
  assert logits.shape == (2, HW, HW, NUM_CLASSES) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  # Not degenerate: logits vary over pixels and classes, and depend on the image.
  assert float(jnp.std(logits, axis=(1, 2)).min()) > 1e-4
  assert float(jnp.abs(logits[0] - logits[1]).mean()) > 1e-4

  allowed = {name for name, _ in sharding.DEFAULT_RULES} | {None}
  leaves = jax.tree.leaves(variables["params"],
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed
  specs = nn.get_partition_spec(variables["params"])
  assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
             ) == len(leaves)
  # The rules table shards it on a real 8-device mesh.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = sharding.param_shardings(variables["params"], mesh)
  assert len(jax.tree.leaves(shardings)) == len(leaves)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute_tracks_float32(name):
  model32, variables = _tiny(name)
  model16 = get_backbone(name, NUM_CLASSES, "tiny", dtype=jnp.bfloat16)
  x = _images()
  ref = jax.jit(functools.partial(model32.apply, train=False))(variables, x)
  out = jax.jit(functools.partial(model16.apply, train=False))(variables, x)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  corr = np.corrcoef(np.asarray(ref).ravel(), np.asarray(out).ravel())[0, 1]
  assert corr > 0.99, corr
  # bf16 params also initialise and run.
  model_p16 = get_backbone(name, NUM_CLASSES, "tiny", dtype=jnp.bfloat16,
                           param_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(functools.partial(model_p16.init, train=False), jax.random.key(0), x)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(shapes["params"]))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("name,bad_hw", [("unet", 34), ("deeplabv3plus", 40),
                                         ("segformer", 48)])
def test_wrong_input_size_raises(name, bad_hw):
  model, variables = _tiny(name)
  with pytest.raises(ValueError, match=f"divisible by {model.total_stride}"):
    model.apply(variables, jnp.zeros((1, bad_hw, HW, 3)), train=False)


# --------------------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("name", NAMES)
def test_batch_stats_update_only_in_train_mode(name):
  model, variables = _tiny(name)
  x = _images() * 3.0 + 1.0  # statistics far from the initial (0, 1)
  _, train_upd = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, x)
  _, eval_upd = jax.jit(functools.partial(model.apply, train=False, mutable=["batch_stats"]))(
      variables, x)
  before = jax.tree.leaves(variables["batch_stats"])
  changed = [not np.allclose(a, b) for a, b in zip(before, jax.tree.leaves(train_upd))]
  assert all(changed), f"{changed.count(False)} of {len(changed)} stats did not move"
  for a, b in zip(before, jax.tree.leaves(eval_upd)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- trainability


def _pattern_batch():
  """Two images whose label is a deterministic function of the pixels (learnable)."""
  x = _images(seed=3)
  labels = jnp.argmax(jax.image.resize(x[..., :2], (2, 8, 8, 2), "linear"), -1)
  labels = jax.image.resize(labels, (2, HW, HW), "nearest")
  return x, labels.astype(jnp.int32)


@pytest.mark.parametrize("name", NAMES)
def test_adam_overfits_one_batch(name):
  model, variables = _tiny(name)
  params, stats = variables["params"], variables["batch_stats"]
  x, labels = _pattern_batch()
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

  losses = []
  for _ in range(15):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.6 * losses[0], losses


# ------------------------------------------------------------------------- PyTorch parity


@pytest.mark.torch
def test_segformer_matches_transformers():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from idgbr_jax.convert import segformer_hf
  from idgbr_jax.models.backbones import segformer

  torch.manual_seed(0)
  hf_config = transformers.SegformerConfig(
      num_channels=3, num_encoder_blocks=4, depths=[2, 1, 1, 1], sr_ratios=[8, 4, 2, 1],
      hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 2, 4], decoder_hidden_size=16,
      num_labels=NUM_CLASSES)
  hf = transformers.SegformerForSemanticSegmentation(hf_config).eval()
  with torch.no_grad():
    # HF's init (std 0.02) gives logits ~1e-3; unit-gain weights make the tolerance meaningful.
    for p in hf.parameters():
      if p.ndim >= 2:
        p.normal_(0.0, (p[0].numel()) ** -0.5)
      else:
        p.uniform_(-0.2, 0.2)
    # Non-trivial BN statistics and norm affine params.
    for m in hf.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
  config = segformer.get_config("tiny", depths=(2, 1, 1, 1), layer_norm_eps=1e-5)
  model = segformer.SegFormer(config, NUM_CLASSES)
  variables = segformer_hf.segformer_params_from_hf(hf.state_dict(), config)
  # The converted tree has exactly the shapes our init produces.
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  assert jax.tree.map(lambda x: x.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, variables)

  x = np.array(_images(batch=2, hw=64))
  with torch.no_grad():
    ref = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits
    ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear",
                                          align_corners=False)
  ref = ref.numpy().transpose(0, 2, 3, 1)
  out = model.apply(variables, jnp.asarray(x), train=False)
  assert np.abs(ref).std() > 0.1  # logits are not near zero, so the tolerance is meaningful
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.torch
def test_unet_upconv_matches_torch_conv_transpose():
  torch = pytest.importorskip("torch")
  from idgbr_jax.models.backbones import unet

  torch.manual_seed(0)
  ref_layer = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2)
  x = np.array(_images(batch=2, hw=5)[..., :1].repeat(6, -1) * np.arange(1, 7))
  with torch.no_grad():
    ref = ref_layer(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  params = {"kernel": ref_layer.weight.detach().numpy().transpose(2, 3, 0, 1),
            "bias": ref_layer.bias.detach().numpy()}
  out = unet.UpConv2x2(4).apply({"params": params}, jnp.asarray(x))
  assert out.shape == (2, 10, 10, 4)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_segformer_stochastic_depth_and_dropout_use_the_dropout_rng():
  model, variables = _tiny("segformer")
  noisy = get_backbone("segformer", NUM_CLASSES, "tiny", drop_path_rate=0.5, decoder_dropout=0.5)
  x = _images()
  apply = jax.jit(functools.partial(noisy.apply, train=True, mutable=["batch_stats"]))
  a, _ = apply(variables, x, rngs={"dropout": jax.random.key(0)})
  b, _ = apply(variables, x, rngs={"dropout": jax.random.key(1)})
  assert float(jnp.abs(a - b).mean()) > 1e-3
  # Eval mode needs no RNG and equals the regulariser-free model.
  np.testing.assert_allclose(jax.jit(functools.partial(noisy.apply, train=False))(variables, x),
                             jax.jit(functools.partial(model.apply, train=False))(variables, x),
                             atol=1e-6)
