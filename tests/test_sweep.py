"""`idgbr sweep`: expansion and names, dry-run commands, bad input, a real two-run Stage I sweep
whose table holds each run's own final evaluation, and resumption (a second sweep trains
nothing)."""
import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

from idgbr_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S1 = os.path.join(REPO, "configs", "stage1_synthetic.py")
S2 = os.path.join(REPO, "configs", "stage2_synthetic.py")


def _env():
  # Skipping XLA's optimisation passes halves compile time, which is all of a tiny run.
  return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
          "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "IDGBR_PROGRESS_INTERVAL": "1"}


def _cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "idgbr_jax.cli", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


# ----- expansion, names, commands (no training) --------------------------------------------------
def test_product_of_braces_and_set_lists_in_order_with_stable_names(tmp_path):
  runs = sweep.expand(f"{S2}:ablation={{full,no_rough,no_align}},runlocal",
                      ["seed=0,1", "optim.learning_rate=1e-3"], str(tmp_path))
  assert [r.name for r in runs] == [
      f"ablation={a},seed={s}" for a in ("full", "no_rough", "no_align") for s in (0, 1)]
  r = runs[3]  # no_rough, seed 1
  assert r.values == {"ablation": "no_rough", "seed": "1"}
  assert r.config == f"{S2}:ablation=no_rough,runlocal"
  assert r.workdir == str(tmp_path / "ablation=no_rough,seed=1")
  # A single value is a fixed override (in every command, not in the name).
  assert r.overrides == (("seed", "1"), ("optim.learning_rate", "1e-3"))
  assert shlex.split(r.command()) == [
      "idgbr", "train", f"--config={S2}:ablation=no_rough,runlocal",
      f"--workdir={tmp_path}/ablation=no_rough,seed=1", "--config.seed=1",
      "--config.optim.learning_rate=1e-3"]
  # The configs are those `idgbr train` would build from these flags.
  configs = sweep.validate(runs[2:4])
  assert [c.diffusion.use_coarse for c in configs.values()] == [False, False]  # no_rough
  assert [c.seed for c in configs.values()] == [0, 1]
  assert all(c.optim.learning_rate == 1e-3 for c in configs.values())


def test_shell_expanded_braces_are_joined_back():
  expanded = [f"c.py:a={a},r,b={b}" for a in ("p", "q") for b in ("1", "2", "3")]
  assert sweep.join_shell_expanded(expanded) == "c.py:a={p,q},r,b={1,2,3}"
  assert sweep.join_shell_expanded(["c.py:a=p"]) == "c.py:a=p"
  for bad in (["c.py:a=p", "d.py:a=q"], ["c.py:a=p", "c.py:b=q"], expanded[:5],
              ["c.py:a=p,b=1", "c.py:a=q,b=2"]):
    with pytest.raises(ValueError, match="quote it"):
      sweep.join_shell_expanded(bad)


def test_names_and_set_forms():
  assert sweep.run_name({}) == "run"
  assert sweep.run_name({"data.data_dir": "/a/b c"}) == "data.data_dir=_a_b_c"
  assert sweep.parse_set("seed={0,1}").values == ("0", "1")
  assert sweep.parse_set("config.seed=0, 1").key == "seed"
  # Commas inside brackets belong to one value (a tuple or list field).
  assert sweep.parse_set("a.b=[1,2],(3,4)").values == ("[1,2]", "(3,4)")
  assert sweep.split_top_level("a={x,y},b='p,q',c") == ["a={x,y}", "b='p,q'", "c"]
  # A config arg and a config field of the same name get distinct columns.
  runs = sweep.expand(f"{S1}:image_size={{32,64}}", ["data.image_size=32", "seed=1,2"], "/w")
  assert runs[0].values == {"image_size": "32", "seed": "1"}


@pytest.mark.parametrize("config,sets,match", [
    (f"{S1}:runlocal", ["no_such_key=1,2"], r"--set no_such_key: the config .* has no field "
     r"'no_such_key'"),
    (f"{S1}:runlocal", ["optim.lrr=1"], r"has no field 'optim.lrr'"),
    (f"{S1}:runlocal", ["seed=0,x"], r"--set seed=x: .*invalid literal.*the config has 0 \(int\)"),
    (f"{S1}:runlocal,bogus={{1,2}}", [], r"unknown config arg 'bogus'; allowed: \["),
    (f"{S1}:runlocal,variant={{tiny,small", [], r"unbalanced"),
    (f"{S1}:runlocal,{{a,b}}", [], r"a brace needs a config arg name"),
    (f"{S1}:runlocal", ["seed=0,1", "seed=2"], r"--set 'seed' is given twice"),
    (f"{S1}:runlocal", ["seed"], r"expected key=value"),
    (f"{S1}:runlocal", ["eval_every_steps=-1"], r"eval_every_steps=-1 never evaluates"),
    (os.path.join(REPO, "configs", "nope.py") + ":a={1,2}", [], r"cannot load the config file"),
])
def test_bad_input_is_an_error_naming_it(config, sets, match):
  with pytest.raises(ValueError, match=match):
    sweep.validate(sweep.expand(config, sets, "/w"))


