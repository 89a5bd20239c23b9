"""diffusers folders in and out: tiny random diffusers UNet / VAE saved to disk, read with
`convert.load_diffusers`, compared on outputs; exported back and read by diffusers; errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idgbr_jax import convert
from idgbr_jax.convert import files
from idgbr_jax.models.autoencoder import AutoencoderKL
from idgbr_jax.models.denoiser import UNet2DConditionModel

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_np = pytest.importorskip("safetensors.numpy")
pytestmark = pytest.mark.torch

# Two levels, same block kinds as SD (cross-attention shallow, plain deep): cheap to compile.
UNET_KW = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
               cross_attention_dim=16, norm_num_groups=8)
VAE_KW = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
              down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)


def _randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # norms and biases too, fan-in scaled weights so activations stay O(1)
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def tiny_unet(seed=0):
  return _randomise(diffusers.UNet2DConditionModel(**UNET_KW), seed)


def tiny_vae(seed=1):
  return _randomise(diffusers.AutoencoderKL(**VAE_KW), seed)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("diffusers")
  unet, vae = tiny_unet(), tiny_vae()
  unet.save_pretrained(root / "unet")
  unet.save_pretrained(root / "unet_bin", safe_serialization=False)
  vae.save_pretrained(root / "vae")
  return root, unet, vae


def test_unet_folder_matches_diffusers_forward(folders):
  root, unet, _ = folders
  module, params = convert.load_diffusers(root / "unet")
  assert isinstance(module, UNet2DConditionModel)
  assert module.config.block_out_channels == (16, 32) and module.config.num_heads == 2
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  ctx = rng.normal(size=(2, 5, 16)).astype(np.float32)
  t = np.array([3, 801])
  with torch.no_grad():
    want = unet(torch.from_numpy(_nchw(x)), torch.from_numpy(t),
                torch.from_numpy(ctx)).sample.numpy()
  got = jax.jit(lambda p: module.apply({"params": p}, jnp.asarray(x), t, ctx))(params)
  assert np.std(want) > 0.1
  assert _rel(_nchw(got), want) <= 1e-4
  # The .bin form gives the same params.
  _, params_bin = convert.load_diffusers(root / "unet_bin")
  jax.tree.map(np.testing.assert_array_equal, params_bin, params)


def test_vae_folder_matches_diffusers(folders):
  root, _, vae = folders
  module, params = convert.load_diffusers(root / "vae")
  assert isinstance(module, AutoencoderKL) and module.config.block_out_channels == (16, 32)
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    mean = vae.encode(torch.from_numpy(_nchw(x))).latent_dist.mean.numpy()
    image = vae.decode(torch.from_numpy(_nchw(z))).sample.numpy()
  post = module.apply({"params": params}, jnp.asarray(x), method=AutoencoderKL.encode)
  dec = module.apply({"params": params}, jnp.asarray(z), method=AutoencoderKL.decode)
  assert _rel(_nchw(post.mean), mean) <= 1e-4
  assert _rel(_nchw(dec), image) <= 1e-4


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_export_round_trip_exact_and_diffusers_reads_it(folders, tmp_path, part):
  root, unet, vae = folders
  ref = unet if part == "unet" else vae
  module, params = convert.load_diffusers(root / part)
  out = convert.save_diffusers(tmp_path / part, module.config, params)
  assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  # import(export(p)) == p, bit for bit.
  module2, params2 = convert.load_diffusers(out)
  assert module2.config == module.config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # diffusers builds the same model from our folder: same config, same tensors.
  cls = type(ref)
  back = cls.from_pretrained(out).eval()
  for key in UNET_KW if part == "unet" else VAE_KW:
    if key != "sample_size":
      assert tuple(np.atleast_1d(back.config[key])) == tuple(np.atleast_1d(ref.config[key])), key
  want = ref.state_dict()
  got = back.state_dict()
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)


def test_errors_name_the_file_and_key(folders, tmp_path):
  root, _, _ = folders
  # A pipeline root instead of a model folder.
  pipe = tmp_path / "sd"
  (pipe / "unet").mkdir(parents=True)
  with pytest.raises(convert.ConversionError, match=r"config.json: not found.*pipeline folder"):
    convert.load_diffusers(pipe)
  # Not a UNet / VAE.
  bad = tmp_path / "te"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"_class_name": "CLIPTextModel"}))
  with pytest.raises(convert.ConversionError, match=r"te/config.json: _class_name 'CLIPTextModel'"):
    convert.load_diffusers(bad)
  # No weights file.
  nowt = tmp_path / "nowt"
  nowt.mkdir()
  (nowt / "config.json").write_text((root / "unet" / "config.json").read_text())
  with pytest.raises(convert.ConversionError, match="no weight file"):
    convert.load_diffusers(nowt)
  # A missing key and a shape mismatch, each naming the file and the key.
  sd = safetensors_np.load_file(str(root / "unet" / "diffusion_pytorch_model.safetensors"))
  key = "down_blocks.0.attentions.0.proj_in.weight"
  miss = tmp_path / "miss"
  miss.mkdir()
  (miss / "config.json").write_text((root / "unet" / "config.json").read_text())
  files.write_safetensors(str(miss / "diffusion_pytorch_model.safetensors"),
                          {k: v for k, v in sd.items() if k != key})
  with pytest.raises(convert.ConversionError,
                     match=rf"miss/diffusion_pytorch_model.safetensors: .*missing keys.*{key}"):
    convert.load_diffusers(miss)
  files.write_safetensors(str(miss / "diffusion_pytorch_model.safetensors"),
                          {**sd, "conv_in.weight": np.zeros((16, 4, 1, 1), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"safetensors: shape mismatch for "
                     r"conv_in.weight: expected \(16, 4, 3, 3\), got \(16, 4, 1, 1\)"):
    convert.load_diffusers(miss)
  # VAE: the same, through the VAE converter.
  vsd = safetensors_np.load_file(str(root / "vae" / "diffusion_pytorch_model.safetensors"))
  vdir = tmp_path / "vae"
  vdir.mkdir()
  (vdir / "config.json").write_text((root / "vae" / "config.json").read_text())
  files.write_safetensors(str(vdir / "diffusion_pytorch_model.safetensors"),
                          {k: v for k, v in vsd.items() if k != "decoder.conv_out.bias"})
  with pytest.raises(convert.ConversionError, match=r"vae/diffusion_pytorch_model.safetensors: "
                     r"missing key.*decoder.conv_out.bias"):
    convert.load_diffusers(vdir)
  # An unsupported architecture setting in config.json.
  cfg = json.loads((root / "unet" / "config.json").read_text())
  cfg["time_embedding_type"] = "fourier"
  (miss / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(convert.ConversionError, match="config.json: .*time_embedding_type"):
    convert.load_diffusers(miss)
