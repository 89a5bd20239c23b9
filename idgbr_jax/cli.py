"""`idgbr` console script: `idgbr <command> [--flags]`.

Each command is a module under `idgbr_jax.commands` that defines its own absl flags and a
`main(argv)`; only the chosen module is imported, so commands never clash over flag names.

Every command runs inside one error boundary (`guarded`, `parse_flags`): a bad input (a data,
config, checkpoint or weight-file error, a path that cannot be read or written, a full disk)
prints `error: <message>` on stderr and exits with status 1, without a Python traceback; the
message names the file, key or value and says what was expected. Anything else is a bug and
keeps its traceback. `IDGBR_TRACEBACK=1` shows the traceback of user errors too. This module
imports nothing heavy (the dataset builders' shell entry uses the same boundary).
"""
from __future__ import annotations

import errno
import functools
import importlib
import os
import re
import sys
from typing import Any, Callable

COMMANDS = {
    "train": ("idgbr_jax.commands.train", "train a Stage I segmenter or a Stage II refiner"),
    "predict": ("idgbr_jax.commands.predict", "Stage I coarse maps of splits or any-size images"),
    "evaluate": ("idgbr_jax.commands.evaluate", "region + boundary metrics of maps against labels"),
    "refine": ("idgbr_jax.commands.refine", "refine coarse maps with a trained Stage II model"),
    "demo": ("idgbr_jax.commands.demo", "the whole method on the embedded synthetic dataset"),
    "sweep": ("idgbr_jax.commands.sweep", "train the product of config alternatives, tabulate"),
    "convert": ("idgbr_jax.commands.convert", "import diffusers / DINOv2 / IDGBR / CLIP weights"),
    "export": ("idgbr_jax.commands.export", "write weights as diffusers or original IDGBR files"),
    "plan": ("idgbr_jax.commands.plan", "memory and FLOPs per chip of a config, compiled for a TPU"),
}

# ----- the error boundary ----------------------------------------------------------------------
# The project's error types whose messages are written for the user (matched by name and
# package, so the boundary imports none of their modules).
USER_ERRORS = frozenset({
    "DataError",            # idgbr_jax.data.sources: a dataset record, label or coarse map
    "CheckpointError",      # idgbr_jax.checkpoints: missing / half-written / mismatched / disk full
    "ConversionError",      # idgbr_jax.convert.files: a weight file or folder
    "WorkdirError",         # idgbr_jax.train.common: the workdir cannot be written
    "NonFiniteError",       # idgbr_jax.train.common: NaN/inf loss or gradient (config.nan_policy)
    "ManualDataError",      # idgbr_datasets._common: a dataset build's manual_dir
})
PROJECT_PACKAGES = ("idgbr_jax", "idgbr_configs", "idgbr_datasets")
# OS errors that are about the machine or the user's paths, not the code.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                 errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                                 errno.EEXIST})


def _project_roots() -> tuple[str, ...]:
  import importlib.util  # pylint: disable=import-outside-toplevel
  roots = []
  for name in PROJECT_PACKAGES:
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
      roots.append(os.path.realpath(location) + os.sep)
  return tuple(roots)


def _raised_by_project(e: BaseException) -> bool:
  """True when `e` comes from a `raise` statement in the project's own code (a deliberate check,
  whose message was written for the user), not from a library, the interpreter or an implicit
  error in our code (`a, b = xs`, `int(s)`: bugs, which keep their traceback)."""
  import linecache  # pylint: disable=import-outside-toplevel
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = tb.tb_frame.f_code.co_filename
  if not os.path.realpath(filename).startswith(_project_roots()):
    return False
  return linecache.getline(filename, tb.tb_lineno).strip().startswith("raise")


def _os_error_message(e: OSError) -> str:
  what = e.strerror or str(e)
  names = [n for n in (e.filename, e.filename2) if n and str(n) not in what]
  message = f"{what}: {' -> '.join(map(str, names))}" if names else what
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    message += " (the disk is full: free space, then run the same command again)"
  return message