def test_dry_run_prints_one_shell_quoted_train_command_per_run(tmp_path):
  res = _cli("sweep", f"--config={S1}:runlocal,variant={{tiny,small}}", "--set", "seed=0,1",
             "--set", "data.data_dir=/data dir", f"--workdir={tmp_path}", "--dry_run")
  assert res.returncode == 0, res.stderr[-3000:]
  lines = res.stdout.strip().splitlines()
  assert len(lines) == 4
  argv = [shlex.split(line) for line in lines]
  assert [a[:2] for a in argv] == [["idgbr", "train"]] * 4
  assert argv[1] == ["idgbr", "train", f"--config={S1}:runlocal,variant=tiny",
                     f"--workdir={tmp_path}/variant=tiny,seed=1", "--config.seed=1",
                     "--config.data.data_dir=/data dir"]
  assert not os.listdir(tmp_path)  # nothing trained, nothing written
  # Unquoted in bash: the shell expands the brace into two --config flags; the sweep joins them.
  unquoted = subprocess.run(
      ["bash", "-c", f"{shlex.quote(sys.executable)} -m idgbr_jax.cli sweep "
       f"--config={shlex.quote(S1)}:runlocal,variant={{tiny,small}} --set seed=0,1 "
       f"--set 'data.data_dir=/data dir' --workdir={shlex.quote(str(tmp_path))} --dry_run"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert unquoted.returncode == 0, unquoted.stderr[-3000:]
  assert unquoted.stdout == res.stdout
  res = _cli("sweep", f"--config={S1}:runlocal", "--set", "optim.lrr=1,2",
             f"--workdir={tmp_path}", "--dry_run")
  assert res.returncode == 1 and "error: --set optim.lrr: the config" in res.stderr
  assert "Traceback" not in res.stderr


# ----- a real sweep -------------------------------------------------------------------------------
def _tiny_sets(data_dir):
  # tests/test_stage1.py's tiny config, as overrides.
  return ["--set", f"data.data_dir={data_dir}", "--set", "data.image_size=32",
          "--set", "data.num_train=16", "--set", "data.num_test=8", "--set", "batch_size=8",
          "--set", "eval_batch_size=8", "--set", "num_train_steps=2",
          "--set", "eval_every_steps=0", "--set", "checkpoint_every_steps=100",
          "--set", "log_every_steps=1", "--set", "optim.warmup_steps=1",
          "--set", "num_eval_panels=2"]


@pytest.mark.slow
def test_two_run_sweep_writes_the_table_of_its_runs_and_resumes(tmp_path, monkeypatch):
  workdir = tmp_path / "sweep"
  args = ["sweep", f"--config={S1}:runlocal,task=binary_roads", "--set", "seed=0,1",
          *_tiny_sets(tmp_path / "tfds"), f"--workdir={workdir}"]
  res = _cli(*args)
  assert res.returncode == 0, res.stderr[-4000:]
  names = ["seed=0", "seed=1"]
  assert "[2/2] seed=1" in res.stdout and "| seed | " in res.stdout
  assert "sweep" in res.stderr and "2/2" in res.stderr  # progress (runs done / total, ETA)
  reports = {n: json.loads((workdir / n / sweep.FINAL_EVAL).read_text()) for n in names}
  assert all(r["step"] == 2 and 0 <= r["miou"] <= 1 for r in reports.values())
  assert reports["seed=0"]["miou"] != reports["seed=1"]["miou"]  # two different runs
  # One row per run: its varying value, then every number of its own final evaluation.
  with open(workdir / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["seed"] for r in rows] == ["0", "1"]
  for name, row in zip(names, rows):
    expected = sweep.numeric_entries(reports[name])
    assert set(row) == {"seed"} | set(expected)
    for k, v in expected.items():
      assert float(row[k]) == v, (name, k)
  md = (workdir / "sweep.md").read_text().splitlines()
  assert md[0].startswith("| seed | step | ") and len(md) == 4
  assert md[3].startswith("| 1 | 2 | ")
  # Panels of the in-training evaluation, on process 0 (here the only one).
  assert len(os.listdir(workdir / "seed=0" / "panels" / "step_2")) == 2

  # Resumption: done runs are skipped (no process started, no file touched) ...
  mtimes = {n: os.path.getmtime(workdir / n / sweep.FINAL_EVAL) for n in names}
  launched = []
  monkeypatch.setattr(sweep, "launch", lambda run: launched.append(run.name) or 0)
  runs = sweep.expand(args[1].partition("=")[2], [a for a in args[2:-1] if a != "--set"],
                      str(workdir))
  assert sweep.run_all(runs, say=lambda _: None) and launched == []
  # ... and a run without its final evaluation is the one trained again.
  os.remove(workdir / "seed=1" / sweep.FINAL_EVAL)

  def fake_launch(run):
    launched.append(run.name)
    (workdir / run.name / sweep.FINAL_EVAL).write_text(json.dumps({"step": 2, "miou": 0.5}))
    return 0
  monkeypatch.setattr(sweep, "launch", fake_launch)
  assert sweep.run_all(runs, say=lambda _: None) and launched == ["seed=1"]
  assert os.path.getmtime(workdir / "seed=0" / sweep.FINAL_EVAL) == mtimes["seed=0"]
  # --table_only rewrites the tables from the reports as they are now.
  res = _cli("sweep", *args[1:], "--table_only")
  assert res.returncode == 0, res.stderr[-3000:]
  with open(workdir / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert float(rows[1]["miou"]) == 0.5 and rows[1]["mf1"] == ""


def test_a_run_that_stops_early_stops_the_sweep_and_a_failure_names_it(tmp_path):
  runs = sweep.expand(f"{S1}:runlocal", ["seed=0,1"], str(tmp_path))
  assert not sweep.run_all(runs, say=lambda _: None, launcher=lambda run: 0)  # "preempted"
  with pytest.raises(sweep.RunFailed, match="run seed=0 failed"):
    sweep.run_all(runs, say=lambda _: None, launcher=lambda run: 3)


def test_final_eval_file_name_is_the_trainers():
  from idgbr_jax.train import common  # pylint: disable=import-outside-toplevel
  assert common.FINAL_EVAL_FILE == sweep.FINAL_EVAL


def test_evaluate_reports_progress_with_the_shared_reporter(tmp_path, capsys, monkeypatch):
  # `idgbr evaluate`'s loop counts maps through idgbr_jax.progress (ETA, process 0 only).
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from idgbr_jax import metrics  # pylint: disable=import-outside-toplevel
  for folder in ("pred", "label"):
    os.makedirs(tmp_path / folder)
    for i in range(3):
      Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / folder / f"m{i}.png")
  monkeypatch.setenv("IDGBR_PROGRESS_INTERVAL", "0")
  metrics.evaluate_dirs(str(tmp_path / "pred"), str(tmp_path / "label"), 2)
  err = capsys.readouterr().err
  assert "evaluate" in err and "3/3" in err and "map" in err
  monkeypatch.setenv("IDGBR_PROGRESS", "0")
  metrics.evaluate_dirs(str(tmp_path / "pred"), str(tmp_path / "label"), 2)
  assert "evaluate" not in capsys.readouterr().err


def test_table_flattens_stage2_reports_and_leaves_out_unfinished_runs(tmp_path):
  runs = sweep.expand(f"{S2}:ablation={{full,no_rough}}", ["seed=0,1"], str(tmp_path))
  reports = {
      "ablation=full,seed=0": {"step": 9, "refined": {"wf_min": 0.5, "per_class_iou": [0.1, 0.2],
                                                      "repair": {"iou_imp": -0.25, "class": 1}},
                               "coarse": {"wf_min": 0.25, "name": "x", "ok": True}},
      "ablation=no_rough,seed=1": {"step": 9, "refined": {"wf_min": 0.75}, "extra": 3},
  }
  for name, report in reports.items():
    os.makedirs(tmp_path / name)
    (tmp_path / name / sweep.FINAL_EVAL).write_text(json.dumps(report))
  csv_path, md_path, missing = sweep.write_tables(runs, str(tmp_path))
  assert [r.name for r in missing] == ["ablation=full,seed=1", "ablation=no_rough,seed=0"]
  with open(csv_path) as f:
    rows = list(csv.reader(f))
  # Numbers only (lists, strings and bools left out), nested keys joined with '/'.
  assert rows == [
      ["ablation", "seed", "step", "refined/wf_min", "refined/repair/iou_imp",
       "refined/repair/class", "coarse/wf_min", "extra"],
      ["full", "0", "9", "0.5", "-0.25", "1", "0.25", ""],
      ["no_rough", "1", "9", "0.75", "", "", "", "3"]]
  md = open(md_path).read().splitlines()
  assert md[2] == "| full | 0 | 9 | 0.5000 | -0.2500 | 1 | 0.2500 |  |"
