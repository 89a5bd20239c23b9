"""Pictures from in-training evaluation: PNG panels under `<workdir>/panels/step_<N>/` and
TensorBoard image summaries, written by process 0 only; Stage I (image | ground truth |
prediction) and Stage II (image | ground truth | coarse | refined | repaired/damaged)."""
import copy
import io
import os

import jax
import numpy as np
import pytest
from PIL import Image

from idgbr_jax import visualize
from idgbr_jax.train import common, stage1

import test_stage1  # tiny configs
from test_stage2 import _write_split, small_config


def _images_in_events(logdir, tag="eval/panels"):
  """{step: [decoded uint8 images]} of an image summary in TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  out = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag != tag:
          continue
        # tf.summary.image: a string tensor [width, height, png, png, ...]
        encoded = tf.make_ndarray(value.tensor)
        out[event.step] = [np.asarray(Image.open(io.BytesIO(b))) for b in encoded[2:]]
  return out


def test_label_panel_columns():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)
  label, pred = rng.integers(0, 2, (6, 7)), rng.integers(0, 2, (6, 7))
  row = visualize.label_panel(image, label, pred, 2, titles=False, gap=1)
  assert row.shape == (6, 3 * 7 + 2, 3)
  np.testing.assert_array_equal(row[:, :7], image)
  np.testing.assert_array_equal(row[:, 8:15], visualize.BINARY_PALETTE[label])
  np.testing.assert_array_equal(row[:, 16:], visualize.BINARY_PALETTE[pred])
  # Zoomed for display: every pixel a 3x3 block.
  big = visualize.label_panel(image, label, pred, 2, titles=False, gap=1, scale=3)
  assert big.shape == (18, 3 * 21 + 2, 3)
  np.testing.assert_array_equal(big[:, :21], image.repeat(3, 0).repeat(3, 1))
  assert [visualize.display_scale(s) for s in (32, 64, 100, 128, 512)] == [4, 2, 2, 1, 1]


def test_panels_reach_png_files_and_tensorboard(tmp_path):
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(str(tmp_path / "tb"))
  panels = [(f"{k:02d}_x/{k}", np.full((10, 20, 3), 40 * k, np.uint8)) for k in range(3)]
  common.write_eval_panels(writer, str(tmp_path), 7, panels)
  writer.flush()
  files = sorted(os.listdir(tmp_path / "panels" / "step_7"))
  assert files == ["00_x_0.png", "01_x_1.png", "02_x_2.png"]  # '/' in an id: no sub-folder
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "panels/step_7/02_x_2.png")),
                                panels[2][1])
  images = _images_in_events(tmp_path / "tb")
  assert list(images) == [7] and len(images[7]) == 3
  for (_, p), im in zip(panels, images[7]):
    np.testing.assert_array_equal(im, p)


def test_only_process_zero_writes_panels(tmp_path, monkeypatch):
  calls = []

  class Writer:
    def write_images(self, step, images):
      calls.append((step, images))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  common.write_eval_panels(Writer(), str(tmp_path), 3, [("a", np.zeros((4, 4, 3), np.uint8))])
  common.write_final_eval(str(tmp_path), 3, {"miou": 0.5})
  assert calls == [] and os.listdir(tmp_path) == []
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  common.write_eval_panels(Writer(), str(tmp_path), 3, [("a", np.zeros((4, 4, 3), np.uint8))])
  assert len(calls) == 1 and calls[0][1]["eval/panels"].shape == (1, 4, 4, 3)


def test_final_eval_holds_plain_numbers(tmp_path):
  common.write_final_eval(str(tmp_path), 5, {"miou": np.float32(0.25), "n": np.int64(3),
                                             "per_class": np.array([0.5, 1.0]),
                                             "refined": {"wf": np.float64(0.75)}})
  import json  # pylint: disable=import-outside-toplevel
  report = json.loads((tmp_path / common.FINAL_EVAL_FILE).read_text())
  assert report == {"step": 5, "miou": 0.25, "n": 3, "per_class": [0.5, 1.0],
                    "refined": {"wf": 0.75}}


def test_stage1_evaluation_writes_panels(tmp_path):
  config = test_stage1.tiny_config(str(tmp_path / "tfds"))
  config.num_train_steps = 2
  config.eval_every_steps = 1  # evaluations at steps 1 and 2
  config.num_eval_panels = 3
  out = stage1.train_and_evaluate(config, str(tmp_path / "run"))
  size = config.data.image_size * visualize.display_scale(config.data.image_size)  # zoomed
  assert size == 128
  for step in (1, 2):
    files = sorted(os.listdir(tmp_path / "run" / "panels" / f"step_{step}"))
    assert len(files) == 3 and files[0].startswith("00_")
    with Image.open(tmp_path / "run" / "panels" / f"step_{step}" / files[0]) as im:
      assert im.size == (3 * size + 2 * 2, size + 14)  # 3 columns under a title strip
  images = _images_in_events(tmp_path / "run")
  assert sorted(images) == [1, 2]
  assert [im.shape for im in images[2]] == [(size + 14, 3 * size + 4, 3)] * 3
  # The last evaluation is also the run's final report (what `idgbr sweep` tabulates).
  import json  # pylint: disable=import-outside-toplevel
  report = json.loads((tmp_path / "run" / common.FINAL_EVAL_FILE).read_text())
  assert report["step"] == 2 and report["miou"] == pytest.approx(out["eval"]["miou"])
  # Resumed at its last step without that report (stopped between the last save and the
  # evaluation): the trainer evaluates now, the same params giving the same numbers.
  os.remove(tmp_path / "run" / common.FINAL_EVAL_FILE)
  again = stage1.train_and_evaluate(config, str(tmp_path / "run"))
  assert again["eval"]["miou"] == pytest.approx(out["eval"]["miou"])
  assert json.loads((tmp_path / "run" / common.FINAL_EVAL_FILE).read_text())["step"] == 2
  # ... and a finished run resumed again does nothing.
  mtime = os.path.getmtime(tmp_path / "run" / common.FINAL_EVAL_FILE)
  assert stage1.train_and_evaluate(config, str(tmp_path / "run"))["eval"] == {}
  assert os.path.getmtime(tmp_path / "run" / common.FINAL_EVAL_FILE) == mtime
  # 0 disables them.
  config.num_eval_panels = 0
  config.num_train_steps = 3
  config.eval_every_steps = 3
  stage1.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path / "run" / "panels")) == ["step_1", "step_2"]


@pytest.mark.slow
def test_stage2_evaluation_writes_refinement_panels(tmp_path):
  from idgbr_jax.train import stage2  # pylint: disable=import-outside-toplevel
  config = small_config()
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.coarse_dir = str(tmp_path / "coarse")
  config.num_train_steps = 1
  config.num_eval_panels = 2
  for split in ("train", "test"):
    _write_split(config, split, config.data.coarse_dir, lambda l: np.roll(l, 1, axis=0))
  stage2.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "run"))
  size = config.data.image_size * visualize.display_scale(config.data.image_size)  # zoomed
  folder = tmp_path / "run" / "panels" / "step_1"
  files = sorted(os.listdir(folder))
  assert len(files) == 2
  with Image.open(folder / files[0]) as im:
    assert im.size == (5 * size + 4 * 2, size + 14)  # image | gt | coarse | refined | change
  images = _images_in_events(tmp_path / "run")
  assert list(images) == [1] and len(images[1]) == 2
  report = common.FINAL_EVAL_FILE
  assert (tmp_path / "run" / report).exists()


def test_panel_selection_takes_the_most_changed_then_random_others():
  # What the demo draws: the images refinement changed most, then a seeded few of the others.
  changed = {f"t{i}": c for i, c in enumerate([5, 0, 9, 9, 1, 7, 0, 3])}
  picks = visualize.select_panels(changed, num_changed=3, num_random=2, seed=0)
  assert picks[:3] == [("t2", "most_changed"), ("t3", "most_changed"), ("t5", "most_changed")]
  rest = [k for k, _ in picks[3:]]
  assert len(rest) == 2 and all(tag == "random" for _, tag in picks[3:])
  assert set(rest) <= {"t0", "t1", "t4", "t6", "t7"} and rest == sorted(rest)
  assert picks == visualize.select_panels(changed, num_changed=3, num_random=2, seed=0)
  assert visualize.select_panels({"a": 1}, num_changed=4, num_random=2) == [("a", "most_changed")]
