"""Original IDGBR checkpoints and DINOv2 files in and out: a checkpoint-N folder built from
torch modules (diffusers UNet as `UNet2DConditionNewModel`, the torch `DformerBlock` per skip as
`interact_net/`, `LabelEmbedNet`, the projector) is read with `convert.load_idgbr`, compared on
outputs, exported back bit for bit; DINOv2 from an official .pth and a transformers folder."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from idgbr_jax import convert
from idgbr_jax.convert import files, idgbr
from idgbr_jax.models import guidance as gd
from idgbr_jax.models import label_embedding as le
import torch_reference

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.torch

UNET_KW = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
               cross_attention_dim=16, norm_num_groups=8)
LATENT = 8
WIDTH, HEADS = 16, 4
# Skips of UNET_KW at an 8x8 latent: conv_in, resnet (16 @ 8), downsampler (16 @ 4),
# resnet (32 @ 4); mid 32 @ 4.
SKIPS = ((16, 8), (16, 8), (16, 4), (32, 4))
MID = (32, 4)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _random_(module, gen, scale=0.3):
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * scale)
  return module.eval()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
  """An original-layout checkpoint-N folder written by torch modules, and those modules."""
  root = tmp_path_factory.mktemp("idgbr") / "checkpoint-80000"
  gen = torch.Generator().manual_seed(0)
  unet = _random_(diffusers.UNet2DConditionModel(**UNET_KW), gen, 0.1)
  unet.save_pretrained(root / "unet_gen")
  cfg = json.loads((root / "unet_gen" / "config.json").read_text())
  cfg["_class_name"] = "UNet2DConditionNewModel"  # what the original's subclass writes
  (root / "unet_gen" / "config.json").write_text(json.dumps(cfg))
  block_cls = torch_reference.dformer_block_cls(torch)
  blocks = [_random_(block_cls(c, WIDTH, 1, HEADS, r), gen) for c, r in SKIPS]
  mid = _random_(block_cls(MID[0], WIDTH, 1, HEADS, MID[1]), gen)
  sd = {}
  for i, b in enumerate(blocks):
    sd.update({f"attn_blocks_down.{i}.{k}": v for k, v in b.state_dict().items()})
  sd.update({f"attn_blocks_mid.{k}": v for k, v in mid.state_dict().items()})
  (root / "interact_net").mkdir()
  files.write_safetensors(str(root / "interact_net" / "diffusion_pytorch_model.safetensors"), sd)
  (root / "interact_net" / "config.json").write_text(json.dumps({
      "_class_name": "InteractNet", "_diffusers_version": "0.30.3", "attn_heads": HEADS,
      "attn_layers": 1, "block_out_resolutions": [r for _, r in SKIPS] + [MID[1]],
      "conditioning_channels": 3, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "in_channels": [c for c, _ in SKIPS] + [MID[0]], "layers_per_block": 1}))
  # LabelEmbedNet, as the released labelembednet2 (its table values, a random decoder).
  table = np.array([[0.3367, 0.1288, 0.2345], [0.2303, -1.1229, -0.1863]], np.float32)
  rng = np.random.default_rng(0)
  le_sd = {"embedding_table.weight": table,
           "embedding_conv.0.weight": rng.normal(size=(128, 3, 1, 1)).astype(np.float32),
           "embedding_conv.0.bias": rng.normal(size=(128,)).astype(np.float32),
           "embedding_conv.2.weight": rng.normal(size=(2, 128, 1, 1)).astype(np.float32),
           "embedding_conv.2.bias": rng.normal(size=(2,)).astype(np.float32)}
  (root / "label_embed_net").mkdir()
  files.write_safetensors(str(root / "label_embed_net" / "diffusion_pytorch_model.safetensors"),
                          le_sd)
  (root / "label_embed_net" / "config.json").write_text(json.dumps({
      "_class_name": "LabelEmbedNet", "_diffusers_version": "0.30.3", "bit_scale": 1,
      "label_emb_inchannels": 3, "num_classes": 2}))
  # The projector: build_mlp(32 -> 24 -> 24 -> 12) as SIDModel.projectors.0.
  tnn = torch.nn
  proj = _random_(tnn.Sequential(tnn.Linear(32, 24), tnn.SiLU(), tnn.Linear(24, 24), tnn.SiLU(),
                                 tnn.Linear(24, 12)), gen)
  torch.save({f"projectors.0.{k}": v for k, v in proj.state_dict().items()},
             root / "projectors.pth")
  files.write_safetensors(str(root / "projectors.safetensors"),
                          {f"projectors.0.{k}": v for k, v in proj.state_dict().items()})
  return root, unet, blocks, mid, le_sd, proj


def test_load_idgbr_parts_match_torch(original):
  root, unet, blocks, mid, le_sd, proj = original
  parts = convert.load_idgbr(root)
  assert parts.vae is None
  # unet_gen: a UNet2DConditionNewModel folder is an SD UNet.
  module, params = parts.unet
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, LATENT, LATENT, 4)).astype(np.float32)
  ctx = rng.normal(size=(1, 3, 16)).astype(np.float32)
  with torch.no_grad():
    want = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.tensor([500]),
                torch.from_numpy(ctx)).sample.numpy()
  got = module.apply({"params": params}, jnp.asarray(x), jnp.array([500]), ctx)
  assert _rel(np.asarray(got).transpose(0, 3, 1, 2), want) <= 1e-4
  # interact_net: the whole CG net against the torch blocks, NCHW <-> NHWC.
  gnet, gparams = parts.guidance
  cfg = gnet.config
  assert (cfg.skip_channels, cfg.skip_resolutions, cfg.width, cfg.heads) == (
      (16, 16, 16, 32), (8, 8, 4, 4), WIDTH, HEADS)
  assert cfg.init_mode == "paper" and not cfg.skip_inert_attention  # weights are non-zero
  feats = [[rng.normal(size=(1, r, r, c)).astype(np.float32) for c, r in SKIPS + (MID,)]
           for _ in range(3)]
  noisy, img, coarse = feats
  got_skips, got_mid = gnet.apply({"params": gparams}, tuple(noisy[:-1]), noisy[-1],
                                  tuple(img[:-1]), img[-1], tuple(coarse[:-1]), coarse[-1])
  t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))  # noqa: E731
  with torch.no_grad():
    for i, block in enumerate(blocks + [mid]):
      want = block(t(noisy[i]), torch.cat([t(img[i]), t(coarse[i])], 1)).numpy()
      got_i = got_skips[i] if i < len(blocks) else got_mid
      assert _rel(np.asarray(got_i).transpose(0, 3, 1, 2), want) <= 1e-4, i
  # label_embed_net: the released table's colours, and the decoder.
  lmod, lparams = parts.label_embed
  assert lmod.config == le.LabelEmbedConfig(num_classes=2, hidden=128)
  colours = lmod.apply({"params": lparams}, jnp.array([[[0, 1]]]), method=lmod.encode)
  np.testing.assert_allclose(np.asarray(colours)[0, 0],
                             [[0.167, 0.064, 0.117], [0.115, -0.509, -0.093]], atol=1e-3)
  # projectors: the torch Sequential per token.
  pmod, pparams = parts.projector
  assert (pmod.hidden_dim, pmod.out_dim) == (24, 12)
  tokens = rng.normal(size=(5, 32)).astype(np.float32)
  with torch.no_grad():
    want = proj(torch.from_numpy(tokens)).numpy()
  assert _rel(pmod.apply({"params": pparams}, jnp.asarray(tokens)), want) <= 1e-4
  # A .pth projector file reads the same.
  _, pth_params = convert.load_projector(str(root / "projectors.pth"))
  jax.tree.map(np.testing.assert_array_equal, pth_params, pparams)


def test_export_idgbr_round_trip_is_exact(original, tmp_path):
  root, *_ = original
  parts = convert.load_idgbr(root)
  out = convert.export_idgbr(
      tmp_path / "export", unet_config=parts.unet[0].config, unet_params=parts.unet[1],
      guidance_config=parts.guidance[0].config, guidance_params=parts.guidance[1],
      projector_params=parts.projector[1], label_embed_params=parts.label_embed[1])
  # Same files, same tensors, bit for bit, as the torch-written originals.
  for sub in ("unet_gen", "interact_net", "label_embed_net"):
    name = "diffusion_pytorch_model.safetensors"
    a = files.read_state_dict(os.path.join(root, sub, name))
    b = files.read_state_dict(os.path.join(out, sub, name))
    assert set(a) == set(b), sub
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{sub}: {k}")
  a = files.read_state_dict(os.path.join(root, "projectors.safetensors"))
  b = files.read_state_dict(os.path.join(out, "projectors.safetensors"))
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  cfg = json.loads((tmp_path / "export" / "unet_gen" / "config.json").read_text())
  assert cfg["_class_name"] == "UNet2DConditionNewModel"
  ic = json.loads((tmp_path / "export" / "interact_net" / "config.json").read_text())
  assert ic["in_channels"] == [16, 16, 16, 32, 32]
  assert ic["block_out_resolutions"] == [8, 8, 4, 4, 4]
  # import(export(p)) == p.
  again = convert.load_idgbr(out)
  for name in ("unet", "guidance", "label_embed", "projector"):
    jax.tree.map(np.testing.assert_array_equal, getattr(again, name)[1], getattr(parts, name)[1])
  assert again.guidance[0].config == parts.guidance[0].config


def test_code_mode_interactnet_and_label_embed_file(tmp_path):
  """An all-zero attention branch (the released init) reads as init_mode='code'; our params
  from the model's own init export and re-import exactly."""
  cfg = gd.GuidanceConfig(skip_channels=(8, 8), mid_channels=8, skip_resolutions=(4, 2),
                          mid_resolution=2, width=8, heads=2, init_mode="code")
  net = gd.GuidanceNet(cfg)
  f = lambda r: jnp.zeros((1, r, r, 8))  # noqa: E731
  boxed = net.init(jax.random.PRNGKey(0), (f(4), f(2)), f(2), (f(4), f(2)), f(2), (f(4), f(2)),
                   f(2))["params"]
  params = jax.tree.map(np.asarray, nn.unbox(boxed))
  params["skip_0"]["res"]["kernel"] = np.full_like(params["skip_0"]["res"]["kernel"], 0.5)
  path = idgbr.save_interactnet(str(tmp_path / "interact_net"), cfg, params)
  gnet, back = convert.load_interactnet(path)
  assert gnet.config.init_mode == "code" and gnet.config.skip_inert_attention
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # A bare labelembednet .safetensors file.
  lp = {"embedding": np.arange(12, dtype=np.float32).reshape(4, 3),
        "decoder_hidden": {"kernel": np.ones((1, 1, 3, 5), np.float32), "bias": np.zeros(5)},
        "decoder_out": {"kernel": np.ones((1, 1, 5, 4), np.float32), "bias": np.arange(4.0)}}
  fpath = files.write_safetensors(str(tmp_path / "le.safetensors"),
                                  idgbr.label_embed_params_to_torch(lp))
  lmod, lback = convert.load_label_embed(fpath)
  assert lmod.config == le.LabelEmbedConfig(num_classes=4, hidden=5)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float32)), lback,
               lp)


