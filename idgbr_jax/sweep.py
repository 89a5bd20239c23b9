"""Sweeps: the product of config alternatives, one `idgbr train` run each, and one table.

  idgbr sweep --config=configs/stage2_synthetic.py:ablation={full,no_rough,no_align,cubic} \
      --set seed=0,1,2 --workdir=DIR

Alternatives come from braces in the config argument (`key={a,b}`, the `:arg` of `get_config`)
and from comma lists in `--set key=v1,v2` (a config field, applied as `--config.key=value` would
be: same parsing, same type checks). Commas inside brackets or quotes belong to one value
(`--set key=(16,32),(32,64)` is two values). An unquoted brace that the shell expanded into
several `--config` flags is joined back (`join_shell_expanded`). Every combination is one run in
`DIR/<name>`, named by the values that vary (`ablation=no_rough,seed=1`), in the order the
axes were given. A run whose `final_eval.json` exists is done and skipped; an unfinished one
resumes from its checkpoints, as `idgbr train` does. `DIR/sweep.csv` and `DIR/sweep.md` hold
one row per finished run: the varying values, then every numeric entry of its final
evaluation (nested reports flattened with '/', e.g. `refined/wf_min`).

This module imports neither JAX nor the trainers: it expands, validates, launches commands and
writes tables; `idgbr_jax.commands.sweep` is the console entry.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import re
import shlex
import subprocess
import sys
from typing import Any, Callable, Iterable, Sequence

from idgbr_jax import paths, progress

# Written by the trainers (idgbr_jax.train.common.FINAL_EVAL_FILE; a test keeps them equal) at
# their last step's evaluation: its presence is what makes a run done.
FINAL_EVAL = "final_eval.json"
TABLE_CSV = "sweep.csv"
TABLE_MD = "sweep.md"

_OPEN, _CLOSE = "([{", ")]}"


class RunFailed(RuntimeError):
  """A run's `idgbr train` exited with an error (its own message is above on stderr)."""


