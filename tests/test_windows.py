"""Sliding windows and their blending (`inference.windows`): every pixel covered, the last window
on the scene's edge, ramp weights > 0 that sum to one across an overlap, and reassembling a scene
from its own windows gives it back (exactly where one window covers a pixel)."""
import dataclasses

import numpy as np
import pytest

from idgbr_jax.inference import windows


@pytest.mark.parametrize("length,tile,stride,want", [
    (32, 32, 24, [0]), (20, 32, 24, [0]), (33, 32, 24, [0, 1]), (80, 32, 24, [0, 24, 48]),
    (81, 32, 24, [0, 24, 48, 49]), (64, 32, 32, [0, 32])])
def test_starts_cover_and_end_on_the_edge(length, tile, stride, want):
  got = windows.starts(length, tile, stride)
  assert got == want
  covered = np.zeros(max(length, tile), bool)
  for s in got:
    covered[s:s + tile] = True
  assert covered.all() and got[-1] + tile == max(length, tile)


def test_ramp_weights_are_positive_and_sum_to_one_across_overlaps():
  offsets = windows.starts(80, 32, 24)  # overlaps of 8 pixels
  total = np.zeros(80)
  for i, s in enumerate(offsets):
    w = windows.ramp(offsets, i, 32)
    assert (w > 0).all() and w.max() == 1.0
    total[s:s + 32] += w
  np.testing.assert_allclose(total, 1.0, atol=1e-12)
  # A scene edge keeps weight 1 (no neighbour there).
  assert windows.ramp(offsets, 0, 32)[0] == 1.0 and windows.ramp(offsets, 2, 32)[-1] == 1.0


@pytest.mark.parametrize("h,w,overlap", [(32, 32, 8), (45, 70, 8), (20, 50, 10), (7, 5, 3),
                                         (64, 96, 0), (100, 33, 31)])
def test_reassembling_a_scene_from_its_windows_returns_it(h, w, overlap):
  tile = 32
  rng = np.random.default_rng(h * w)
  scene = rng.normal(size=(h, w, 3)).astype(np.float32)
  tiling = windows.Tiling(h, w, tile, overlap)
  crops = [tiling.crop(scene, win) for win in tiling.windows()]
  assert all(c.shape == (tile, tile, 3) for c in crops)
  out = windows.blend(tiling, crops, 3)
  assert out.shape == (h, w, 3)
  np.testing.assert_allclose(out, scene, rtol=1e-6, atol=1e-6)
  # Pixels under one window only (weight 1) come back bit for bit; a one-window scene entirely.
  count = np.zeros((max(h, tile), max(w, tile)), int)
  for win in tiling.windows():
    count[win.y:win.y + tile, win.x:win.x + tile] += 1
  single = count[:h, :w] == 1
  np.testing.assert_array_equal(out[single], scene[single])
  if len(tiling) == 1:
    np.testing.assert_array_equal(out, scene)


def test_class_maps_reassemble_exactly_and_rows_stream_in_order():
  """One-hot scores of an index map blend back to the same map (argmax), and the blender hands
  out every row once, top to bottom, holding at most one tile of rows."""
  h, w, tile, k = 90, 61, 32, 5
  labels = np.random.default_rng(1).integers(0, k, (h, w))
  onehot = np.eye(k, dtype=np.float32)[labels]
  tiling = windows.Tiling(h, w, tile, 8)
  blender = windows.Blender(tiling, k)
  assert blender._acc.shape[0] == tile  # pylint: disable=protected-access
  rows = []
  for win in tiling.windows():
    for y0, y1, band in blender.add(win, tiling.crop(onehot, win)):
      rows.append((y0, y1))
      np.testing.assert_array_equal(band.argmax(-1), labels[y0:y1])
  assert rows[0][0] == 0 and rows[-1][1] == h
  assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_constant_scores_blend_to_the_constant():
  tiling = windows.Tiling(75, 75, 32, 8)
  out = windows.blend(tiling, [np.full((32, 32, 2), [0.25, 0.75], np.float32)] * len(tiling), 2)
  np.testing.assert_allclose(out, np.broadcast_to([0.25, 0.75], out.shape), rtol=1e-6)


