"""The bad-input catalogue (README "When things go wrong"): every command, fed each kind of bad
input as a user would, stops with a non-zero status and one `error: <message>` line that names
the file / key / value and says what was expected, shows no Python traceback, and leaves what
was already written (checkpoints, outputs, reports, prepared datasets) byte-identical.

Commands run as `python -m idgbr_jax.cli <command> ...` in a subprocess, except the training
data cases, which call the `idgbr train` entry (`commands.train.run`) in-process behind the
same error boundary (`idgbr_jax.cli.guarded`) with the dataset source replaced: they fail on
the first batch, before anything is compiled. `idgbr plan` does not exist yet: no cases.
The non-finite-loss, half-written-checkpoint and full-disk faults are in test_train_faults.py.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from idgbr_configs import stage2_synthetic
from idgbr_jax import checkpoints, cli
from idgbr_jax.commands import train as train_command
from idgbr_jax.convert import checkpoint_io, files
from idgbr_jax.data import sources
from idgbr_jax.train import stage1
from test_datasets_binary import _write_chn6
from test_stage1 import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # the fake Stage II run's image size


# ----- fixtures: built once ------------------------------------------------------------------
class Env:
  """Paths of everything the cases start from (and must leave untouched)."""


def _png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _label_embed_folder(root, conv_out=8):
  """An original labelembednet8 folder (config.json + safetensors), numpy-made."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  files.write_safetensors(os.path.join(root, "diffusion_pytorch_model.safetensors"), {
      "embedding_table.weight": rng.normal(size=(8, 3)).astype(np.float32),
      "embedding_conv.0.weight": rng.normal(size=(128, 3, 1, 1)).astype(np.float32),
      "embedding_conv.0.bias": np.zeros(128, np.float32),
      "embedding_conv.2.weight": rng.normal(size=(conv_out, 128, 1, 1)).astype(np.float32),
      "embedding_conv.2.bias": np.zeros(conv_out, np.float32)})
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump({"_class_name": "LabelEmbedNet", "label_emb_inchannels": 3, "num_classes": 8}, f)
  return root


def stage2_config():
  config = stage2_synthetic.get_config("runlocal")
  config.data.image_size = SIZE
  config.mesh_shape.data = 1
  return config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_inputs")
  e = Env()
  e.root = root
  # A prepared dataset and a trained Stage I run (3 steps: checkpoints 2 and 3).
  e.data_dir = str(root / "tfds")
  config = tiny_config(e.data_dir)
  config.checkpoint_every_steps = 2
  e.s1 = str(root / "s1")
  stage1.train_and_evaluate(config, e.s1)
  # A Stage II run directory: its config (what refine reads first) and a stand-in state.
  e.s2 = str(root / "s2")
  with checkpoints.Checkpointer(os.path.join(e.s2, "checkpoints")) as ckpt:
    ckpt.save(1, {"step": np.int32(1)}, config=stage2_config())
  e.coarse = str(root / "coarse")  # <coarse>/train exists (Stage II checks it), empty
  os.makedirs(os.path.join(e.coarse, "train"))
  # Refinement inputs and a previous output.
  rng = np.random.default_rng(0)
  e.images, e.maps, e.refined = (str(root / n) for n in ("images", "maps", "refined"))
  for stem in ("a", "b"):
    _png(os.path.join(e.images, f"{stem}.png"), rng.integers(0, 256, (SIZE, SIZE, 3)))
    _png(os.path.join(e.maps, f"{stem}.png"), rng.integers(0, 6, (SIZE, SIZE)))
    _png(os.path.join(e.refined, f"{stem}.png"), rng.integers(0, 6, (SIZE, SIZE)))
  # Evaluation inputs and a previous report.
  e.preds, e.labels = str(root / "preds"), str(root / "labels")
  for i in range(3):
    _png(os.path.join(e.preds, f"tile_{i}.png"), rng.integers(0, 2, (16, 16)))
    _png(os.path.join(e.labels, f"tile_{i}.png"), rng.integers(0, 2, (16, 16)))
  e.report = str(root / "report.json")
  with open(e.report, "w") as f:
    json.dump({"miou": 0.5}, f)
  # Weights: an original label embedding folder, converted once (the checkpoint to protect).
  e.le_folder = _label_embed_folder(str(root / "labelembednet8"))
  e.le_ckpt = str(root / "weights" / "label_embed")
  checkpoint_io.convert_to_checkpoints("idgbr", e.le_folder, e.le_ckpt)
  e.afile = str(root / "a_file")
  with open(e.afile, "w") as f:
    f.write("not a folder\n")
  return e