def split_top_level(text: str, sep: str = ",") -> list[str]:
  """`text` split at `sep`, except inside (), [], {} or quotes."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in _OPEN:
      depth += 1
    elif ch in _CLOSE:
      depth -= 1
      if depth < 0:
        raise ValueError(f"unbalanced {ch!r} in {text!r}")
    elif ch == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth or quote:
    raise ValueError(f"unbalanced brackets or quotes in {text!r}")
  parts.append(text[start:])
  return parts


def _alternatives(value: str, where: str) -> list[str]:
  """`{a,b}` -> [a, b]; anything else is one value."""
  if value.startswith("{") and value.endswith("}"):
    alts = [a.strip() for a in split_top_level(value[1:-1])]
    if not alts or any(not a for a in alts):
      raise ValueError(f"{where}: empty alternative in {value!r}")
    return alts
  if "{" in value or "}" in value:
    raise ValueError(f"{where}: a brace must enclose the whole value, as key={{a,b}}; got "
                     f"{value!r}")
  return [value]


@dataclasses.dataclass(frozen=True)
class Axis:
  key: str
  values: tuple[str, ...]
  kind: str  # "arg" (the config file's `:arg`) or "set" (a config field)


@dataclasses.dataclass(frozen=True)
class Run:
  """One combination: its name, the values that vary, and its `idgbr train` flags."""
  name: str
  values: dict[str, str]            # varying key -> value, in axis order
  config: str                       # path:arg, braces resolved
  overrides: tuple[tuple[str, str], ...]  # (config field, value) from --set
  workdir: str

  def train_flags(self) -> list[str]:
    return ([f"--config={self.config}", f"--workdir={self.workdir}"] +
            [f"--config.{k}={v}" for k, v in self.overrides])

  def command(self, prefix: Sequence[str] = ("idgbr", "train")) -> str:
    """The run as one shell-quoted line (for a cluster's job script)."""
    return " ".join(shlex.quote(a) for a in [*prefix, *self.train_flags()])

  @property
  def final_eval(self) -> str:
    return paths.join(self.workdir, FINAL_EVAL)

  def done(self) -> bool:
    return paths.exists(self.final_eval)


def parse_config_arg(config: str) -> tuple[str, list[tuple[str, list[str] | None]], list[Axis]]:
  """'path:a={x,y},b=1,flag' -> (path, items, axes). items are (text, None) for fixed text and
  (key, alternatives) for a brace."""
  path, colon, arg = config.partition(":")
  if not path:
    raise ValueError(f"--config={config!r}: expected a config file, e.g. configs/x.py:a={{b,c}}")
  items: list[tuple[str, list[str] | None]] = []
  axes: list[Axis] = []
  for item in (split_top_level(arg) if colon and arg else []):
    item = item.strip()
    if "{" not in item and "}" not in item:
      items.append((item, None))
      continue
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or not key or "{" in key:
      raise ValueError(f"--config: a brace needs a config arg name, as name={{a,b}}; got "
                       f"{item!r}")
    alts = _alternatives(value.strip(), f"--config arg {key!r}")
    items.append((key, alts))
    axes.append(Axis(key, tuple(alts), "arg"))
  return path, items, axes


def join_shell_expanded(configs: Sequence[str]) -> str:
  """One config argument from several `--config` flags that a shell's brace expansion made
  (bash and zsh turn an unquoted `--config=x.py:a={p,q},b=1` into `--config=x.py:a=p,b=1
  --config=x.py:a=q,b=1`): the braces are put back when the arguments are exactly such a
  product; anything else is an error."""
  if len(configs) == 1:
    return configs[0]
  hint = (f"{len(configs)} --config flags that are not one brace expansion ({list(configs)}); "
          "give one --config and quote it, e.g. --config='configs/x.py:a={p,q}'")
  parsed = [c.partition(":") for c in configs]
  if len({path for path, _, _ in parsed}) != 1:
    raise ValueError(hint)
  items = [split_top_level(arg) if arg else [] for _, _, arg in parsed]
  if len({len(i) for i in items}) != 1:
    raise ValueError(hint)
  alts = [list(dict.fromkeys(column)) for column in zip(*items)]
  if [list(c) for c in itertools.product(*alts)] != items:
    raise ValueError(hint)
  parts = []
  for column in alts:
    keys = {a.partition("=")[0] for a in column}
    if len(column) == 1:
      parts.append(column[0])
    elif len(keys) == 1 and all("=" in a for a in column):
      parts.append(f"{keys.pop()}={{{','.join(a.partition('=')[2] for a in column)}}}")
    else:
      raise ValueError(hint)
  return f"{parsed[0][0]}:{','.join(parts)}"


def parse_set(spec: str) -> Axis:
  """'key=v1,v2' (or 'key={v1,v2}') -> Axis."""
  key, eq, values = spec.partition("=")
  key = key.strip()
  if key.startswith("config."):  # `--set config.seed=1` means the same as `--set seed=1`
    key = key[len("config."):]
  if not eq or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
    raise ValueError(f"--set {spec!r}: expected key=value[,value...] with a config field as the "
                     "key, e.g. --set seed=0,1,2 or --set optim.learning_rate=1e-3,3e-4")
  values = values.strip()
  alts = (_alternatives(values, f"--set {key}") if values.startswith("{")
          else [v.strip() for v in split_top_level(values)])
  if not alts or any(not v for v in alts):
    raise ValueError(f"--set {spec!r}: empty value")
  return Axis(key, tuple(alts), "set")


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]")


def run_name(values: dict[str, str]) -> str:
  """A folder name from the varying values: `ablation=no_rough,seed=1` (characters outside
  [A-Za-z0-9._=,+@-], e.g. '/' in a path, become '_'); "run" when nothing varies."""
  if not values:
    return "run"
  return _UNSAFE.sub("_", ",".join(f"{k}={v}" for k, v in values.items()))


