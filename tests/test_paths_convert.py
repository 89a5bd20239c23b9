"""`idgbr convert` / `idgbr export` and the dataset builders with every path on a bucket.

Sources and destinations are `gs://` URLs served by a local GCS emulator (tests/gcs_emulator.py,
127.0.0.1 only): tiny Stable Diffusion / DINOv2 / labelembednet folders and an original IDGBR
checkpoint (the fixtures of test_convert_cli.py and test_convert_idgbr.py) are uploaded, converted
bucket -> bucket (params checkpoints through orbax/tensorstore, the CLIP context as .npy),
exported bucket -> bucket, and compared bit for bit with the local originals; errors name the
URL. A TFDS builder reads its manual_dir from the bucket and writes its data_dir there.

The emulator needs the `gcp-storage-emulator` and `gcsfs` packages; without them these tests skip.
etils.epath has no in-memory URL scheme (`memory://` is not registered), so the emulator is the
only remote filesystem here (`test_memory_url_round_trip` checks, and runs if that changes).
"""
import json

import jax
import numpy as np
import pytest
from etils import epath

import gcs_emulator
from idgbr_jax import convert, paths
from idgbr_jax.checkpoints import params as params_ckpt
from idgbr_jax.convert import checkpoint_io, files

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# Tiny model folders, built once per module by the fixtures of the local-path tests.
from test_convert_cli import HIDDEN, _cli, sd_folder  # noqa: E402,F401  (sd_folder: fixture)
from test_convert_idgbr import original  # noqa: E402,F401  (a fixture)

pytestmark = pytest.mark.torch

_NO_EMULATOR = ("needs the GCS emulator: pip install gcp-storage-emulator gcsfs (the test "
                "extra); see tests/gcs_emulator.py")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def gcs():
  if not gcs_emulator.emulator_available():
    pytest.skip(_NO_EMULATOR)
  with gcs_emulator.gcs_emulator() as emu:
    yield emu


def _fresh_listings():
  """Forgets this process's cached bucket listings (gcsfs caches them) after a subprocess
  wrote to the bucket."""
  import fsspec  # pylint: disable=import-outside-toplevel
  fsspec.filesystem("gcs").invalidate_cache()


def _same_tree(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _same_state_dict(a, b):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_convert_and_export_round_trip_on_gcs(gcs, sd_folder, tmp_path):
  root, sd, _, _, _ = sd_folder
  src = gcs.url("weights")
  paths.copytree(root, src)
  sd_url, ckpt = f"{src}/{sd.name}", gcs.url("ckpt")

  # `idgbr convert` bucket -> bucket, through the CLI (a fresh process: gcsfs, orbax).
  proc = _cli("convert", "--from=diffusers", f"--src={sd_url}/unet", f"--dst={ckpt}/unet")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"unet: {ckpt}/unet" in proc.stdout
  _fresh_listings()
  # The other formats through what the CLI calls.
  assert checkpoint_io.convert_to_checkpoints("diffusers", f"{sd_url}/vae", f"{ckpt}/vae") == {
      "vae": f"{ckpt}/vae"}
  assert checkpoint_io.convert_to_checkpoints("clip", sd_url, f"{ckpt}/context.npy") == {
      "context": f"{ckpt}/context.npy"}
  checkpoint_io.convert_to_checkpoints("dinov2", f"{src}/dinov2", f"{ckpt}/dinov2")
  checkpoint_io.convert_to_checkpoints("idgbr", f"{src}/labelembednet8", f"{ckpt}/label_embed")

  meta = paths.read_json(f"{ckpt}/unet/meta.json")
  assert meta["kind"] == "denoiser" and meta["source"] == f"{sd_url}/unet"
  assert meta["config"]["cross_attention_dim"] == HIDDEN
  _same_tree(params_ckpt.load_params(f"{ckpt}/unet"), convert.load_diffusers(sd / "unet")[1])
  _same_tree(params_ckpt.load_params(f"{ckpt}/vae"), convert.load_diffusers(sd / "vae")[1])
  _same_tree(params_ckpt.load_params(f"{ckpt}/dinov2"), convert.load_dinov2(root / "dinov2")[1])
  _same_tree(params_ckpt.load_params(f"{ckpt}/label_embed"),
             convert.load_label_embed(root / "labelembednet8")[1])
  np.testing.assert_array_equal(paths.load_npy(f"{ckpt}/context.npy"),
                                convert.empty_prompt_context(sd))

  # `idgbr export` bucket -> bucket, through the CLI; diffusers reads a copy of the result.
  out = gcs.url("export")
  proc = _cli("export", f"--checkpoint={ckpt}/unet", "--to=diffusers", f"--dst={out}/unet")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"denoiser: {out}/unet" in proc.stdout
  _fresh_listings()
  assert paths.listdir(f"{out}/unet") == ["config.json", WEIGHTS]
  _same_state_dict(files.read_state_dict(f"{out}/unet/{WEIGHTS}"),
                   files.read_state_dict(str(sd / "unet" / WEIGHTS)))
  with paths.local_copy(f"{out}/unet") as local:
    assert local.startswith("/") and local.endswith("/unet")
    back = diffusers.UNet2DConditionModel.from_pretrained(local).state_dict()
  want = diffusers.UNet2DConditionModel.from_pretrained(sd / "unet").state_dict()
  for k, v in back.items():
    np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)
  assert not epath.Path(local).exists()  # the temporary copy is gone

  assert checkpoint_io.export_checkpoint(f"{ckpt}/vae", "diffusers", f"{out}/vae") == {
      "autoencoder": f"{out}/vae"}
  _same_state_dict(files.read_state_dict(f"{out}/vae/{WEIGHTS}"),
                   files.read_state_dict(str(sd / "vae" / WEIGHTS)))
  checkpoint_io.export_checkpoint(f"{ckpt}/label_embed", "idgbr", f"{out}/le")
  assert paths.read_json(f"{out}/le/config.json")["num_classes"] == 8
  _same_tree(convert.load_label_embed(f"{out}/le")[1],
             convert.load_label_embed(root / "labelembednet8")[1])