def test_idgbr_errors_name_file_and_key(original, tmp_path):
  root, *_ = original
  with pytest.raises(convert.ConversionError,
                     match=r"not an IDGBR checkpoint, missing \['unet_gen'"):
    convert.load_idgbr(tmp_path)
  # interact_net with a key removed / an extra key / a wrong shape.
  name = "diffusion_pytorch_model.safetensors"
  sd = files.read_state_dict(os.path.join(root, "interact_net", name))
  bad = tmp_path / "interact_net"
  bad.mkdir()
  (bad / "config.json").write_text((root / "interact_net" / "config.json").read_text())
  key = "attn_blocks_down.2.attn.transformer.resblocks.0.ln_1k.bias"
  files.write_safetensors(str(bad / name), {k: v for k, v in sd.items() if k != key})
  with pytest.raises(convert.ConversionError, match=rf"interact_net/{name}: .*missing '{key}'"):
    convert.load_interactnet(str(bad))
  files.write_safetensors(str(bad / name), {**sd, "attn_blocks_down.9.conv.weight": sd[key]})
  with pytest.raises(convert.ConversionError, match=r"unexpected InteractNet keys.*down.9.conv"):
    convert.load_interactnet(str(bad))
  key = "attn_blocks_down.1.conv.weight"
  files.write_safetensors(str(bad / name), {**sd, key: sd[key][:, :8]})
  with pytest.raises(convert.ConversionError, match=r"shape mismatch for skip_1/res/kernel"):
    convert.load_interactnet(str(bad))
  # label embedding: a missing decoder weight.
  lsd = files.read_state_dict(os.path.join(root, "label_embed_net", name))
  ldir = tmp_path / "label_embed_net"
  ldir.mkdir()
  (ldir / "config.json").write_text((root / "label_embed_net" / "config.json").read_text())
  files.write_safetensors(str(ldir / name), {k: v for k, v in lsd.items()
                                             if k != "embedding_conv.2.bias"})
  with pytest.raises(convert.ConversionError, match=r"label_embed_net/.*embedding_conv.2.bias"):
    convert.load_label_embed(str(ldir))


