"""gs:// paths against a local GCS emulator (tests/gcs_emulator.py): epath, orbax (tensorstore),
TFDS ArrayRecord reading (array_record's own GCS reader), grain, and PNG files written with PIL.

Not covered because it does not work, emulator or not (see tests/gcs_emulator.py):
TFDS `download_and_prepare` straight into gs:// (array_record's writer is local-only; TFRecord
goes through TF's GCS client, whose endpoint cannot be changed). Build locally, then upload.
"""
import io
import os

import numpy as np
import pytest

import gcs_emulator

if not gcs_emulator.emulator_available():
  pytest.skip("needs the GCS emulator: pip install gcp-storage-emulator gcsfs (the test extra)",
              allow_module_level=True)


@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.gcs_emulator() as emu:
    yield emu


def test_epath_roundtrip(gcs):
  from etils import epath
  root = epath.Path(gcs.url("epath"))
  root.mkdir(parents=True, exist_ok=True)
  (root / "a.txt").write_text("hello")
  (root / "sub" / "b.bin").write_bytes(b"\x00\x01\x02")
  with (root / "sub" / "c.txt").open("w") as f:
    f.write("c")
  assert str(root / "a.txt") == gcs.url("epath", "a.txt")
  assert (root / "a.txt").read_text() == "hello"
  assert (root / "sub" / "b.bin").read_bytes() == b"\x00\x01\x02"
  assert root.exists() and (root / "sub").is_dir() and not (root / "missing").exists()
  assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"]
  assert sorted(str(p) for p in root.glob("sub/*")) == [
      gcs.url("epath/sub/b.bin"), gcs.url("epath/sub/c.txt")]
  (root / "a.txt").rename(root / "renamed.txt")
  assert (root / "renamed.txt").read_text() == "hello" and not (root / "a.txt").exists()
  (root / "sub" / "c.txt").unlink()
  assert [p.name for p in (root / "sub").iterdir()] == ["b.bin"]
  root.rmtree()
  assert not root.exists()


def test_epath_empty_directory_is_not_kept(gcs):
  """GCS has no directories: through gcsfs an empty mkdir leaves nothing behind (TF's gfile
  writes a placeholder object instead). Code must not rely on empty directories existing."""
  from etils import epath
  d = epath.Path(gcs.url("empty_dir"))
  d.mkdir(parents=True, exist_ok=True)
  assert not d.exists()
  (d / "f").write_text("x")
  assert d.exists() and d.is_dir()


def test_orbax_checkpoint_manager(gcs):
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from etils import epath

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  n = jax.device_count()
  tree = {"w": jax.device_put(jnp.arange(2.0 * n).reshape(n, 2), sharded),
          "b": jnp.arange(3, dtype=jnp.int32), "step": 0}
  directory = epath.Path(gcs.url("ckpt"))
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
  with ocp.CheckpointManager(directory, options=options) as mngr:
    for step in (1, 2, 3):
      mngr.save(step, args=ocp.args.StandardSave(
          jax.tree.map(lambda x, s=step: x * s if not isinstance(x, int) else s, tree)))
    mngr.wait_until_finished()
  assert sorted(p.name for p in directory.iterdir()) == ["2", "3"]  # max_to_keep on GCS

  with ocp.CheckpointManager(directory) as mngr:  # a fresh manager lists the bucket
    assert mngr.latest_step() == 3 and mngr.all_steps() == [2, 3]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = mngr.restore(3, args=ocp.args.StandardRestore(abstract))
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(2.0 * n).reshape(n, 2) * 3)
  assert restored["w"].sharding.is_equivalent_to(sharded, 2)
  np.testing.assert_array_equal(np.asarray(restored["b"]), np.arange(3) * 3)
  assert restored["step"] == 3


def test_tensorstore_conditional_writes(gcs):
  """What OCDBT relies on (and the emulator lacks without tests/gcs_emulator.py's additions):
  a write conditioned on a stale generation is refused, and reads carry the generation."""
  import tensorstore as ts
  kv = ts.KvStore.open(gcs.url("kv/")).result()
  first = kv.write("k", b"v1").result().generation
  assert kv.read("k").result().stamp.generation == first
  second = kv.write("k", b"v2", if_equal=first).result().generation
  assert second not in (b"", first)
  refused = kv.write("k", b"v3", if_equal=first).result()  # stale: not written
  assert refused.generation == b""
  assert kv.read("k").result().value == b"v2"


def test_tfds_array_record_read_from_gcs(gcs, tmp_path):
  """A dataset prepared locally and uploaded is read from gs:// by TFDS, as the project does
  (`synthetic_rs.build` finds it prepared; `as_data_source` reads through array_record's GCS
  reader), and by grain."""
  import grain
  from etils import epath
  from idgbr_datasets import synthetic_rs

  kwargs = dict(image_size=32, num_train=4, num_test=2)
  local = synthetic_rs.build(str(tmp_path), **kwargs)
  remote_root = epath.Path(gcs.url("tfds"))
  for dirpath, _, files in os.walk(tmp_path):
    for name in files:
      src = epath.Path(dirpath) / name
      (remote_root / src.relative_to(tmp_path)).write_bytes(src.read_bytes())

  remote = synthetic_rs.build(str(remote_root), **kwargs)  # prepared: nothing is written
  assert str(remote.data_dir).startswith("gs://")
  want, got = local.as_data_source("train"), remote.as_data_source("train")
  assert len(got) == 4
  for i in range(4):
    np.testing.assert_array_equal(got[i]["image"], want[i]["image"])
    np.testing.assert_array_equal(got[i]["label"], want[i]["label"])
  assert list(grain.MapDataset.source(got).map(lambda e: e["id"])) == [
      f"train_{i:06d}".encode() for i in range(4)]


def test_pil_png_through_epath(gcs):
  from etils import epath
  from PIL import Image
  rgb = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
  path = epath.Path(gcs.url("png", "map.png"))
  with path.open("wb") as f:
    Image.fromarray(rgb).save(f, format="PNG")
  with Image.open(io.BytesIO(path.read_bytes())) as im:
    assert im.format == "PNG"
    np.testing.assert_array_equal(np.asarray(im), rgb)
