"""`bench/claim.py`: the table's numbers are the runs' reports, the runs share what does not
depend on them, and a second invocation reads the reports instead of training again."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _claim():
  spec = importlib.util.spec_from_file_location("claim", os.path.join(REPO, "bench", "claim.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _report(coarse, refined, control, iou_imp, steps=1500):
  keys = ("wf_min", "wf_mean", "miou", "bf", "mba")
  return {"coarse": dict(zip(keys, coarse)), "refined": {**dict(zip(keys, refined)),
                                                         "repair": {"iou_imp": iou_imp}},
          "coarse_autoencoded": dict(zip(keys, control)),
          "settings": {"stage2_steps": steps}}


def test_summary_and_table_are_the_reports_numbers():
  claim = _claim()
  coarse = (0.77, 0.86, 0.75, 0.84, 0.70)
  reports = {"unet": {
      "full": _report(coarse, (0.80, 0.875, 0.76, 0.86, 0.69), (0.78, 0.86, 0.74, 0.83, 0.68),
                      0.31),
      "no_rough": _report(coarse, (0.60, 0.75, 0.62, 0.66, 0.50), (0.78, 0.86, 0.74, 0.83, 0.68),
                          -0.2)}}
  summary = claim.summarize(reports)
  row = summary["unet"]
  assert row["coarse"] == dict(zip(("wf_min", "wf_mean", "miou", "bf", "mba"), coarse))
  assert row["autoencoded"]["wf_min"] == 0.78
  assert row["variants"]["full"]["wf_min"] == 0.80
  assert row["variants"]["no_rough"]["iou_imp"] == -0.2
  assert row["variants"]["full"]["stage2_steps"] == 1500
  table = claim.markdown(summary).splitlines()
  assert table[2].startswith("| unet | coarse | 0.7700 | 0.8600 | 0.7500 | 0.8400 | 0.7000 |")
  assert table[3].startswith("| unet | AE only | 0.7800 |")
  # refined (refined - coarse) per metric, then IoU_imp
  assert table[4] == ("| unet | full | 0.8000 (+0.0300) | 0.8750 (+0.0150) | 0.7600 (+0.0100) "
                      "| 0.8600 (+0.0200) | 0.6900 (-0.0100) | 0.3100 |")
  assert table[5].startswith("| unet | no_rough | 0.6000 (-0.1700) |")


def test_variants_of_one_backbone_must_share_its_coarse_maps():
  claim = _claim()
  reports = {"segformer": {
      "full": _report((0.7, 0.8, 0.7, 0.8, 0.6), (0.7,) * 5, (0.7,) * 5, 0.0),
      "cubic": _report((0.71, 0.8, 0.7, 0.8, 0.6), (0.7,) * 5, (0.7,) * 5, 0.0)}}
  with pytest.raises(ValueError, match="segformer/cubic: its coarse maps differ"):
    claim.summarize(reports)


def test_unknown_backbone_or_variant_is_an_error_that_names_it(tmp_path):
  for flag, value in (("--backbones", "unet,hrnet"), ("--variants", "full,no_cubics")):
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench", "claim.py"),
                          f"--workdir={tmp_path}", f"{flag}={value}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert flag in res.stderr and repr(value.split(",")[1]) in res.stderr
    assert not os.listdir(tmp_path)  # nothing ran


def test_set_values_take_the_configs_types_and_bad_keys_are_errors(tmp_path):
  claim = _claim()
  config = claim.run_config("unet", "full", "runlocal", [("stage2.num_train_steps", "7"),
                                                          ("stage2.optim.learning_rate", "2e-3"),
                                                          ("stage2.latent_cache", "false")])
  assert config.stage2.num_train_steps == 7 and config.stage2.optim.learning_rate == 2e-3
  assert config.stage2.latent_cache is False
  for item, message in (("stage2.no_such=1", "no key 'stage2.no_such'"),
                        ("stage2.num_train_steps=abc", "the config has 1500"),
                        ("stage2num_train_steps", "expected KEY=VALUE")):
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench", "claim.py"),
                          f"--workdir={tmp_path / 'w'}", f"--set={item}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and message in res.stderr, res.stderr
    assert not (tmp_path / "w").exists()  # nothing ran, nothing written


def test_a_workdir_holds_runs_of_one_setting(tmp_path):
  claim = _claim()
  claim.check_workdir_settings(str(tmp_path), "", [("stage2.num_train_steps", "3000")])
  claim.check_workdir_settings(str(tmp_path), "", [("stage2.num_train_steps", "3000")])  # same
  with pytest.raises(ValueError, match="holds runs made with .*num_train_steps=3000.*another "
                     "--workdir"):
    claim.check_workdir_settings(str(tmp_path), "", [])
  with open(tmp_path / "claim_args.json") as f:
    assert json.load(f) == {"config_arg": "", "set": ["stage2.num_train_steps=3000"]}


@pytest.mark.slow
def test_claim_runlocal_runs_then_resumes_from_its_reports(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(REPO, "bench", "claim.py"), f"--workdir={tmp_path}",
         "--backbones=segformer", "--variants=no_align", "--config_arg=runlocal",
         f"--markdown={tmp_path / 'claim.md'}"]
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]
  run_dir = tmp_path / "segformer" / "no_align"
  with open(run_dir / "report.json") as f:
    report = json.load(f)
  with open(tmp_path / "claim.json") as f:
    result = json.load(f)
  row = result["summary"]["segformer"]
  assert row["coarse"]["wf_min"] == report["coarse"]["wf_min"]
  assert row["autoencoded"]["miou"] == report["coarse_autoencoded"]["miou"]
  assert row["variants"]["no_align"]["wf_mean"] == report["refined"]["wf_mean"]
  assert row["variants"]["no_align"]["iou_imp"] == report["refined"]["repair"]["iou_imp"]
  assert result["command"].startswith("python bench/claim.py --workdir=")
  # Shared parts at the top, Stage I per backbone, Stage II per variant; no panels.
  assert (tmp_path / "autoencoder" / "meta.json").exists()
  assert (tmp_path / "segformer" / "stage1" / "checkpoints").exists()
  assert (run_dir / "stage2" / "checkpoints").exists()
  assert not (run_dir / "panels").exists()
  # no_align: Stage II trained without the REPA teacher (its config as written).
  from idgbr_jax.checkpoints import manager  # pylint: disable=import-outside-toplevel
  config = manager.load_config(str(run_dir / "stage2" / "checkpoints"))
  assert config.repa.enabled is False and config.diffusion.use_coarse is True
  table = (tmp_path / "claim.md").read_text()
  assert table in res.stdout and "| segformer | no_align |" in table
  # Again: the report is read, nothing trains, the same table.
  mtime = os.path.getmtime(run_dir / "report.json")
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-4000:]
  assert os.path.getmtime(run_dir / "report.json") == mtime
  assert "[claim" not in again.stdout and table in again.stdout
