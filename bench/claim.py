"""The paper's claim at small scale: Stage II refines the coarse maps of three segmenters.

  python bench/claim.py [--workdir=workdir/claim] [--backbones=unet,deeplabv3plus,segformer]
      [--variants=full,no_rough,no_align,cubic] [--output=claim.json] [--markdown=claim.md]
      [--config_arg=...] [--set=stage2.num_train_steps=3000 ...]

On the demo's data (synthetic_rs/binary_roads, 64 px, 256 train / 64 test) with the demo's
faithful settings (`configs/demo.py`: refinement from pure noise, strength 1, DDIM with
Control-CFG), for each Stage I backbone (UNet-small, DeepLabv3+ ResNet-18, SegFormer-B0, each
trained from scratch) and each Stage II variant (the original's ablations, `ablation=` of
`configs/stage2_synthetic.py`):

  full      the method
  no_rough  no coarse-map condition (`diffusion.use_coarse=False`)
  no_align  no REPA alignment (`repa.enabled=False`)
  cubic     the cubic timestep sampling (`diffusion.timestep_strategy=cubic`)

it runs the demo's pipeline (`idgbr_jax.commands.demo.run`) and tabulates coarse vs refined:
WF min (the paper's WF_m), WF mean, mIoU, boundary F, mBA and IoU_imp (the original README's
repair analysis of class 1), with the no-diffusion control (coarse maps through the
autoencoder only) per backbone.

Shared between runs: the dataset, the label embedding and the autoencoder (`<workdir>/`); per
backbone: Stage I and its coarse maps (`<workdir>/<backbone>/`); per variant: Stage II, its
maps and `report.json` (`<workdir>/<backbone>/<variant>/`). Resumable: a run whose report
exists is read, not redone; a stopped run resumes from its last checkpoint. A workdir holds
one setting (`--config_arg` and `--set`, recorded in `<workdir>/claim_args.json`): other
settings need another workdir. ~1 h on 2 CPU cores at the demo's settings (12 Stage II
runs of 1500 steps; README "The paper's claim at small scale" has a measured run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from idgbr_jax import xla_flags  # noqa: E402  (does not import jax)

xla_flags.apply_defaults()  # the `idgbr` command's XLA settings, before JAX starts

BACKBONES = ("unet", "deeplabv3plus", "segformer")
VARIANTS = ("full", "no_rough", "no_align", "cubic")
# (title, report key, how to show it): the table's columns, each coarse -> refined.
METRICS = (("WF_m", "wf_min"), ("WF mean", "wf_mean"), ("mIoU", "miou"), ("BF", "bf"),
           ("mBA", "mba"))


def run_dirs(workdir: str, backbone: str, variant: str):
  """The demo's folders for one (backbone, variant) run, sharing what does not depend on it."""
  from idgbr_jax.commands import demo  # pylint: disable=import-outside-toplevel
  b = os.path.join(workdir, backbone)
  v = os.path.join(b, variant)
  return demo.DemoDirs.under(
      v, data=os.path.join(workdir, "tensorflow_datasets"),
      label_embed=os.path.join(workdir, "label_embed"),
      autoencoder=os.path.join(workdir, "autoencoder"),
      stage1=os.path.join(b, "stage1"), coarse=os.path.join(b, "coarse"),
      labels=os.path.join(b, "labels"), autoencoded=os.path.join(b, "autoencoded"))


def _typed(config, key: str, text: str):
  """`text` as the type of the config's value at dotted `key` (an unknown key is an error)."""
  node = config
  *parents, leaf = key.split(".")
  for name in parents:
    if name not in node:
      raise ValueError(f"--set {key}={text}: the demo config has no key {key!r}")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"--set {key}={text}: the demo config has no key {key!r}")
  old = node[leaf]
  if isinstance(old, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"--set {key}={text}: expected true or false")
    return text.lower() in ("true", "1")
  try:
    return type(old)(text) if isinstance(old, (int, float, str)) else text
  except ValueError as e:
    raise ValueError(f"--set {key}={text}: {e} (the config has {old!r})") from e


def run_config(backbone: str, variant: str, extra_arg: str = "", sets=()):
  """The demo config of one run; `sets`: ("stage2.num_train_steps", "3000") pairs on top."""
  from idgbr_configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  arg = f"backbone={backbone},ablation={variant}" + (f",{extra_arg}" if extra_arg else "")
  config = demo_config.get_config(arg)
  for key, text in sets:
    value = _typed(config, key, text)
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def run_one(workdir: str, backbone: str, variant: str, extra_arg: str = "", sets=()) -> dict:
  """One run's report: read when it exists, else the demo pipeline runs (resuming)."""
  from idgbr_jax.commands import demo  # pylint: disable=import-outside-toplevel
  dirs = run_dirs(workdir, backbone, variant)
  if os.path.exists(dirs.report):
    with open(dirs.report) as f:
      return json.load(f)
  t0 = time.time()

  def say(msg):
    print(f"[claim {backbone}/{variant} {time.time() - t0:5.0f}s] {msg}", flush=True)
  return demo.run(run_config(backbone, variant, extra_arg, sets), dirs, say=say, panels=False)