def test_bad_tilings_are_errors():
  with pytest.raises(ValueError, match="overlap 32 must be in"):
    windows.Tiling(64, 64, 32, 32)
  with pytest.raises(ValueError, match="out of order"):
    tiling = windows.Tiling(64, 64, 32, 0)
    windows.Blender(tiling, 1).add(tiling.windows()[1], np.zeros((32, 32, 1), np.float32))


# ----- with models: a Stage I segmenter and a Stage II refiner (random weights, not trained) ---
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from idgbr_jax import checkpoints  # noqa: E402
from idgbr_jax.assembly import stage1 as assembly1  # noqa: E402
from idgbr_jax.assembly import stage2 as assembly2  # noqa: E402
from idgbr_jax.data import sources, transforms  # noqa: E402
from idgbr_jax.inference import refine as refine_lib  # noqa: E402
from idgbr_jax.inference import stage1 as infer1  # noqa: E402
from idgbr_jax.parallel import sharding  # noqa: E402

S1 = 32  # Stage I tile (tests/test_stage1.py's tiny config)


def stage1_run(root) -> str:
  """A Stage I workdir as the trainer leaves it (config + params/batch statistics), with the
  tiny UNet's random init: prediction needs no training to be tested."""
  from test_stage1 import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(str(root / "tfds"))
  model = assembly1.build_model(config, sources.num_classes(config.data))
  mesh = sharding.mesh_from_config(config)
  variables, _ = sharding.create_sharded(assembly1.variables_init_fn(model, S1),
                                         jax.random.key(3), mesh, tuple(config.sharding_rules))
  ckpt = checkpoints.Checkpointer(str(root / "s1" / "checkpoints"))
  ckpt.save(0, {**variables, "step": jnp.zeros((), jnp.int32)}, config=config)
  ckpt.wait_until_finished()
  ckpt.close()
  return str(root / "s1")