# ----- running a case ------------------------------------------------------------------------
def _cli(*args, module="idgbr_jax.cli"):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("IDGBR_TRACEBACK", None)
  proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stdout + proc.stderr


def _train_in_process(config, workdir):
  """`idgbr train` behind the CLI's error boundary, in this process."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = cli.guarded(lambda _: train_command.run(copy.deepcopy(config), str(workdir)) and 0)(
        ["idgbr train"])
  return status, err.getvalue()


def _records(n=8, size=SIZE, channels=3, label_value=None, ignore_pixel=False):
  rng = np.random.default_rng(1)
  out = []
  for i in range(n):
    label = rng.integers(0, 2, (size, size, 1)).astype(np.uint8)
    if label_value is not None:
      label[0, 0] = label_value
    if ignore_pixel:
      label[2, 3] = 255
    out.append({"image": rng.integers(0, 256, (size, size, channels), dtype=np.uint8),
                "label": label, "id": f"t{i}"})
  return out


def _with_records(monkeypatch, records):
  monkeypatch.setattr(sources, "get_source", lambda cfg, split: records)


def _stage1(e, monkeypatch, records):
  _with_records(monkeypatch, records)
  config = tiny_config(e.data_dir)
  config.num_train_steps = 4  # the run holds step 3: one more step, whose batch is bad
  return _train_in_process(config, e.s1)


def _stage2(e, monkeypatch, records=None, **init):
  if records is not None:
    _with_records(monkeypatch, records)
  config = stage2_config()
  config.data.coarse_dir = e.coarse
  for k, v in init.items():
    config.init[k] = v
  return _train_in_process(config, e.s2)


def _copy_coarse(e, name, **arrays):
  d = str(e.root / name)
  if not os.path.isdir(d):
    for stem in ("a", "b"):
      _png(os.path.join(d, f"{stem}.png"), arrays.get(stem, np.zeros((SIZE, SIZE))))
  return d


def _images(e, name, **arrays):
  d = str(e.root / name)
  if not os.path.isdir(d):
    shutil.copytree(e.images, d)
    for stem, a in arrays.items():
      if a is None:
        os.remove(os.path.join(d, f"{stem}.png"))
      else:
        Image.fromarray(a[0], a[1]).save(os.path.join(d, f"{stem}.png"))
  return d


def _refine(e, images=None, coarse=None):
  return _cli("refine", f"--checkpoint={e.s2}", f"--images={images or e.images}",
              f"--coarse={coarse or e.maps}", f"--out={e.refined}", "--num_steps=1")


def _evaluate(e, preds=None, labels=None, *extra):
  extra = extra or ("--num_classes=2",)  # 2 classes: the original binarises (value > 0)
  return _cli("evaluate", f"--pred_dir={preds or e.preds}", f"--label_dir={labels or e.labels}",
              f"--output={e.report}", "--noprogress", *extra)


def _variant(src, dst, edit: Callable[[str], None]) -> str:
  if not os.path.exists(dst):
    shutil.copytree(src, dst)
    edit(dst)
  return dst


def _truncate(path, keep=0.5):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * keep)])


def _read_only_dir(e):
  """A folder this process cannot write into: chmod 0o555, unless the process is root (which
  writes anyway): then a path under a file, which no one can create."""
  d = e.root / "read_only"
  d.mkdir(exist_ok=True)
  os.chmod(d, 0o555)
  try:
    (d / "probe").write_bytes(b"")
    os.remove(d / "probe")
    os.chmod(d, 0o755)
    return os.path.join(e.afile, "coarse"), "under a file (root writes into 0o555 folders)"
  except OSError:
    return str(d / "coarse"), "chmod 0o555"


def _chn6(e, name, edit):
  root = str(e.root / name)
  if not os.path.isdir(root):
    _write_chn6(root)
    edit(root)
  return _cli(f"--manual_dir={root}", f"--data_dir={e.data_dir}",
              module="idgbr_datasets.chn6_cug")


# ----- the catalogue ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
  name: str       # the bad input (README catalogue)
  command: str
  run: Callable   # (env, monkeypatch) -> (status, output)
  expect: tuple   # substrings: the file / key / value, and what was expected
  protect: Callable = lambda e: [e.s1, e.s2, e.refined, e.report, e.le_ckpt, e.data_dir]


CASES = [
    # --- configs and the command line (train) ---
    Case("unknown config key", "train",
         lambda e, mp: _cli("train", "--config=configs/stage1_synthetic.py:runlocal",
                            f"--workdir={e.s1}", "--config.no_such_key=1"),
         ("--config.no_such_key=1", "no key 'no_such_key'", "must exist in the config file")),
    Case("config value of the wrong type", "train",
         lambda e, mp: _cli("train", "--config=configs/stage1_synthetic.py:runlocal",
                            f"--workdir={e.s1}", "--config.batch_size=abc"),
         ("--config.batch_size=abc", "expected a value of type int")),
    Case("unknown config argument", "train",
         lambda e, mp: _cli("train", "--config=configs/stage1_synthetic.py:runlocal,bogus=1",
                            f"--workdir={e.s1}"),
         ("unknown config arg 'bogus'", "allowed: ['backbone'")),
    Case("conflicting mesh shape", "train",
         lambda e, mp: _cli("train", "--config=configs/stage1_synthetic.py:runlocal",
                            f"--workdir={e.s1}", "--config.mesh_shape.fsdp=3"),
         ("config.mesh_shape", "[-1, 3, 1] does not divide 8 devices",
          "expected sizes (data, fsdp, tensor; one may be -1) whose product divides")),
    # --- training data (Stage I / II, in-process) ---
    Case("label values outside the classes", "train (Stage I)",
         lambda e, mp: _stage1(e, mp, _records(label_value=9)),
         ("example t", "label values [9] outside [0, 6)")),
    Case("wrong band count", "train (Stage I)",
         lambda e, mp: _stage1(e, mp, _records(channels=4)),
         ("example t", "image shape (32, 32, 4), expected (H,W,3)")),
    Case("empty split", "train (Stage I)",
         lambda e, mp: _stage1(e, mp, []),
         ("training split 'train'", "'synthetic_rs' is empty", "expected at least one")),
    Case("ignore label in Stage II", "train (Stage II)",
         lambda e, mp: _stage2(e, mp, _records(ignore_pixel=True)),
         ("example t", "label values [255]", "no ignore value here")),
    Case("coarse map missing", "train (Stage II)",
         lambda e, mp: _stage2(e, mp, _records()),
         ("coarse map missing for example t", os.path.join("coarse", "train", "t"))),
    Case("missing weights file", "train (Stage II)",
         lambda e, mp: _stage2(e, mp, autoencoder=str(e.root / "no_such_ae")),
         ("no_such_ae", "meta.json not found", "expected params/ and meta.json")),
    Case("weights of the wrong kind", "train (Stage II)",
         lambda e, mp: _stage2(e, mp, autoencoder=e.le_ckpt),
         ("label_embed", "holds a 'label_embed' checkpoint, expected 'autoencoder'")),
    # --- workdirs and output folders ---
    Case("a workdir that is a file", "demo",
         lambda e, mp: _cli("demo", f"--workdir={e.afile}"),
         ("a_file", "is a file", "expected a folder")),
    Case("read-only output folder", "predict",
         lambda e, mp: _cli("predict", f"--workdir={e.s1}", "--splits=test",
                            f"--out_dir={_read_only_dir(e)[0]}"),
         ("--out_dir", "coarse", "not writable")),
    Case("half-written checkpoint step", "predict",
         lambda e, mp: _cli("predict", "--workdir=" + _variant(
             e.s1, str(e.root / "s1_half"), lambda d: (
                 shutil.rmtree(os.path.join(d, "checkpoints", "2")),
                 os.remove(os.path.join(d, "checkpoints", "3", "commit_success.txt")))),
             "--splits=test"),
         ("no complete checkpoint in", "s1_half", "ignored as half-written: 3")),
    # --- refinement inputs ---
    Case("coarse map missing", "refine",
         lambda e, mp: _refine(e, images=_images(e, "images_extra", c=(
             np.zeros((SIZE, SIZE, 3), np.uint8), "RGB"))),
         ("no coarse map for image c.png", os.path.join("maps", "c.png"), "is missing")),
    Case("coarse map of another size", "refine",
         lambda e, mp: _refine(e, coarse=_copy_coarse(e, "maps_16", a=np.zeros((16, 16)))),
         ("a:", "coarse map", "is 16x16", f"must be {SIZE}x{SIZE}")),
    Case("wrong band count", "refine",
         lambda e, mp: _refine(e, images=_images(e, "images_rgba", a=(
             np.zeros((SIZE, SIZE, 4), np.uint8), "RGBA"))),
         ("a.png", "4 band(s) (mode RGBA)", "expected 3 (RGB")),
    Case("corrupt/truncated image", "refine",
         lambda e, mp: _refine(e, images=_variant(
             e.images, str(e.root / "images_trunc"),
             lambda d: _truncate(os.path.join(d, "b.png")))),
         ("cannot read image", "b.png")),
    Case("coarse values outside the classes", "refine",
         lambda e, mp: _refine(e, coarse=_copy_coarse(e, "maps_values",
                                                      b=np.full((SIZE, SIZE), 7))),
         ("b.png", "values [7] outside", "6 classes")),
    # --- evaluation ---
    Case("prediction/label size mismatch", "evaluate",
         lambda e, mp: _evaluate(e, preds=_variant(e.preds, str(e.root / "preds_size"), lambda d: (
             _png(os.path.join(d, "tile_1.png"), np.zeros((16, 12)))))),
         ("prediction shape (16, 12) != label shape (16, 16)", "expected a prediction of its",
          os.path.join("preds_size", "tile_1.png"))),
    Case("corrupt/truncated image", "evaluate",
         lambda e, mp: _evaluate(e, preds=_variant(e.preds, str(e.root / "preds_trunc"), lambda d: (
             _truncate(os.path.join(d, "tile_2.png"))))),
         ("cannot read", "tile_2.png")),
    Case("label values outside the classes", "evaluate",
         lambda e, mp: _evaluate(e, None, _variant(e.labels, str(e.root / "labels_9"), lambda d: (
             _png(os.path.join(d, "tile_0.png"), np.full((16, 16), 9)))), "--num_classes=3",
             "--strict"),
         ("tile_0 (label 256, pred 0 px)", "expected only class indices 0..2")),
    Case("empty split", "evaluate",
         lambda e, mp: _evaluate(e, None, _variant(e.labels, str(e.root / "labels_empty"),
                                                   lambda d: [os.remove(os.path.join(d, f))
                                                              for f in os.listdir(d)])),
         ("no label maps", "labels_empty", "expected one per image")),
    # --- weights in and out ---
    Case("missing weights file", "convert",
         lambda e, mp: _cli("convert", "--from=idgbr", f"--src={e.root / 'no_such_weights'}",
                            f"--dst={e.le_ckpt}"),
         ("no_such_weights", "not found")),
    Case("truncated safetensors", "convert",
         lambda e, mp: _cli("convert", "--from=idgbr", "--src=" + _variant(
             e.le_folder, str(e.root / "le_trunc"), lambda d: _truncate(
                 os.path.join(d, "diffusion_pytorch_model.safetensors"))), f"--dst={e.le_ckpt}"),
         ("le_trunc", "diffusion_pytorch_model.safetensors", "cannot read as safetensors")),
    Case("weights of the wrong shape", "convert",
         lambda e, mp: _cli("convert", "--from=idgbr",
                            "--src=" + (str(e.root / "le_shape") if os.path.isdir(
                                e.root / "le_shape") else _label_embed_folder(
                                    str(e.root / "le_shape"), conv_out=5)),
                            f"--dst={e.le_ckpt}"),
         ("le_shape", "shape mismatch for decoder_out/bias: expected (8,), got (5,)")),
    Case("weights of the wrong kind", "convert",
         lambda e, mp: _cli("convert", "--from=diffusers", f"--src={e.le_folder}",
                            f"--dst={e.le_ckpt}"),
         ("labelembednet8", "LabelEmbedNet")),
    Case("weights of the wrong kind", "export",
         lambda e, mp: _cli("export", f"--checkpoint={e.le_ckpt}", "--to=diffusers",
                            f"--dst={e.refined}"),
         ("label_embed", "has no diffusers form", "--to=idgbr")),
    # --- dataset builds ---
    Case("corrupt/truncated image", "dataset build",
         lambda e, mp: _chn6(e, "chn6_trunc", lambda r: _truncate(
             os.path.join(r, "train", "images", "bj01_sat.jpg"), 0.3)),
         ("cannot read", os.path.join("train", "images", "bj01_sat.jpg"))),
    Case("empty split", "dataset build",
         lambda e, mp: _chn6(e, "chn6_empty", lambda r: [
             os.remove(os.path.join(r, "val", sub, f)) for sub in ("images", "gt")
             for f in os.listdir(os.path.join(r, "val", sub))]),
         ("no images", os.path.join("val", "images"), "expected at least one image")),
]


def _snapshot(paths_):
  out = {}
  for root in paths_:
    root = str(root)
    if os.path.isfile(root):
      with open(root, "rb") as f:
        out[root] = f.read()
      continue
    for dirpath, _, names in os.walk(root):
      for name in names:
        p = os.path.join(dirpath, name)
        with open(p, "rb") as f:
          out[p] = f.read()
  return out


def test_catalogue_has_enough_kinds():
  kinds = {c.name for c in CASES}
  assert len(kinds) >= 20, sorted(kinds)
  assert {c.command for c in CASES} >= {"train", "train (Stage I)", "train (Stage II)", "predict",
                                        "refine", "evaluate", "convert", "export", "demo",
                                        "dataset build"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}: {c.name}" for c in CASES])
def test_bad_input_is_a_clear_error_and_nothing_is_lost(case, env, monkeypatch):
  before = _snapshot(case.protect(env))
  status, output = case.run(env, monkeypatch)
  assert status not in (0, None), output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith("error: ")]
  assert errors, output[-3000:]
  message = output[output.index("error: "):]
  print(f"[{case.command}] {case.name} -> {errors[0]}")  # the catalogue, with -s
  for part in case.expect:
    assert part in message, (part, message[:2000])
  after = _snapshot(case.protect(env))
  lost = [p for p in before if after.get(p) != before[p]]
  assert not lost, lost[:5]


def test_the_boundary_keeps_the_traceback_of_a_bug(capsys):
  """Only the project's own checks become `error: ...`: a library's or an implicit error (a
  bug) propagates with its traceback; IDGBR_TRACEBACK=1 shows user errors' tracebacks too."""
  def implicit(_):
    return int("not a number")  # a ValueError from the interpreter, not a deliberate check
  with pytest.raises(ValueError):
    cli.guarded(implicit)([])

  def data_error(_):
    raise sources.DataError("example t1: label values [9] outside [0, 6)")
  assert cli.guarded(data_error)([]) == 1
  assert capsys.readouterr().err == "error: example t1: label values [9] outside [0, 6)\n"
  os.environ["IDGBR_TRACEBACK"] = "1"
  try:
    with pytest.raises(sources.DataError):
      cli.guarded(data_error)([])
  finally:
    del os.environ["IDGBR_TRACEBACK"]