def check_workdir_settings(workdir: str, extra_arg: str, sets) -> None:
  """A workdir holds runs of one setting: its first invocation records `--config_arg` and
  `--set` in `<workdir>/claim_args.json`; another setting is an error (nothing is changed),
  so resumed and read runs never mix settings."""
  path = os.path.join(workdir, "claim_args.json")
  mine = {"config_arg": extra_arg, "set": sorted(f"{k}={v}" for k, v in sets)}
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    if theirs != mine:
      raise ValueError(f"{workdir} holds runs made with {theirs} ({path}), not {mine}: give "
                       "another --workdir for these settings (nothing was changed)")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(mine, f)


def summarize(reports: dict[str, dict[str, dict]]) -> dict:
  """{backbone: {variant: report}} -> the table's numbers: per backbone the coarse maps and the
  control, per variant the refined maps and IoU_imp."""
  out = {}
  for backbone, runs in reports.items():
    first = next(iter(runs.values()))
    row = {"coarse": {k: first["coarse"][k] for _, k in METRICS},
           "autoencoded": {k: first["coarse_autoencoded"][k] for _, k in METRICS},
           "variants": {}}
    for variant, rep in runs.items():
      if any(abs(rep["coarse"][k] - row["coarse"][k]) > 1e-12 for _, k in METRICS):
        raise ValueError(f"{backbone}/{variant}: its coarse maps differ from the other "
                         "variants' (the runs must share <workdir>/<backbone>/coarse)")
      refined = {k: rep["refined"][k] for _, k in METRICS}
      refined["iou_imp"] = rep["refined"]["repair"]["iou_imp"]
      refined["stage2_steps"] = rep["settings"]["stage2_steps"]
      row["variants"][variant] = refined
    out[backbone] = row
  return out


def markdown(summary: dict) -> str:
  """One line per (backbone, variant): coarse -> refined per metric, with the sign of the
  change; the control (autoencoder only) in the line `AE only`."""
  head = "| backbone | Stage II | " + " | ".join(t for t, _ in METRICS) + " | IoU_imp |"
  rule = "|---|---|" + "---:|" * (len(METRICS) + 1)
  lines = [head, rule]
  fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
  for backbone, row in summary.items():
    c, a = row["coarse"], row["autoencoded"]
    lines.append(f"| {backbone} | coarse | " + " | ".join(fmt(c[k]) for _, k in METRICS)
                 + " | |")
    lines.append(f"| {backbone} | AE only | " + " | ".join(fmt(a[k]) for _, k in METRICS)
                 + " | |")
    for variant, r in row["variants"].items():
      cells = []
      for _, k in METRICS:
        if r[k] is None or c[k] is None:
          cells.append(fmt(r[k]))
        else:
          cells.append(f"{r[k]:.4f} ({r[k] - c[k]:+.4f})")
      lines.append(f"| {backbone} | {variant} | " + " | ".join(cells)
                   + f" | {fmt(r['iou_imp'])} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdir/claim")
  parser.add_argument("--backbones", default=",".join(BACKBONES))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--config_arg", default="",
                      help="more `configs/demo.py` args, e.g. runlocal (a smoke-test size)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a demo config value for every run, e.g. "
                           "stage2.num_train_steps=3000 (repeatable)")
  parser.add_argument("--output", default="", help="JSON (default <workdir>/claim.json)")
  parser.add_argument("--markdown", default="", help="also write the table to this file")
  args = parser.parse_args()
  backbones = [b for b in args.backbones.split(",") if b]
  variants = [v for v in args.variants.split(",") if v]
  for b in backbones:
    if b not in BACKBONES:
      parser.error(f"--backbones: unknown {b!r}; allowed: {', '.join(BACKBONES)}")
  for v in variants:
    if v not in VARIANTS:
      parser.error(f"--variants: unknown {v!r}; allowed: {', '.join(VARIANTS)}")
  sets = []
  for item in args.set:
    key, eq, value = item.partition("=")
    if not eq or not key:
      parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. stage2.num_train_steps=3000")
    sets.append((key.strip(), value.strip()))
  try:
    for b in backbones:
      run_config(b, variants[0], args.config_arg, sets)  # bad keys / values before any work
    check_workdir_settings(args.workdir, args.config_arg, sets)
  except ValueError as e:
    parser.error(str(e))
  from absl import flags  # pylint: disable=import-outside-toplevel
  from idgbr_jax.commands import _runtime  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()  # the commands' absl flags (multi-host ones) at their defaults
  _runtime.setup()
  t0 = time.time()
  reports = {b: {v: run_one(args.workdir, b, v, args.config_arg, sets) for v in variants}
             for b in backbones}
  summary = summarize(reports)
  table = markdown(summary)
  result = {"command": "python bench/claim.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "seconds_this_invocation": round(time.time() - t0, 1),
            "settings": next(iter(next(iter(reports.values())).values()))["settings"],
            "summary": summary}
  output = args.output or os.path.join(args.workdir, "claim.json")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")
  print(table)
  print(f"-> {output}")


if __name__ == "__main__":
  main()