def stage2_run(root) -> str:
  """A Stage II run dir (tests/test_convert_refiner.py's tiny refiner: 16 px, 3 DDIM steps)."""
  from idgbr_configs import stage2_synthetic  # pylint: disable=import-outside-toplevel
  from test_convert_refiner import _save_run, _tiny  # pylint: disable=import-outside-toplevel
  _save_run(_tiny(stage2_synthetic.get_config("runlocal")), root / "s2")
  return str(root / "s2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("windows_models")
  s1 = assembly1.load_segmenter(stage1_run(root))
  s2 = assembly2.load_refiner(stage2_run(root))
  return s1, s2


def _scenes(arrays_list, tile, overlap, keys=None):
  """In-memory scenes over full arrays {name: (H, W, ...)}; returns (scenes, outputs)."""
  scenes, outs = [], []
  for i, arrays in enumerate(arrays_list):
    h, w = arrays["image"].shape[:2]
    tiling = windows.Tiling(h, w, tile, overlap)
    out = np.full((h, w), 255, np.uint8)

    def write(y0, y1, rows, out=out):
      out[y0:y1] = rows.argmax(-1)

    def read(win, tiling=tiling, arrays=arrays):
      return {k: tiling.crop(v, win) for k, v in arrays.items()}
    scenes.append(windows.Scene(tiling, read, write, key=keys[i] if keys else i))
    outs.append(out)
  return scenes, outs


def _stage1(s1, arrays_list, overlap, batch=8):
  config = s1.config
  rules = tuple(config.sharding_rules)
  fn = infer1.make_scores_fn(s1.model, jax.tree.map(lambda x: x.sharding, s1.variables),
                             s1.mesh, rules)
  scenes, outs = _scenes(arrays_list, S1, overlap)
  windows.run(scenes, infer1.scene_predictor(fn, s1.variables, s1.mesh, rules), batch,
              sources.num_classes(config.data))
  return outs


def _image(shape, seed, normalization="imagenet"):
  rng = np.random.default_rng(seed)
  return transforms.normalize_image(rng.integers(0, 256, shape + (3,), np.uint8), normalization)


def test_stage1_one_window_scene_equals_the_single_tile_path(models):
  s1 = models[0]
  rules = tuple(s1.config.sharding_rules)
  images = [_image((S1, S1), i) for i in range(3)]
  outs = _stage1(s1, [{"image": im} for im in images], overlap=8)
  fn = infer1.make_predict_fn(s1.model, jax.tree.map(lambda x: x.sharding, s1.variables),
                              s1.mesh, rules)
  batch = np.zeros((8, S1, S1, 3), np.float32)
  batch[:3] = images
  from idgbr_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  arrays = pipeline.to_global({"image": batch}, s1.mesh, rules)
  with jax.set_mesh(s1.mesh):
    want = np.asarray(fn(s1.variables, arrays["image"]))
  for i in range(3):
    np.testing.assert_array_equal(outs[i], want[i])


def test_stage1_scene_of_any_size_is_covered_and_batching_free(models):
  """A 45 x 70 scene (not a multiple of the 32-px tile) with overlap 8: full-size output, every
  pixel predicted; pixels under one window only are that window's own prediction; the result
  does not depend on the batch size or on the scenes batched with it."""
  s1 = models[0]
  scene = {"image": _image((45, 70), 7)}
  small = {"image": _image((20, 12), 8)}  # smaller than a tile: padded, cropped back
  out, out_small = _stage1(s1, [scene, small], overlap=8)
  k = sources.num_classes(s1.config.data)
  assert out.shape == (45, 70) and out.max() < k and out_small.shape == (20, 12)
  assert out_small.max() < k
  again = _stage1(s1, [small, scene], overlap=8, batch=8)
  np.testing.assert_array_equal(again[1], out)
  np.testing.assert_array_equal(again[0], out_small)
  tiling = windows.Tiling(45, 70, S1, 8)
  first = tiling.windows()[0]
  alone = _stage1(s1, [{"image": tiling.crop(scene["image"], first)}], overlap=8)[0]
  count = np.zeros((45, 70), int)
  for win in tiling.windows():
    count[win.y:win.y + S1, win.x:win.x + S1] += 1
  only_first = count[:S1, :S1] == 1
  np.testing.assert_array_equal(out[:S1, :S1][only_first], alone[only_first])


def test_stage1_constant_scene_has_no_seam(models):
  """A constant scene: every window sees the same input, so the windows agree, and the scene's
  interior is the class of a single tile's interior: the windows' own borders (where zero
  padding changes the prediction) do not show as seams between windows."""
  s1 = models[0]
  tile = transforms.normalize_image(np.full((S1, S1, 3), 128, np.uint8), "imagenet")
  single = _stage1(s1, [{"image": tile}], 16)[0]
  ring = next(b for b in range(S1 // 2) if len(np.unique(single[b:S1 - b, b:S1 - b])) == 1)
  assert ring <= 4  # the random segmenter's border effect is a thin ring
  cls = single[S1 // 2, S1 // 2]
  scene = transforms.normalize_image(np.full((75, 90, 3), 128, np.uint8), "imagenet")
  out = _stage1(s1, [{"image": scene}], overlap=16)[0]
  assert len(windows.Tiling(75, 90, S1, 16)) == 4 * 5
  np.testing.assert_array_equal(out[ring:75 - ring, ring:90 - ring], cls)


def _stage2(s2, arrays_list, overlap, keys=None, batch=8):
  config = s2.config
  config.eval_batch_size = batch
  fn = refine_lib.make_refine_fn(s2.refiner, config, s2.mesh,
                                 jax.tree.map(lambda x: x.sharding, s2.trainable),
                                 jax.tree.map(lambda x: x.sharding, s2.frozen), output="probs")
  scenes, outs = _scenes(arrays_list, config.data.image_size, overlap, keys)
  windows.run(scenes, refine_lib.scene_predictor(fn, s2.trainable, s2.frozen, config, s2.mesh),
              batch, s2.refiner.config.label_embed.num_classes)
  return outs


def _pair(h, w, seed):
  rng = np.random.default_rng(seed)
  return {"image": _image((h, w), seed), "coarse": rng.integers(0, 6, (h, w)).astype(np.int32)}


def test_stage2_one_window_scene_equals_the_single_tile_path(models):
  """Tile-sized scenes refined through windows (probabilities, blended, argmax on the host) are
  the maps `refine_dataset` gives for the same ids: same per-example noise, same result."""
  s2 = models[1]
  size = s2.config.data.image_size
  pairs = [_pair(size, size, i) for i in range(3)]
  ids = [f"im{i}" for i in range(3)]
  outs = _stage2(s2, pairs, overlap=4, keys=[refine_lib.example_key(i) for i in ids])
  config = s2.config
  fn = refine_lib.make_refine_fn(s2.refiner, config, s2.mesh,
                                 jax.tree.map(lambda x: x.sharding, s2.trainable),
                                 jax.tree.map(lambda x: x.sharding, s2.frozen))
  ds = [{**p, "label": p["coarse"], "id": i} for p, i in zip(pairs, ids)]
  want = {i: r for i, r, _, _ in refine_lib.refine_dataset(fn, s2.trainable, s2.frozen, ds,
                                                           config, s2.mesh)}
  for i, out in zip(ids, outs):
    np.testing.assert_array_equal(out, want[i])
  # Per-example noise: the same example in another batch (alone, at another position) refines
  # to the same map.
  alone = {i: r for i, r, _, _ in refine_lib.refine_dataset(fn, s2.trainable, s2.frozen,
                                                            ds[2:], config, s2.mesh)}
  np.testing.assert_array_equal(alone["im2"], want["im2"])


def test_stage2_scene_of_any_size_is_covered_and_batching_free(models):
  s2 = models[1]
  scene, small = _pair(27, 41, 5), _pair(9, 30, 6)
  out, out_small = _stage2(s2, [scene, small], overlap=4, keys=[11, 12])
  assert out.shape == (27, 41) and out.max() < 6 and out_small.shape == (9, 30)
  assert out_small.max() < 6
  again = _stage2(s2, [small, scene], overlap=4, keys=[12, 11])
  np.testing.assert_array_equal(again[1], out)
  np.testing.assert_array_equal(again[0], out_small)


def test_stage2_constant_scene_windows_agree(models):
  """A constant scene (constant image and coarse map) with every window given the same noise:
  every window's probabilities are the same (bit for bit, whatever its batch position), and the
  scene is their blend, so no seam comes from the tiling. (With the default per-window noise a
  trained refiner maps a constant scene to its class; this random one maps noise to patterns.)"""
  s2 = models[1]
  size = s2.config.data.image_size
  image = transforms.normalize_image(np.full((37, 53, 3), 128, np.uint8), "imagenet")
  scene = {"image": image, "coarse": np.full((37, 53), 2, np.int32)}
  config = s2.config
  fn = refine_lib.make_refine_fn(s2.refiner, config, s2.mesh,
                                 jax.tree.map(lambda x: x.sharding, s2.trainable),
                                 jax.tree.map(lambda x: x.sharding, s2.frozen), output="probs")
  real = refine_lib.scene_predictor(fn, s2.trainable, s2.frozen, config, s2.mesh)
  seen = []

  def predict(arrays, refs):
    scores = real(arrays, [(s, dataclasses.replace(w, index=0)) for s, w in refs])
    seen.extend(scores[:len(refs)])
    return scores
  scenes, (out,) = _scenes([scene], size, 4, keys=[5])
  windows.run(scenes, predict, 8, 6)
  tiling = scenes[0].tiling
  assert len(seen) == len(tiling) > 8  # more than one batch
  for s in seen[1:]:
    np.testing.assert_array_equal(s, seen[0])
  np.testing.assert_array_equal(out, windows.blend(tiling, seen, 6).argmax(-1))
  assert out.shape == (37, 53) and out.max() < 6