def expand(config: str, sets: Iterable[str], workdir: str) -> list[Run]:
  """Every combination of the brace alternatives in `config` and the `--set` lists, the first
  axis varying slowest. Only syntax is checked here; `validate` loads each run's config."""
  path, items, arg_axes = parse_config_arg(config)
  set_axes = [parse_set(s) for s in sets]
  for kind, group in (("config arg", arg_axes), ("--set", set_axes)):
    keys = [a.key for a in group]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
      raise ValueError(f"{kind} {twice[0]!r} is given twice")
  axes = arg_axes + set_axes
  varying = [a for a in axes if len(a.values) > 1]
  # A config arg and a config field may share a name (`:seed=` and `--set seed=`): the arg's
  # column is then `arg.seed`.
  set_keys = {a.key for a in set_axes}
  labels = {id(a): f"arg.{a.key}" if a.kind == "arg" and a.key in set_keys else a.key
            for a in axes}
  runs = []
  for combo in itertools.product(*(a.values for a in axes)):
    chosen = {id(a): v for a, v in zip(axes, combo)}
    arg_parts = []
    for text, alts in items:
      if alts is None:
        arg_parts.append(text)
      else:
        axis = next(a for a in arg_axes if a.key == text)
        arg_parts.append(f"{text}={chosen[id(axis)]}")
    config_i = path + (":" + ",".join(arg_parts) if arg_parts else "")
    values = {labels[id(a)]: chosen[id(a)] for a in varying}
    name = run_name(values)
    runs.append(Run(name=name, values=values, config=config_i,
                    overrides=tuple((a.key, chosen[id(a)]) for a in set_axes),
                    workdir=paths.join(workdir, name)))
  names = [r.name for r in runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"runs {dupes} would share a folder (their values differ only in "
                     "characters a folder name cannot hold); give distinct values")
  return runs


def _last_error_line(message: str) -> str:
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  for line in reversed(lines):
    m = re.match(r"(?:\w+Error): (.*)", line)
    if m:
      return m.group(1)
  return lines[-1] if lines else message


def _parse_flags(argv: list[str]):
  """The ConfigDict `idgbr train` would get from these flags (a private flag set with the same
  `config_flags.DEFINE_config_file`, locked)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  argv = ["sweep", *argv]
  fv = flags.FlagValues()
  # sys_argv: config_flags reads the `--config.*` overrides from it (default: sys.argv).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv["config"].value


def _short(value: Any) -> str:
  text = " ".join(repr(value).split())
  kind = type(value).__name__
  return f"a value of type {kind}" if len(text) > 60 else f"{text} ({kind})"


def load_config(run: Run):
  """The run's ConfigDict, parsed exactly as `idgbr train` parses its flags; a bad value is a
  ValueError naming the `--set` key or the config arg."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections.config_flags import config_path  # pylint: disable=import-outside-toplevel
  try:
    base = _parse_flags([f"--config={run.config}"])
    base.get("stage")  # a file that failed to load raises only when the config is used
  except flags.Error as e:
    raise ValueError(f"--config={run.config} (run {run.name}): "
                     f"{_last_error_line(str(e))}") from None
  except OSError as e:
    raise ValueError(f"--config={run.config}: cannot load the config file "
                     f"({_last_error_line(str(e))})") from None
  for key, value in run.overrides:
    try:
      current = config_path.get_value(key, base)
    except (AttributeError, KeyError, IndexError, ValueError):
      raise ValueError(f"--set {key}: the config {run.config.partition(':')[0]} has no field "
                       f"{key!r} (configs are locked: a key must exist in the config "
                       "file)") from None
    try:
      _parse_flags([f"--config={run.config}", f"--config.{key}={value}"])
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(f"--set {key}={value}: {_last_error_line(str(e))} (the config has "
                       f"{_short(current)})") from None
  if not run.overrides:
    return base
  return _parse_flags([f"--config={run.config}"] +
                      [f"--config.{k}={v}" for k, v in run.overrides])


def validate(runs: Sequence[Run]) -> dict[str, Any]:
  """Loads every run's config before anything trains (a bad value in the last combination is
  an error now, not hours in). Returns {run name: config}."""
  configs = {}
  for run in runs:
    config = load_config(run)
    if int(config.get("eval_every_steps", 0)) < 0:
      raise ValueError(f"run {run.name}: config.eval_every_steps={config.eval_every_steps} "
                       "never evaluates, so the sweep would have nothing to compare; set it "
                       "to 0 (evaluate after the last step) or N > 0")
    configs[run.name] = config
  return configs