# ----- DINOv2 files ------------------------------------------------------------------------------


def _official_names(sd, depth):
  """A transformers Dinov2Model state dict renamed to the facebookresearch .pth layout."""
  out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
         "pos_embed": sd["embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
  for i in range(depth):
    p, q = f"encoder.layer.{i}.", f"blocks.{i}."
    for t in ("weight", "bias"):
      for n in ("norm1", "norm2"):
        out[f"{q}{n}.{t}"] = sd[f"{p}{n}.{t}"]
      out[f"{q}attn.qkv.{t}"] = torch.cat([sd[f"{p}attention.{x}_proj.{t}"] for x in "qkv"])
      out[f"{q}attn.proj.{t}"] = sd[f"{p}attention.o_proj.{t}"]
      out[f"{q}mlp.w12.{t}"] = torch.cat([sd[f"{p}mlp.gate_proj.{t}"], sd[f"{p}mlp.up_proj.{t}"]])
      out[f"{q}mlp.w3.{t}"] = sd[f"{p}mlp.down_proj.{t}"]
    out[f"{q}ls1.gamma"] = sd[f"{p}layer_scale1.lambda1"]
    out[f"{q}ls2.gamma"] = sd[f"{p}layer_scale2.lambda1"]
  return out


def test_dinov2_files_match_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     mlp_ratio=4, image_size=56, patch_size=14,
                                     use_swiglu_ffn=True, attn_implementation="eager")
  gen = torch.Generator().manual_seed(0)
  model = _random_(transformers.Dinov2Model(hf_cfg), gen, 0.2)
  model.save_pretrained(tmp_path / "hf")
  img = np.random.default_rng(0).normal(size=(1, 3, 56, 56)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(img)).last_hidden_state.numpy()
  module, params = convert.load_dinov2(tmp_path / "hf")
  assert module.config.ffn == "swiglu" and module.config.interpolate_offset == 0.0
  got = module.apply({"params": params}, jnp.asarray(img.transpose(0, 2, 3, 1)))
  tokens = np.concatenate([got["x_norm_clstoken"][:, None], got["x_norm_patchtokens"]], 1)
  assert _rel(tokens, want) <= 1e-4
  # The official .pth layout: the config is read off the tensor shapes (32 = one 64-wide head
  # by default, so pass the head count), wrappers are unwrapped.
  torch.save({"model": _official_names(model.state_dict(), 2)}, tmp_path / "vit.pth")
  omod, oparams = convert.load_dinov2(tmp_path / "vit.pth", num_heads=2)
  c = omod.config
  assert (c.embed_dim, c.depth, c.num_heads, c.ffn, c.patch_size, c.img_size,
          c.ffn_hidden, c.interpolate_offset) == (32, 2, 2, "swiglu", 14, 56,
                                                  module.config.ffn_hidden, 0.1)
  jax.tree.map(np.testing.assert_array_equal, oparams, params)
  sd = _official_names(model.state_dict(), 2)
  del sd["blocks.1.ls2.gamma"]
  torch.save(sd, tmp_path / "bad.pth")
  with pytest.raises(convert.ConversionError, match=r"bad.pth: .*blocks.1.ls2.gamma"):
    convert.load_dinov2(tmp_path / "bad.pth", num_heads=2)


