"""Peak memory per chip of sd15 Stage II under each memory lever, from `idgbr plan`.

  python bench/plan_levers.py [--topologies=v5e:2x4,v4:2x2x1] [--only=NAME,...] \
      [--limit_gib=12] [--out=plan_levers.json]

Each row is one `idgbr plan` run in its own process under `bench/watchdog.py` (a compile of the
sd15 step takes minutes and several GiB of host memory; a row over `--limit_gib` is killed and
reported as such), for `configs/idgbr_package_stage2.py` at 512 px with SD-1.5's VAE
(`--parts=autoencoder=sd15`). Needs libtpu (`pip install -c constraints.txt -e '.[tpu]'`, or
TPU_LIBRARY_PATH). Prints a table of peak GiB per chip and whether it fits; results accumulate
in `--out` (rows already there are not compiled again).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/idgbr_package_stage2.py"
BF16 = ["--config.model.dtype=bfloat16"]
REMAT = ["--config.model.remat=True"]
FROZEN16 = ["--config.model.frozen_dtype=bfloat16"]
CHUNKED = ["--config.model.attention=chunked"]
SPLIT = ["--config.split_step=True"]

# name -> (program, mesh, batch per chip, extra flags); the mesh names sizes for 8 devices and
# is scaled to the topology's device count.
ROWS = {
    "data8_f32_b1": ("stage2", "data=-1", 1, []),
    "data8_bf16_b1": ("stage2", "data=-1", 1, BF16),
    "data8_bf16_remat_b1": ("stage2", "data=-1", 1, BF16 + REMAT),
    "fsdp8_bf16_b1": ("stage2", "fsdp=-1", 1, BF16),
    "fsdp8_bf16_remat_b1": ("stage2", "fsdp=-1", 1, BF16 + REMAT),
    "fsdp8_bf16_remat_frozen16_b1": ("stage2", "fsdp=-1", 1, BF16 + REMAT + FROZEN16),
    "fsdp8_bf16_remat_frozen16_b2": ("stage2", "fsdp=-1", 2, BF16 + REMAT + FROZEN16),
    "mixed_bf16_remat_frozen16_b2": ("stage2", "data=2,fsdp=-1", 2, BF16 + REMAT + FROZEN16),
    "after_warmup_fsdp8_bf16_remat_frozen16_b1": ("stage2_after_warmup", "fsdp=-1", 1,
                                                  BF16 + REMAT + FROZEN16),
    "after_warmup_fsdp8_bf16_remat_frozen16_b2": ("stage2_after_warmup", "fsdp=-1", 2,
                                                  BF16 + REMAT + FROZEN16),
    "after_warmup_fsdp8_bf16_b2": ("stage2_after_warmup", "fsdp=-1", 2, BF16),
    "after_warmup_fsdp8_bf16_remat_frozen16_chunked_b2": ("stage2_after_warmup", "fsdp=-1", 2,
                                                          BF16 + REMAT + FROZEN16 + CHUNKED),
    # The sd15 configs' split step (README "Planning": both fit v5e-8 at 18.4 GiB of host).
    "split_fsdp8_bf16_frozen16_b2": ("stage2", "fsdp=-1", 2, BF16 + FROZEN16 + SPLIT),
    "after_warmup_split_fsdp8_bf16_frozen16_b2": ("stage2_after_warmup", "fsdp=-1", 2,
                                                  BF16 + FROZEN16 + SPLIT),
    "after_warmup_split_fsdp8_bf16_remat_frozen16_b2": ("stage2_after_warmup", "fsdp=-1", 2,
                                                        BF16 + REMAT + FROZEN16 + SPLIT),
    "refine_data8_b8": ("refine", "data=-1", 8, []),
    "refine_data8_b8_chunked": ("refine", "data=-1", 8, CHUNKED),
}


def run_row(topology: str, name: str, limit_gib: float) -> dict:
  program, mesh, batch, extra = ROWS[name]
  if "stage2" in program and SPLIT[0] not in extra:
    extra = extra + ["--config.split_step=False"]  # a row without SPLIT is the one program
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "plan.json")
    command = [sys.executable, os.path.join(REPO, "bench", "watchdog.py"),
               f"--limit_gib={limit_gib}", "--", sys.executable, "-m", "idgbr_jax.cli", "plan",
               f"--config={CONFIG}", f"--topology={topology}", f"--mesh={mesh}",
               f"--batch_per_chip={batch}", f"--programs={program}",
               "--parts=autoencoder=sd15", f"--output={out}", *extra]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    watchdog = [line for line in proc.stderr.splitlines() if line.startswith("watchdog:")]
    row = {"name": name, "topology": topology, "program": program, "mesh": mesh,
           "batch_per_chip": batch, "flags": extra, "watchdog": watchdog[-1] if watchdog else ""}
    if proc.returncode == 0 and os.path.exists(out):
      with open(out) as f:
        row["record"] = json.load(f)[0]
    else:
      row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return row


def table(rows: list[dict]) -> str:
  lines = ["| topology | row | program | mesh | img/chip | peak GiB/chip | fits | TFLOP/chip/step "
           "| host compile |", "|---|---|---|---|---:|---:|---|---:|---|"]
  for r in rows:
    rec = r.get("record")
    if rec:
      mesh = ",".join(f"{a}={s}" for a, s in rec["mesh"].items() if s != 1)
      peak = f"{rec['peak_bytes_per_chip'] / 2**30:.2f}"
      fits = "yes" if rec["fits"] else "**no**"
      flops = f"{rec['flops_per_chip'] / 1e12:.2f}"
    else:
      mesh, peak, fits, flops = r["mesh"], "-", "not compiled", "-"
    host = r["watchdog"].replace("watchdog: ", "")
    lines.append(f"| {r['topology']} | {r['name']} | {r['program']} | {mesh} | "
                 f"{r['batch_per_chip']} | {peak} | {fits} | {flops} | {host} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topologies", default="v5e:2x4,v4:2x2x1")
  parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
  parser.add_argument("--limit_gib", type=float, default=12.0)
  parser.add_argument("--out", default="plan_levers.json")
  args = parser.parse_args()
  names = [n for n in args.only.split(",") if n] or list(ROWS)
  unknown = sorted(set(names) - set(ROWS))
  if unknown:
    parser.error(f"unknown rows {unknown}; known: {sorted(ROWS)}")
  rows = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      rows = json.load(f)
  done = {(r["topology"], r["name"]) for r in rows if "record" in r}
  for topology in args.topologies.split(","):
    for name in names:
      if (topology, name) in done:
        continue
      print(f"{topology} {name} ...", file=sys.stderr, flush=True)
      row = run_row(topology, name, args.limit_gib)
      rows = [r for r in rows if (r["topology"], r["name"]) != (topology, name)] + [row]
      with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
      print(row.get("error") or row["watchdog"], file=sys.stderr, flush=True)
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
