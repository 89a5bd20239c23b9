"""idgbr plan --config=configs/<experiment>.py[:arg] [--topology=v5e:2x4] [--mesh=data=..,fsdp=..]
           [--batch_per_chip=N] [--programs=stage1,stage2,stage2_after_warmup,refine]
           [--parts=autoencoder=sd15] [--output=plan.json] [--config.model.frozen_dtype=bfloat16]

Compiles the config's train steps and refine function for a device topology without running
them (no accelerator, no weights) and prints, per program, the bytes per chip (arguments,
temporaries, outputs, donated aliases, peak), the chip's HBM and whether the program fits, the
FLOPs per step per chip and the images per step. `--topology` names TPU chips (libtpu compiles
for them on any machine: `pip install -c constraints.txt -e '.[tpu]'`); without it the local
devices are the target (a GPU host's GPUs). `--config.<key>=value` overrides apply as in
`idgbr train` (e.g. `--config.model.remat=True --config.model.dtype=bfloat16`).
"""
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology to compile for, e.g. v5e:2x4 (v5e-8), v4:2x2x1 (v4-8), "
    "v5p:2x2x1, v6e:2x4; default: this host's devices.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes, e.g. data=2,fsdp=4 (unnamed axes 1; one "
                            "may be -1); default: config.mesh_shape.")
_BATCH = flags.DEFINE_integer("batch_per_chip", None, "Images per batch shard (default: the "
                              "config's batch_size / eval_batch_size over the batch shards).")
_PROGRAMS = flags.DEFINE_list("programs", None, "Programs to compile (default: all of the "
                              "config's): stage1, stage2, stage2_after_warmup, refine.")
_PARTS = flags.DEFINE_string("parts", None, "Part variants for init.* checkpoints the config "
                             "leaves unset, e.g. autoencoder=sd15 (SD-1.5's VAE).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the records as JSON here.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  from idgbr_jax import plan, paths  # pylint: disable=import-outside-toplevel
  mesh = plan.parse_mesh(_MESH.value)
  parts = plan.parse_parts(_PARTS.value)
  target = plan.make_target(_TOPOLOGY.value)
  config = plan.with_parts(_CONFIG.value, parts)
  records, notes = plan.plan(config, target, mesh=mesh, batch_per_chip=_BATCH.value,
                             programs=_PROGRAMS.value,
                             log=lambda s: print(s, file=sys.stderr, flush=True))
  print(plan.format_table(records, notes), flush=True)
  if _OUTPUT.value:
    paths.write_json(_OUTPUT.value, [r.to_json() for r in records])
    print(f"wrote {_OUTPUT.value}", file=sys.stderr)
  return 0
