"""idgbr predict --workdir=STAGE1_DIR [--splits=train,test] [--out_dir=DIR] [--num_folds=K]

Writes Stage I coarse maps as index PNGs `<out_dir>/<split>/<id>.png` (default
`<workdir>/coarse`). `--num_folds=K` cross-fits the train split (K fold models are trained
under `<workdir>/folds/` if missing) so train coarse maps look like test ones.
"""

from absl import flags

from idgbr_jax.commands import _runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Stage I run directory (with checkpoints/).")
_SPLITS = flags.DEFINE_list("splits", ["train", "test"], "Splits to predict.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (default <workdir>/coarse).")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 0, "k-fold cross-fitting of the train split.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup()
  from idgbr_jax.inference import stage1 as infer  # pylint: disable=import-outside-toplevel
  from idgbr_jax import checkpoints, paths  # pylint: disable=import-outside-toplevel
  workdir = str(paths.resolve(_WORKDIR.value))
  out_dir = _OUT_DIR.value or paths.join(workdir, "coarse")
  config = checkpoints.load_config(paths.join(workdir, "checkpoints"))
  paths.ensure_writable_dir(out_dir, "--out_dir")  # before any prediction
  for split in _SPLITS.value:
    if split == config.data.train_split and _NUM_FOLDS.value:
      from idgbr_jax.train import stage1  # pylint: disable=import-outside-toplevel
      n = stage1.predict_cross_fitted(workdir, out_dir, _NUM_FOLDS.value, config)
    else:
      n = infer.predict_split(workdir, split, out_dir, config=config)
    print(f"{split}: {n} coarse maps -> {paths.join(out_dir, split)}")
