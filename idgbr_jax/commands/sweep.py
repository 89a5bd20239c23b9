"""idgbr sweep --config=configs/<experiment>.py:key={a,b}[,...] [--set field=v1,v2 ...]
           --workdir=DIR [--dry_run | --table_only]

Runs the product of the alternatives (braces in the config argument, comma lists in each
`--set`) one after another, each as `idgbr train` in `DIR/<name>` (`name` from the values that
vary, e.g. `ablation=no_rough,seed=1`), then writes `DIR/sweep.csv` and `DIR/sweep.md`: one row
per run, its varying values and every number of its final evaluation. Rerunning the same
command skips finished runs and resumes an unfinished one from its checkpoints. `--dry_run`
prints the runs' `idgbr train` commands (one shell-quoted line each, for a cluster's job array)
and trains nothing; `--table_only` only rewrites the tables from the runs finished so far.
Every run's config is loaded and checked before the first one trains.
"""
import sys
import time

from absl import flags

# A list: bash and zsh expand an unquoted brace into one --config per alternative, which the
# sweep joins back (sweep.join_shell_expanded).
_CONFIG = flags.DEFINE_multi_string(
    "config", None, "Config file and argument; braces give alternatives, e.g. "
    "configs/stage2_synthetic.py:ablation={full,no_rough,no_align,cubic}.")
_SET = flags.DEFINE_multi_string(
    "set", [], "A config field and its values, e.g. seed=0,1,2 (repeatable; one value is a "
    "fixed override, as --config.key=value in idgbr train).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder holding one workdir per run and the "
                               "tables.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the per-run idgbr train commands only.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Only write sweep.csv / sweep.md from the "
                                "finished runs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]} (give each --set its own flag, e.g. "
                     "--set seed=0,1 --set optim.learning_rate=1e-3,3e-4; a brace in a --set "
                     "value is expanded by the shell unless quoted: --set 'seed={0,1}')")
  if _DRY_RUN.value and _TABLE_ONLY.value:
    raise ValueError("--dry_run and --table_only exclude each other")
  from idgbr_jax import paths, sweep  # pylint: disable=import-outside-toplevel
  workdir = str(paths.resolve(_WORKDIR.value))
  runs = sweep.expand(sweep.join_shell_expanded(_CONFIG.value), _SET.value, workdir)
  if _DRY_RUN.value:
    sweep.validate(runs)
    for run in runs:
      print(run.command(), flush=True)
    return 0
  if not _TABLE_ONLY.value:
    sweep.validate(runs)
    paths.ensure_writable_dir(workdir, "sweep workdir")
    t0 = time.time()
    say = lambda msg: print(f"[sweep {time.time() - t0:5.0f}s] {msg}", flush=True)  # noqa: E731
    say(f"{len(runs)} runs in {workdir}")
    try:
      finished = sweep.run_all(runs, say)
    except sweep.RunFailed as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      finished = False
      status = 1
    else:
      status = 0
  else:
    finished, status = True, 0
  csv_path, md_path, missing = sweep.write_tables(runs, workdir)
  if missing:
    print(f"{len(missing)} of {len(runs)} runs have no final evaluation yet, left out of the "
          f"table: {', '.join(r.name for r in missing)}", flush=True)
  print(f"table of {len(runs) - len(missing)} runs -> {csv_path}, {md_path}", flush=True)
  if finished and not missing:
    print(paths.read_bytes(md_path).decode(), flush=True)
  return status
