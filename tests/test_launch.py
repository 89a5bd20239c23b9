"""The pod recipe's scripts, run for real with stand-ins for what a CPU box lacks: a fake
`gcloud` that records its calls, and `IDGBR_DRY_RUN=1` for the venv install."""
import configparser
import os
import re
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _fake_gcloud(tmp_path):
  log = tmp_path / "gcloud.log"
  script = tmp_path / "gcloud"
  script.write_text("#!/usr/bin/env bash\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done >> "
                    f"{shlex.quote(str(log))}\nprintf '\\n' >> {shlex.quote(str(log))}\n")
  script.chmod(0o755)
  return script, log


def _calls(log):
  return [line.rstrip("\0").split("\0") for line in log.read_text().splitlines() if line]


def _pod(tmp_path, *args):
  gcloud, log = _fake_gcloud(tmp_path)
  env = dict(os.environ, TPU_NAME="my-v5e-16", ZONE="us-west4-a", GCLOUD=str(gcloud))
  res = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), *args], env=env,
                       capture_output=True, text=True, timeout=60, cwd=REPO)
  return res, (_calls(log) if log.exists() else [])


def test_tpu_pod_setup_copies_the_checkout_and_installs_tpu_on_every_worker(tmp_path):
  res, calls = _pod(tmp_path, "setup")
  assert res.returncode == 0, res.stderr
  scp, ssh = calls
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  tarball = scp[4]
  listed = subprocess.run(["tar", "-tzf", tarball], capture_output=True, text=True,
                          check=True).stdout.split()
  assert {"setup.cfg", "constraints.txt", "launch/setup_worker.sh", "idgbr_jax/cli.py"} <= set(
      listed)
  assert not any(n.startswith(".venv") for n in listed)
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5e-16"] and "--worker=all" in ssh
  command = ssh[ssh.index("--command") + 1]
  assert "launch/setup_worker.sh tpu" in command and "tar -xzf" in command


def test_tpu_pod_run_starts_the_same_command_everywhere_with_distributed_on(tmp_path):
  res, calls = _pod(tmp_path, "run", "train", "--config=configs/stage2_synthetic.py",
                    "--workdir=gs://bucket/runs/s2", "--config.optim.learning_rate=1e-4")
  assert res.returncode == 0, res.stderr
  [ssh] = calls
  command = ssh[ssh.index("--command") + 1]
  assert "--worker=all" in ssh
  words = shlex.split(command.split("&&", 1)[1])
  assert words == ["IDGBR_DISTRIBUTED=1", ".venv/bin/idgbr", "train",
                   "--config=configs/stage2_synthetic.py", "--workdir=gs://bucket/runs/s2",
                   "--config.optim.learning_rate=1e-4"]
  bad, _ = _pod(tmp_path, "launch")
  assert bad.returncode == 2 and "unknown action" in bad.stderr


@pytest.mark.parametrize("accel,target", [("tpu", ".[tpu]"), ("cuda12", ".[cuda12]"),
                                          ("cpu", ".")])
def test_setup_worker_installs_the_extra_from_the_pins(accel, target, tmp_path):
  env = dict(os.environ, IDGBR_DRY_RUN="1")
  res = subprocess.run(["bash", os.path.join(LAUNCH, "setup_worker.sh"), accel, REPO],
                       env=env, capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stderr
  pip = [line for line in res.stdout.splitlines() if " -e " in line]
  assert pip == [f"+ .venv/bin/pip install -q -c constraints.txt -e {target}"]


def test_setup_worker_refuses_unknown_accelerators():
  res = subprocess.run(["bash", os.path.join(LAUNCH, "setup_worker.sh"), "rocm", REPO],
                       capture_output=True, text=True, timeout=60)
  assert res.returncode == 2 and "unknown accelerator" in res.stderr


def test_accelerator_extras_pin_the_tested_jax():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  extras = {k: [l.strip() for l in v.strip().splitlines() if l.strip() and not
                l.strip().startswith("#")] for k, v in cfg["options.extras_require"].items()}
  with open(os.path.join(REPO, "constraints.txt")) as f:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", f.read(), re.M))
  assert extras["tpu"] == [f"jax[tpu]=={pins['jax']}"]
  assert extras["cuda12"] == [f"jax[cuda12]=={pins['jax']}"]
  assert pins["jax"] == pins["jaxlib"]
  with open(os.path.join(REPO, "Makefile")) as f:
    makefile = f.read()
  assert re.search(r"^install-tpu:", makefile, re.M) and "'.[tpu]'" in makefile
  assert re.search(r"^install-cuda:", makefile, re.M) and "'.[cuda12]'" in makefile


def test_slurm_sets_up_once_then_runs_everywhere_with_sigterm_before_the_limit(tmp_path):
  srun, log = _fake_gcloud(tmp_path)  # the same argument recorder, standing in for srun
  os.rename(srun, tmp_path / "srun")
  env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
             SLURM_SUBMIT_DIR=REPO)
  script = os.path.join(LAUNCH, "slurm_gpu.sbatch")
  res = subprocess.run(["bash", script, "train", "--config=configs/stage1_synthetic.py",
                        "--workdir=/scratch/runs/s1"], env=env, capture_output=True, text=True,
                       timeout=60)
  assert res.returncode == 0, res.stderr
  setup, run = _calls(log)
  assert setup == ["--nodes=1", "--ntasks=1", "bash", "launch/setup_worker.sh", "cuda12", REPO]
  assert run == ["--kill-on-bad-exit=1", "env", "IDGBR_DISTRIBUTED=1", ".venv/bin/idgbr",
                 "train", "--config=configs/stage1_synthetic.py", "--workdir=/scratch/runs/s1"]
  with open(script) as f:
    assert "#SBATCH --signal=TERM@120" in f.read()  # the trainer's preemption save