def test_projector_params_to_torch_inverts_the_importer():
  p = {f"fc{i}": {"kernel": np.random.default_rng(i).normal(size=(3, 4)).astype(np.float32),
                  "bias": np.arange(4, dtype=np.float32)} for i in (1, 2, 3)}
  sd = idgbr.projector_params_to_torch(p)
  assert sorted(sd) == sorted(f"projectors.0.{i}.{t}" for i in (0, 2, 4) for t in ("weight",
                                                                                  "bias"))
  jax.tree.map(np.testing.assert_array_equal, idgbr.projector_params_from_torch(sd), p)


# ----- a whole original run: checkpoint-N inside its experiment root -----------------------------


@pytest.fixture(scope="module")
def experiment(original, tmp_path_factory):
  """`<root>/checkpoint-80000` (unet_gen, interact_net, projectors) inside an experiment root
  that holds what the original's final `save_pretrained` adds: label_embed_net/, vae/,
  unet_ori/ (a `UNet2DConditionEncodeModel`: the encoder half only, of the *initial* UNet),
  text_encoder/ + tokenizer/ and scheduler/ (SD-1.5's PNDM config)."""
  import shutil  # pylint: disable=import-outside-toplevel
  transformers = pytest.importorskip("transformers")
  src, *_ = original
  root = tmp_path_factory.mktemp("experiment")
  ckpt = root / "checkpoint-80000"
  ckpt.mkdir()
  for name in ("unet_gen", "interact_net", "projectors.safetensors"):
    (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, ckpt / name)
  shutil.copytree(src / "label_embed_net", root / "label_embed_net")
  gen = torch.Generator().manual_seed(7)
  initial = _random_(diffusers.UNet2DConditionModel(**UNET_KW), gen, 0.1)
  (root / "unet_ori").mkdir()
  encoder = {k: v for k, v in initial.state_dict().items()
             if not k.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))}
  files.write_safetensors(str(root / "unet_ori" / "diffusion_pytorch_model.safetensors"),
                          encoder)
  cfg = dict(initial.config, _class_name="UNet2DConditionEncodeModel")
  (root / "unet_ori" / "config.json").write_text(json.dumps(cfg))
  vae = _random_(diffusers.AutoencoderKL(
      block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
      gen, 0.1)
  vae.save_pretrained(root / "vae")
  text = _random_(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
      pad_token_id=1)), gen, 0.3)
  text.save_pretrained(root / "text_encoder")
  tok = root / "tokenizer"
  tok.mkdir()
  (tok / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
  (tok / "merges.txt").write_text("#version: 0.2\n")
  (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
      "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
      "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
      "clip_sample": False}))
  return root, initial, text


