"""`idgbr` console script: `idgbr <command> [--flags]`.

Each command is a module under `idgbr_jax.commands` that defines its own absl flags and a
`main(argv)`; only the chosen module is imported, so commands never clash over flag names.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("idgbr_jax.commands.train", "train a Stage I segmenter or a Stage II refiner"),
    "predict": ("idgbr_jax.commands.predict", "write Stage I coarse maps (index PNGs) for splits"),
    "evaluate": ("idgbr_jax.commands.evaluate", "region + boundary metrics of maps against labels"),
    "refine": ("idgbr_jax.commands.refine", "refine coarse maps with a trained Stage II model"),
    "demo": ("idgbr_jax.commands.demo", "the whole method on the embedded synthetic dataset"),
    "convert": ("idgbr_jax.commands.convert", "import diffusers / DINOv2 / IDGBR / CLIP weights"),
    "export": ("idgbr_jax.commands.export", "write weights as diffusers or original IDGBR files"),
}


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
  app.run(module.main, argv=[f"idgbr {command}"] + argv[2:])


if __name__ == "__main__":
  main()