def launch(run: Run) -> int:
  """`idgbr train` for one run, as a child process (the same command `--dry_run` prints, with
  this Python). Returns its exit status. SIGTERM/SIGINT reach the child, which saves and exits
  (preemption): the sweep then stops, and the same command resumes it.

  A child process, not an in-process call of `commands.train.run`: the command is the one
  `--dry_run` prints for a cluster, byte for byte; each run starts with fresh memory and XLA
  state; a crash ends one run, not the sweep's record of the others; and `idgbr train`'s absl
  flags (`--config`, `--workdir`) do not clash with the sweep's own. The cost is JAX's start-up
  (seconds) per run, next to minutes of training."""
  import signal  # pylint: disable=import-outside-toplevel
  cmd = [sys.executable, "-m", "idgbr_jax.cli", "train", *run.train_flags()]
  child = subprocess.Popen(cmd)  # pylint: disable=consider-using-with
  # A scheduler may signal only the sweep's process: pass SIGTERM on (the child saves a
  # checkpoint and exits 0 without its final evaluation; run_all then stops).
  old = signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
  try:
    return child.wait()
  finally:
    signal.signal(signal.SIGTERM, old)


def run_all(runs: Sequence[Run], say: Callable[[str], None] = print,
            launcher: Callable[[Run], int] | None = None) -> bool:
  """Trains the runs that are not done, one after another. Returns True when every run is
  done; False when one stopped before its final evaluation (a preemption: rerun to resume).
  A failing run raises RunFailed (the runs before it stay done)."""
  launcher = launcher or launch
  todo = [r for r in runs if not r.done()]
  for r in runs:
    if r.done():
      say(f"{r.name}: done ({FINAL_EVAL} exists), skipped")
  with progress.Progress(len(todo), "sweep", unit="run") as bar:
    for i, r in enumerate(todo):
      say(f"[{i + 1}/{len(todo)}] {r.name}: {r.command()}")
      rc = launcher(r)
      if rc != 0:
        raise RunFailed(f"run {r.name} failed (exit status {rc}; its error is above). The runs "
                        f"before it are kept; fix it and run the same sweep again to resume "
                        f"(workdir {r.workdir})")
      if not r.done():
        say(f"{r.name} stopped before its final evaluation ({r.final_eval} is missing), "
            "e.g. preempted: run the same sweep command again to resume it")
        return False
      bar.update(1)
  return True


# ----- the comparison table ----------------------------------------------------------------------
def numeric_entries(report: dict, prefix: str = "") -> dict[str, float | int]:
  """The numbers of a report, nested dicts flattened with '/' (lists, strings, bools and None
  are left out)."""
  out: dict[str, float | int] = {}
  for k, v in report.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(numeric_entries(v, key + "/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[key] = v
  return out


def table(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]], list[Run]]:
  """(columns, rows, runs without a final evaluation). Columns: the varying keys, then every
  metric in the order the reports first give it."""
  rows, missing = [], []
  value_cols: list[str] = []
  metric_cols: list[str] = []
  for r in runs:
    for k in r.values:
      if k not in value_cols:
        value_cols.append(k)
    if not r.done():
      missing.append(r)
      continue
    metrics = numeric_entries(paths.read_json(r.final_eval))
    for k in metrics:
      if k not in metric_cols and k not in value_cols:
        metric_cols.append(k)
    rows.append({**metrics, **r.values})
  return value_cols + metric_cols, rows, missing


def to_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(columns)
  for row in rows:
    w.writerow(["" if row.get(c) is None else row[c] for c in columns])
  return buf.getvalue()


def _md_cell(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4f}"
  return str(v).replace("|", "\\|")


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write_tables(runs: Sequence[Run], workdir: str) -> tuple[str, str, list[Run]]:
  """Writes `workdir/sweep.csv` and `workdir/sweep.md`. Returns their paths and the runs left
  out (no final evaluation yet)."""
  columns, rows, missing = table(runs)
  csv_path, md_path = paths.join(workdir, TABLE_CSV), paths.join(workdir, TABLE_MD)
  paths.write_bytes(csv_path, to_csv(columns, rows).encode())
  paths.write_bytes(md_path, to_markdown(columns, rows).encode())
  return csv_path, md_path, missing