def test_import_of_an_original_run_refines_with_its_own_frozen_parts(experiment, tmp_path):
  """`idgbr convert --from=idgbr <root>/checkpoint-N` finds the frozen parts where the original's
  inference does (the experiment root); the import refines with them, and unet_ori is the
  run's *initial* encoder, not the trained unet_gen's."""
  from idgbr_jax.assembly import stage2 as assembly  # pylint: disable=import-outside-toplevel
  from idgbr_jax.convert import checkpoint_io  # pylint: disable=import-outside-toplevel
  from idgbr_jax.inference import refine as refine_lib  # pylint: disable=import-outside-toplevel
  root, initial, text = experiment
  warnings = []
  out = checkpoint_io.convert_to_checkpoints("idgbr", str(root / "checkpoint-80000"),
                                             str(tmp_path / "imp"), warn=warnings.append)
  assert warnings == []
  assert set(out) == {"unet", "guidance", "label_embed", "vae", "projector", "unet_ori",
                      "context", "settings"}
  meta = json.loads((tmp_path / "imp" / "unet_ori" / "meta.json").read_text())
  assert meta["encoder_only"] and meta["source"].endswith("unet_ori")
  with torch.no_grad():
    want_ctx = text(torch.tensor([[0] + [1] * 76]))[0].numpy()
  np.testing.assert_allclose(np.load(tmp_path / "imp" / "context.npy"), want_ctx, rtol=1e-6,
                             atol=1e-6)
  settings = json.loads((tmp_path / "imp" / "refiner.json").read_text())
  # The original's inference settings: 25 steps, scale 3, strength 1 from pure noise.
  assert settings["diffusion"]["start"] == "noise" and settings["diffusion"]["strength"] == 1.0
  assert (settings["diffusion"]["num_inference_steps"], settings["diffusion"]["guidance_scale"],
          settings["diffusion"]["beta_schedule"]) == (25, 3.0, "scaled_linear")
  assert settings["image_size"] == LATENT * 2  # the 8x8 CG grid x the VAE's factor 2

  loaded = assembly.load_refiner(str(tmp_path / "imp"))
  _, want_ori, enc_only = idgbr.load_unet_ori(str(root / "unet_ori"))
  assert enc_only
  jax.tree.map(np.testing.assert_array_equal, loaded.frozen["unet_ori"], want_ori)
  assert not np.array_equal(np.asarray(loaded.frozen["unet_ori"]["conv_in"]["kernel"]),
                            np.asarray(loaded.trainable["unet"]["conv_in"]["kernel"]))
  config = loaded.config
  config.diffusion.num_inference_steps = 2
  fn = refine_lib.make_refine_fn(loaded.refiner, config, loaded.mesh,
                                 jax.tree.map(lambda x: x.sharding, loaded.trainable),
                                 jax.tree.map(lambda x: x.sharding, loaded.frozen))
  rng = np.random.default_rng(0)
  with jax.set_mesh(loaded.mesh):
    maps = fn(loaded.trainable, loaded.frozen,
              rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
              rng.integers(0, 2, (8, 16, 16)).astype(np.int32), jax.random.key(0))
  maps = np.asarray(maps)
  assert maps.shape == (8, 16, 16) and maps.max() < 2

  # Back to the original's layout: unet_ori stays its encoder-only class, tensors unchanged.
  checkpoint_io.export_checkpoint(str(tmp_path / "imp"), "idgbr", str(tmp_path / "back"),
                                  allow_unloadable=True, warn=lambda _: None)
  cfg = json.loads((tmp_path / "back" / "unet_ori" / "config.json").read_text())
  assert cfg["_class_name"] == "UNet2DConditionEncodeModel"
  name = "diffusion_pytorch_model.safetensors"
  a = files.read_state_dict(str(root / "unet_ori" / name))
  b = files.read_state_dict(str(tmp_path / "back" / "unet_ori" / name))
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_import_without_frozen_parts_names_the_fix(original, experiment, tmp_path):
  from idgbr_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from idgbr_jax.assembly import stage2 as assembly  # pylint: disable=import-outside-toplevel
  from idgbr_jax.convert import checkpoint_io  # pylint: disable=import-outside-toplevel
  src, *_ = original  # a checkpoint-N whose experiment root holds nothing else
  warnings = []
  checkpoint_io.convert_to_checkpoints("idgbr", str(src), str(tmp_path / "bare"),
                                       warn=warnings.append)
  assert len(warnings) == 1 and "vae/" in warnings[0] and "unet_ori/" in warnings[0]
  assert "--base" in warnings[0]
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"needs \['vae/', 'unet_ori/', 'context.npy'\].*--base"):
    assembly.load_refiner(str(tmp_path / "bare"))
  # --base (the original's --base_model_name_or_path) supplies them.
  root, *_ = experiment
  warnings = []
  out = checkpoint_io.convert_to_checkpoints("idgbr", str(src), str(tmp_path / "based"),
                                             base=str(root), warn=warnings.append)
  assert warnings == [] and {"vae", "unet_ori", "context"} <= set(out)
  # A scheduler our sampler does not implement is refused by name.
  bad = tmp_path / "sched"
  bad.mkdir()
  (bad / "scheduler_config.json").write_text(json.dumps({"set_alpha_to_one": True,
                                                         "steps_offset": 1}))
  with pytest.raises(convert.ConversionError, match="set_alpha_to_one=True"):
    idgbr.schedule_from_scheduler_config(str(bad))
