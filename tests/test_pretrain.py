"""Pretraining of Stage II's frozen parts: the label embedding and the small autoencoder write
params checkpoints that Stage II reads back (architecture from meta.json)."""
import jax
import ml_collections
import numpy as np
import pytest

from idgbr_configs import stage2_synthetic
from idgbr_jax.assembly import stage2 as assembly
from idgbr_jax.checkpoints import params as params_ckpt
from idgbr_jax.models import autoencoder
from idgbr_jax.train import pretrain


def _optim(lr):
  return dict(learning_rate=lr, weight_decay=0.0, b1=0.9, b2=0.999, schedule="constant",
              warmup_steps=0, clip_norm=0.0)


def test_label_embedding_learns_and_round_trips(tmp_path):
  cfg = ml_collections.ConfigDict(dict(num_classes=3, hidden=16, steps=150, batch_size=4,
                                       size=16, noise_std=0.15, seed=0, train_table=True,
                                       optim=_optim(2e-2)))
  out = pretrain.train_label_embedding(cfg, str(tmp_path / "le"))
  assert out["accuracy"] > 0.95
  meta = params_ckpt.load_meta(str(tmp_path / "le"))
  assert meta["kind"] == "label_embed" and meta["config"]["num_classes"] == 3
  restored = params_ckpt.load_params(str(tmp_path / "le"))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(out["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_autoencoder_checkpoint_feeds_stage2_config(tmp_path):
  le_cfg = ml_collections.ConfigDict(dict(num_classes=6, hidden=8, steps=5, batch_size=2,
                                          size=8, noise_std=0.15, seed=0, train_table=False,
                                          optim=_optim(1e-2)))
  pretrain.train_label_embedding(le_cfg, str(tmp_path / "le"))
  data_config = stage2_synthetic.get_config("runlocal")
  data_config.data.data_dir = str(tmp_path / "tfds")
  data_config.mesh_shape.data = 1
  ae_cfg = ml_collections.ConfigDict(dict(
      variant="tiny", overrides=dict(block_out_channels=(8, 16, 16), norm_num_groups=8),
      steps=3, kl_weight=1e-6, label_ce_weight=1.0, seed=0, optim=_optim(1e-3)))
  out = pretrain.train_autoencoder(ae_cfg, data_config, str(tmp_path / "le"),
                                   str(tmp_path / "ae"))
  assert np.isfinite(out["l1"]) and 0.0 <= out["label_accuracy"] <= 1.0
  # Stage II takes the autoencoder's architecture from the checkpoint, not from its own config.
  data_config.init.autoencoder = str(tmp_path / "ae")
  data_config.init.label_embed = str(tmp_path / "le")
  rc = assembly.refiner_config(data_config, 6)
  assert rc.autoencoder == autoencoder.get_config(
      "tiny", block_out_channels=(8, 16, 16), norm_num_groups=8)
  assert rc.autoencoder.downsample_factor == 4
  assert rc.label_embed.hidden == 8


def test_autoencoder_pretraining_refuses_an_ignore_label(tmp_path, monkeypatch):
  # The labels go through the label embedding: a 255 would be NaN colours (as in Stage II).
  from idgbr_jax.data import sources  # pylint: disable=g-import-not-at-top
  le_cfg = ml_collections.ConfigDict(dict(num_classes=6, hidden=8, steps=1, batch_size=2,
                                          size=8, noise_std=0.15, seed=0, train_table=False,
                                          optim=_optim(1e-2)))
  pretrain.train_label_embedding(le_cfg, str(tmp_path / "le"))
  data_config = stage2_synthetic.get_config("runlocal")
  data_config.mesh_shape.data = 1
  size = data_config.data.image_size
  label = np.zeros((size, size, 1), np.uint8)
  label[0, 0] = 255
  records = [{"image": np.zeros((size, size, 3), np.uint8), "label": label, "id": f"a{i}"}
             for i in range(16)]
  monkeypatch.setattr(sources, "get_source", lambda cfg, split: records)
  ae_cfg = ml_collections.ConfigDict(dict(
      variant="tiny", overrides=dict(block_out_channels=(8, 16, 16), norm_num_groups=8),
      steps=1, kl_weight=1e-6, label_ce_weight=1.0, seed=0, optim=_optim(1e-3)))
  with pytest.raises(sources.DataError, match=r"example a\d+.*\[255\]"):
    pretrain.train_autoencoder(ae_cfg, data_config, str(tmp_path / "le"), str(tmp_path / "ae"))
