"""The README's "Using real SD-1.5 and DINOv2 weights" steps on tiny stand-ins: a Stable Diffusion
folder (tiny UNet, VAE, CLIP text encoder + tokenizer), a DINOv2 folder and a labelembednet
folder are converted (`idgbr convert`, the CLI for the UNet), a Stage II config points at them
and initialises from them exactly; a Stage II run is exported (`idgbr export`) and read back."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from idgbr_configs import idgbr_package_stage2
from idgbr_jax import checkpoints, convert
from idgbr_jax.assembly import stage2 as assembly
from idgbr_jax.convert import checkpoint_io, files
from idgbr_jax.models import refiner
from idgbr_jax.parallel import sharding
from idgbr_jax.train import optim, stage2
from importtime import assert_not_imported

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = 16  # CLIP width == the UNet's cross_attention_dim


def _randomise(model, seed, scale=0.1):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * scale)
  return model.eval()


def _cli(*args, python_flags=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, *python_flags, "-m", "idgbr_jax.cli", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  """A Stable-Diffusion-layout folder of tiny random models, plus DINOv2 and labelembednet."""
  root = tmp_path_factory.mktemp("weights")
  sd = root / "stable-diffusion-v1-5"
  unet = _randomise(diffusers.UNet2DConditionModel(
      sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
      cross_attention_dim=HIDDEN, norm_num_groups=8), 0)
  unet.save_pretrained(sd / "unet")
  vae = _randomise(diffusers.AutoencoderKL(
      block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2), 1)
  vae.save_pretrained(sd / "vae")
  text = _randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=20, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
      pad_token_id=1)), 2, 0.3)
  text.save_pretrained(sd / "text_encoder")
  tok = sd / "tokenizer"
  tok.mkdir()
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  vocab.update({c + s: len(vocab) + 2 * i + j for i, c in enumerate("abcd")
                for j, s in enumerate(("", "</w>"))})
  (tok / "vocab.json").write_text(json.dumps(vocab))
  (tok / "merges.txt").write_text("#version: 0.2\n")
  (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
  dino = _randomise(transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
      use_swiglu_ffn=True)), 3)
  dino.save_pretrained(root / "dinov2")
  le = root / "labelembednet8"
  le.mkdir()
  rng = np.random.default_rng(0)
  files.write_safetensors(str(le / "diffusion_pytorch_model.safetensors"), {
      "embedding_table.weight": rng.normal(size=(8, 3)).astype(np.float32) * 5,
      "embedding_conv.0.weight": rng.normal(size=(128, 3, 1, 1)).astype(np.float32),
      "embedding_conv.0.bias": np.zeros(128, np.float32),
      "embedding_conv.2.weight": rng.normal(size=(8, 128, 1, 1)).astype(np.float32),
      "embedding_conv.2.bias": np.zeros(8, np.float32)})
  (le / "config.json").write_text(json.dumps({"_class_name": "LabelEmbedNet",
                                              "label_emb_inchannels": 3, "num_classes": 8}))
  return root, sd, unet, vae, text


@pytest.fixture(scope="module")
def converted(sd_folder, tmp_path_factory):
  root, sd, *_ = sd_folder
  out = tmp_path_factory.mktemp("ckpt")
  # Step 1 of the README, through the CLI.
  proc = _cli("convert", "--from=diffusers", f"--src={sd / 'unet'}", f"--dst={out / 'unet'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"unet: {out / 'unet'}" in proc.stdout
  # The other steps call what the CLI calls.
  checkpoint_io.convert_to_checkpoints("diffusers", str(sd / "vae"), str(out / "vae"))
  checkpoint_io.convert_to_checkpoints("clip", str(sd), str(out / "context.npy"))
  checkpoint_io.convert_to_checkpoints("dinov2", str(root / "dinov2"), str(out / "dinov2"))
  checkpoint_io.convert_to_checkpoints("idgbr", str(root / "labelembednet8"),
                                       str(out / "label_embed"))
  return out


def test_context_is_the_clip_states_of_the_empty_prompt(sd_folder, converted):
  *_, text = sd_folder
  ctx = np.load(converted / "context.npy")
  assert ctx.shape == (1, 77, HIDDEN) and ctx.dtype == np.float32
  ids = torch.tensor([[0] + [1] * 76])  # BOS, EOS, then EOS-as-pad: the SD tokenizer's ""
  with torch.no_grad():
    want = text(ids)[0].numpy()
  np.testing.assert_allclose(ctx, want, rtol=1e-6, atol=1e-6)
  meta = json.loads((converted / "unet" / "meta.json").read_text())
  assert meta["kind"] == "denoiser" and meta["config"]["cross_attention_dim"] == HIDDEN


def _stage2_config(converted):
  """The README's command: the `sd15` Stage II config plus its --config.init.* flags; only the
  sizes that would make a CPU test slow are shrunk (image side, CG-net attention width)."""
  config = idgbr_package_stage2.get_config("dataset=potsdam")
  assert (config.model.denoiser, config.model.teacher, config.model.context_length) == (
      "sd15", "vitg14", 77)  # the converted meta.json files decide the actual shapes
  config.init.unet = str(converted / "unet")
  config.init.autoencoder = str(converted / "vae")
  config.init.label_embed = str(converted / "label_embed")
  config.init.teacher = str(converted / "dinov2")
  config.init.context = str(converted / "context.npy")
  config.data.image_size = config.data.resize = 16
  config.model.guidance_width = 16
  config.model.guidance_heads = 2
  return config


@pytest.mark.slow
def test_stage2_initialises_from_the_converted_weights(sd_folder, converted, tmp_path):
  _, sd, *_ = sd_folder
  config = _stage2_config(converted)
  cfg = assembly.refiner_config(config, config.data.num_classes)
  assert cfg.denoiser.block_out_channels == (16, 32)  # from meta.json, not the `sd15` name
  assert cfg.autoencoder.block_out_channels == (16, 32) and cfg.teacher.embed_dim == 32
  assert cfg.label_embed.num_classes == 8
  ref = refiner.Refiner(cfg)
  mesh = sharding.make_mesh(config.mesh_shape.to_dict())
  rules = tuple(config.sharding_rules)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  state, state_sh = stage2.init_state(ref, tx, config, mesh, rules)
  frozen, _ = stage2.init_frozen(ref, config, state, state_sh, mesh, rules)
  _, unet_params = convert.load_diffusers(sd / "unet")
  _, vae_params = convert.load_diffusers(sd / "vae")
  same = lambda a, b: jax.tree.map(  # noqa: E731
      lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), a, b)
  same(state["params"]["unet"], unet_params)
  same(frozen["vae"], vae_params)
  same(frozen["teacher"], convert.load_dinov2(sd.parent / "dinov2")[1])
  np.testing.assert_array_equal(np.asarray(frozen["context"]),
                                np.load(converted / "context.npy"))

  # Export a Stage II run (the checkpoint a training run writes) both ways and read it back.
  workdir = tmp_path / "run"
  ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
  ckpt.save(0, state, config=config)
  ckpt.wait_until_finished()
  ckpt.close()
  # (--to=diffusers writes the same unet/vae through `save_diffusers`, tested elsewhere; one
  # export here keeps the test short: each re-initialises the run.)
  # The CG net's attention width is shrunk to 16, which the original cannot load (it
  # hard-codes 512): refused by name unless --allow_unloadable (checked before the weights).
  proc = _cli("export", f"--checkpoint={workdir}", "--to=idgbr", f"--dst={tmp_path / 'no'}")
  assert proc.returncode == 1
  assert "config.model.guidance_width=16" in proc.stderr and "--allow_unloadable" in proc.stderr
  # The command loads the run params-only and imports neither TensorFlow nor clu's writers.
  proc = _cli("export", f"--checkpoint={workdir}", "--to=idgbr", f"--dst={tmp_path / 'idgbr'}",
              "--allow_unloadable", python_flags=("-X", "importtime"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "warning: " in proc.stderr and "guidance_width=16" in proc.stderr
  assert_not_imported(proc.stderr, ("tensorflow", "clu.metric_writers"))
  written = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
  back = diffusers.UNet2DConditionModel.from_pretrained(written["unet"])
  want = diffusers.UNet2DConditionModel.from_pretrained(sd / "unet").state_dict()
  for k, v in back.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)
  parts = convert.load_idgbr(tmp_path / "idgbr")
  same(state["params"]["guidance"], parts.guidance[1])
  same(state["params"]["projector"], parts.projector[1])
  same(state["params"]["unet"], parts.unet[1])
  same(frozen["label_embed"], parts.label_embed[1])
  same(frozen["vae"], parts.vae[1])
  # unet_ori is the whole initial UNet: the converted SD unet, bit for bit.
  back = files.read_state_dict(str(tmp_path / "idgbr" / "unet_ori" /
                                   "diffusion_pytorch_model.safetensors"))
  assert set(back) == set(want) and all(np.array_equal(back[k], want[k].numpy()) for k in back)
  np.testing.assert_array_equal(parts.context, np.load(converted / "context.npy"))
  # ... and back in (the package family's round trip): the imported refiner is the run.
  checkpoint_io.convert_to_checkpoints("idgbr", str(tmp_path / "idgbr"), str(tmp_path / "imp"))
  imported = assembly.load_refiner(str(tmp_path / "imp"))
  same(imported.trainable, {k: state["params"][k] for k in ("unet", "guidance")})
  same(imported.frozen, {k: v for k, v in frozen.items() if k != "teacher"})
  assert imported.config.data.image_size == config.data.image_size


def test_export_cli_round_trip_and_errors(sd_folder, converted, tmp_path):
  _, sd, *_ = sd_folder
  proc = _cli("export", f"--checkpoint={converted / 'vae'}", "--to=diffusers",
              f"--dst={tmp_path / 'vae'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  a = files.read_state_dict(str(sd / "vae" / "diffusion_pytorch_model.safetensors"))
  b = files.read_state_dict(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  # A label embedding checkpoint exports in the original's layout only.
  with pytest.raises(convert.ConversionError, match="no diffusers form"):
    checkpoint_io.export_checkpoint(str(converted / "label_embed"), "diffusers", str(tmp_path))
  out = checkpoint_io.export_checkpoint(str(converted / "label_embed"), "idgbr",
                                        str(tmp_path / "le"))
  assert json.loads((tmp_path / "le" / "config.json").read_text())["num_classes"] == 8
  assert out == {"label_embed": str(tmp_path / "le")}
  with pytest.raises(convert.ConversionError, match="neither a params checkpoint"):
    checkpoint_io.export_checkpoint(str(tmp_path), "diffusers", str(tmp_path / "x"))
  with pytest.raises(convert.ConversionError, match=r"\.npy"):
    checkpoint_io.convert_to_checkpoints("clip", str(sd), str(tmp_path / "ctx"))
  with pytest.raises(convert.ConversionError,
                     match=r"unet/config.json: model_type None is not a CLIP text encoder"):
    checkpoint_io.convert_to_checkpoints("clip", str(sd / "unet"), str(tmp_path / "c.npy"))