def user_error_message(e: BaseException) -> str | None:
  """What to print for a user-facing error, or None for a bug (which keeps its traceback).

  User-facing: the project's error types above; a ValueError / OSError raised by a `raise` of
  the project's own checks; an OS error about a path or the disk (full, read-only, missing,
  not a directory, permission denied), wherever it was raised; a config file that cannot be
  loaded.
  """
  for cls in type(e).__mro__:
    if cls.__name__ in USER_ERRORS and cls.__module__.split(".")[0] in PROJECT_PACKAGES:
      return str(e)
  if isinstance(e, OSError):
    if "Failed loading config file" in str(e):  # ml_collections: --config=<missing file>
      return str(e).replace("Configuration is not available because of an earlier failure to "
                            "load: ", "cannot load the config file: ")
    if e.errno in _ENVIRONMENT_ERRNOS:
      return _os_error_message(e)
  if isinstance(e, (ValueError, OSError)) and _raised_by_project(e):
    return str(e)
  return None


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` with the error boundary: a user error prints `error: <message>` and returns 1."""

  @functools.wraps(main)
  def run(argv):
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
      message = user_error_message(e)
      if message is None or os.environ.get("IDGBR_TRACEBACK") == "1":
        raise
      _fail(message)
      return 1
  return run


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with `error: ...` for a bad command line: an unknown or mistyped
  flag, a missing required flag, an unknown config key (`--config.no_such_key=1`), a value of
  the wrong type (`--config.batch_size=abc`), an unknown `:arg` of a config file."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_flag_error_message(str(e), argv))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that is not there
    m = re.search(r"'([^']+)'(.*)", str(e))
    key, hint = (m.group(1), m.group(2).strip(" ;\"'")) if m else (str(e), "")
    offending = [a for a in argv[1:] if a.startswith("--") and "." in a.split("=")[0]
                 and key in a.split("=")[0].lstrip("-").split(".")]
    if not offending:
      raise
    _fail(f"{offending[0]}: the config has no key {key!r}" + (f" ({hint})" if hint else "") +
          "; configs are locked, so a key must exist in the config file")
  except Exception as e:  # noqa: BLE001 - e.g. a config file's own check
    message = user_error_message(e)
    if message is None or os.environ.get("IDGBR_TRACEBACK") == "1":
      raise
    _fail(message)
  print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
  sys.exit(1)


def _flag_error_message(message: str, argv: list[str]) -> str:
  """absl's message for a flag error, shortened: a config file's failing `get_config` shows
  its last line (e.g. `ValueError: unknown config arg 'bogus'; allowed: [...]`) instead of the
  whole traceback text the flags library embeds; a mistyped config value says the type."""
  if "Error whilst parsing config file" in message:
    last = [line.strip() for line in message.splitlines() if line.strip()][-1]
    m = re.match(r"ValueError: (.*)", last)
    if m:
      arg = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
      return f"{arg}: {m.group(1)}"
    return message
  m = re.match(r"flag (--\w+(?:\.\w+)+)=(.*?): (.*)", message, re.S)
  if m:
    name, value, problem = m.groups()
    expected = _expected_type(name)
    return (f"{name}={value}: {problem}" +
            (f" (expected {expected})" if expected else ""))
  return message


def _expected_type(flag_path: str) -> str | None:
  """The type a `--config.a.b` override must have, from the loaded config (or None)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  root, _, path = flag_path.lstrip("-").partition(".")
  try:
    config = flags.FLAGS[root].value
    from ml_collections.config_flags import config_path  # pylint: disable=import-outside-toplevel
    value = config_path.get_value(path, config)
  except Exception:  # noqa: BLE001 - only for a nicer message
    return None
  if value is None:
    return None
  return f"a value of type {type(value).__name__}; the config has {value!r}"


# ----- the console script ----------------------------------------------------------------------
def usage() -> str:
  lines = ["usage: idgbr <command> [--flags]   (idgbr <command> --helpfull for all flags)", "",
           "commands:"]
  lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"idgbr: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF is only used for PNG/TensorBoard I/O
  # gs:// and other URLs through fsspec (gcsfs), not tf.io.gfile: commands that never need TF
  # (refine, export, convert) do not import it for a bucket path either.
  os.environ.setdefault("EPATH_USE_TF", "0")
  from idgbr_jax import xla_flags  # pylint: disable=import-outside-toplevel
  # Before any command starts JAX. Evaluation is image-parallel: one CPU device per core.
  xla_flags.apply_defaults(extra=xla_flags.cpu_device_flags() if command == "evaluate" else ())
  module = importlib.import_module(COMMANDS[command][0])
  from absl import app  # pylint: disable=import-outside-toplevel
  app.run(guarded(module.main), argv=[f"idgbr {command}"] + argv[2:], flags_parser=parse_flags)


if __name__ == "__main__":
  main()