def test_original_idgbr_checkpoint_round_trip_on_gcs(gcs, original):
  root = original[0]
  src = gcs.url("idgbr", root.name)
  paths.copytree(root, src)
  ckpt, out = gcs.url("idgbr_ckpt"), gcs.url("idgbr_export")
  written = checkpoint_io.convert_to_checkpoints("idgbr", src, ckpt)
  assert written == {name: f"{ckpt}/{name}" for name in ("unet", "guidance", "label_embed",
                                                         "projector")}
  local = convert.load_idgbr(root)
  for name in written:
    _same_tree(params_ckpt.load_params(written[name]), getattr(local, name)[1])
  # Each part back to the original's layout on the bucket, tensors identical to the originals.
  for name, sub in (("unet", "unet_gen"), ("guidance", "interact_net"),
                    ("label_embed", "label_embed_net")):
    checkpoint_io.export_checkpoint(written[name], "idgbr", f"{out}/{sub}")
    _same_state_dict(files.read_state_dict(f"{out}/{sub}/{WEIGHTS}"),
                     files.read_state_dict(str(root / sub / WEIGHTS)))
  assert paths.read_json(f"{out}/unet_gen/config.json")["_class_name"] == \
      "UNet2DConditionNewModel"
  checkpoint_io.export_checkpoint(written["projector"], "idgbr", out)
  _same_state_dict(files.read_state_dict(f"{out}/projectors.safetensors"),
                   files.read_state_dict(str(root / "projectors.safetensors")))
  # The exported folder is an IDGBR checkpoint again; a torch pickle reads from the bucket too.
  again = convert.load_idgbr(out)
  for name in ("unet", "guidance", "label_embed", "projector"):
    _same_tree(getattr(again, name)[1], getattr(local, name)[1])
  _same_tree(convert.load_projector(f"{src}/projectors.pth")[1], local.projector[1])


def test_errors_name_the_url_and_bf16_reads(gcs, sd_folder):
  _, sd, *_ = sd_folder
  base = gcs.url("errors")
  paths.copytree(sd / "unet", f"{base}/sd/unet")
  with pytest.raises(convert.ConversionError, match=rf"^{base}/missing: not found$"):
    checkpoint_io.convert_to_checkpoints("diffusers", f"{base}/missing", f"{base}/out")
  with pytest.raises(convert.ConversionError,
                     match=rf"^{base}/missing.safetensors: weight file not found$"):
    files.read_state_dict(f"{base}/missing.safetensors")
  with pytest.raises(convert.ConversionError,
                     match=rf"^{base}/sd/config.json: not found; this looks like a pipeline "
                           rf"folder.*'{base}/sd/unet'"):
    convert.load_diffusers(f"{base}/sd")
  with pytest.raises(convert.ConversionError, match=rf"^{base}/sd: neither a params checkpoint"):
    checkpoint_io.export_checkpoint(f"{base}/sd", "diffusers", f"{base}/x")
  with pytest.raises(convert.ConversionError, match=rf"^{base}/sd/unet: no weight file .*"
                                                    r"'config.json'"):
    files.find_weights(f"{base}/sd/unet", ("model",))
  paths.write_bytes(f"{base}/bad.safetensors", b"not a safetensors file")
  with pytest.raises(convert.ConversionError,
                     match=rf"^{base}/bad.safetensors: cannot read as safetensors"):
    files.read_state_dict(f"{base}/bad.safetensors")
  paths.write_bytes(f"{base}/bad.pth", b"not a pickle")
  with pytest.raises(convert.ConversionError,
                     match=rf"^{base}/bad.pth: cannot read as a torch state dict"):
    files.read_state_dict(f"{base}/bad.pth")
  with pytest.raises(convert.ConversionError,
                     match=rf"^{base}/sd/config.json: not found \(pass a Stable Diffusion"):
    checkpoint_io.convert_to_checkpoints("clip", f"{base}/sd", f"{base}/c.npy")
  # bfloat16 safetensors (numpy has no bf16): read through torch, exactly, from bytes.
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  t = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
  paths.write_bytes(f"{base}/bf16.safetensors", safetensors.torch.save({"w": t}))
  got = files.read_state_dict(f"{base}/bf16.safetensors")
  np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
  # A sharded safetensors index names its shards relative to itself.
  paths.write_bytes(f"{base}/shard/a.safetensors", safetensors.torch.save({"w": t.float()}))
  paths.write_bytes(f"{base}/shard/m.safetensors.index.json",
                    json.dumps({"weight_map": {"w": "a.safetensors"}}).encode())
  assert set(files.read_state_dict(f"{base}/shard/m.safetensors.index.json")) == {"w"}


def test_dataset_builders_read_and_write_gcs(gcs, tmp_path):
  """manual_dir and data_dir on the bucket: PNG + jsonl (the IDGBR package) and TIFF pairs
  (WHU-Building) read from it; the ArrayRecord build is uploaded and reads back like a local
  build."""
  from idgbr_datasets import _common  # pylint: disable=import-outside-toplevel
  from idgbr_datasets.idgbr_package import IdgbrPackage  # pylint: disable=import-outside-toplevel
  from idgbr_datasets.whu_building import WhuBuilding  # pylint: disable=import-outside-toplevel
  from test_datasets_binary import _write_whu  # pylint: disable=import-outside-toplevel
  from test_datasets_package import _write_package  # pylint: disable=import-outside-toplevel

  _write_package(str(tmp_path / "Potsdam"), 6)
  _write_whu(str(tmp_path / "whu"))
  manual, data_dir = gcs.url("manual"), gcs.url("tfds")
  paths.copytree(tmp_path / "Potsdam", f"{manual}/Potsdam")
  paths.copytree(tmp_path / "whu", f"{manual}/whu")
  for builder_cls, name, config in ((IdgbrPackage, "Potsdam", "potsdam"),
                                    (WhuBuilding, "whu", None)):
    local = _common.build(builder_cls, str(tmp_path / name), str(tmp_path / "tfds"), config)
    remote = _common.build(builder_cls, f"{manual}/{name}", data_dir, config)
    assert str(remote.data_dir).startswith(data_dir + "/") and remote.is_prepared()
    assert paths.exists(f"{remote.data_dir}/dataset_info.json")
    for split in local.info.splits:
      want, got = local.as_data_source(split), remote.as_data_source(split)
      assert len(got) == len(want) > 0
      for i in range(len(want)):
        assert set(got[i]) == set(want[i])
        for key in want[i]:
          np.testing.assert_array_equal(got[i][key], want[i][key], err_msg=f"{split}/{i}/{key}")
    # Prepared on the bucket: a second build only opens it.
    assert _common.build(builder_cls, f"{manual}/{name}", data_dir, config).is_prepared()
  with pytest.raises(_common.ManualDataError,
                     match=rf"missing file {manual}/whu/metadata_i2s_segformer_train\.jsonl"):
    _common.build(IdgbrPackage, f"{manual}/whu", gcs.url("tfds2"), "potsdam")


def _memory_urls_supported() -> bool:
  try:
    epath.Path("memory://idgbr/probe")
  except (KeyError, NotImplementedError):
    return False
  return True


@pytest.mark.skipif(not _memory_urls_supported(),
                    reason="etils.epath registers no memory:// scheme (gs://, s3://, az://, hf:// "
                           "only); the GCS emulator tests cover remote paths")
def test_memory_url_round_trip(sd_folder, tmp_path):
  """Without orbax (tensorstore has no fsspec memory store): diffusers folder from memory://,
  checkpoint on disk, export to memory://."""
  _, sd, *_ = sd_folder
  src = "memory://idgbr/unet"
  paths.copytree(sd / "unet", src)
  checkpoint_io.convert_to_checkpoints("diffusers", src, str(tmp_path / "unet"))
  checkpoint_io.export_checkpoint(str(tmp_path / "unet"), "diffusers", "memory://idgbr/out")
  _same_state_dict(files.read_state_dict(f"memory://idgbr/out/{WEIGHTS}"),
                   files.read_state_dict(str(sd / "unet" / WEIGHTS)))
