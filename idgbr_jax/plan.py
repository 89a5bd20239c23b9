"""`idgbr plan`: compile a config's programs for a device topology and report memory and FLOPs.

Nothing runs and nothing is allocated: params, optimizer state, frozen parts and batches are
`jax.eval_shape` results placed on a `Mesh` of the target's devices as `ShapeDtypeStruct`s with
their `NamedSharding`s, and each program is `jax.jit(...).lower(...).compile()`d from the same
functions the trainers and `idgbr refine` jit:

* `stage1`: Stage I's train step (`train.stage1.make_train_step`), state donated;
* `stage2`: Stage II's first train step (`train.stage2.make_train_step`): the REPA warm-up's,
  the DINOv2 teacher among the frozen arguments; without a warm-up (no teacher, REPA off,
  `repa.active_steps=0`) the step without it, as the trainer then never loads the teacher;
* `stage2_after_warmup`: the step the trainer switches to after `repa.active_steps`
  (`with_teacher=False`: no teacher, no REPA branch; `repa.drop_teacher`, as the original
  deletes DINOv2); the trainable tree keeps the projector, so checkpoints are unchanged;
* `refine`: `inference.refine.make_refine_fn` (DDIM scan + Control-CFG), no projector, no
  teacher, as `idgbr refine` loads a run.

With `config.split_step` the trainer runs a Stage II step as three programs (prepare, grads,
apply: `train.stage2.SplitTrainStep`); each is compiled, and the step's peak per chip is the
largest of a program's peak plus the trees the chip holds meanwhile (e.g. the AdamW moments
during the gradient program).

The target is a TPU topology (`v5e:2x4`, `v4:2x2x1`, ...: libtpu compiles for it without the
hardware) or the local devices (a GPU host's GPUs; CPU devices for tests). Per program and chip
the record gives XLA's buffer sizes (`compiled.memory_analysis()`), the peak, the chip's HBM and
whether the program fits, and `compiled.cost_analysis()["flops"]` (XLA's count for the
partitioned per-device program).

A config's `init.*` checkpoints give only architectures here (their meta.json); no weights file
is read. `--parts=autoencoder=sd15` plans with a named part variant where the config sets no
checkpoint (e.g. SD-1.5's VAE without the converted weights at hand).
"""
from __future__ import annotations

import atexit
import copy
import ctypes
import ctypes.util
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from idgbr_jax.parallel import sharding

GiB = 1 << 30

PROGRAMS = ("stage1", "stage2", "stage2_after_warmup", "refine")
STAGE_PROGRAMS = {"stage1": ("stage1",), "stage2": ("stage2", "stage2_after_warmup", "refine")}

# Per TPU generation: HBM per chip (Cloud TPU docs: v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB),
# peak bf16 FLOP/s per chip (v4 275 T, v5e 197 T, v5p 459 T, v6e 918 T), and how libtpu
# names its devices. v4 and v5p chips hold two TensorCores that JAX drives as one device
# ("megacore"), as on a TPU VM; libtpu's default topology would list the cores.
TPU_CHIPS = {
    "v4": dict(hbm_bytes=32 * GiB, peak_flops=275e12, chip_config_name="megacore"),
    "v5e": dict(hbm_bytes=16 * 10**9, peak_flops=197e12, chip_config_name=None),
    "v5p": dict(hbm_bytes=95 * 10**9, peak_flops=459e12, chip_config_name="megacore"),
    "v6e": dict(hbm_bytes=32 * 10**9, peak_flops=918e12, chip_config_name=None),
}
# Cloud TPU accelerator-type prefixes (what libtpu reads from TPU_ACCELERATOR_TYPE).
_ACCELERATOR_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}

LIBTPU_HELP = ("install libtpu, which compiles for TPUs without one: `pip install -c "
               "constraints.txt -e '.[tpu]'` (or `make install-tpu`), or put libtpu 0.0.42.x "
               "elsewhere and set TPU_LIBRARY_PATH to its libtpu.so")

_OOM_PATTERN = re.compile(r"Ran out of memory|RESOURCE_EXHAUSTED")


@dataclasses.dataclass
class Target:
  """The devices programs are compiled for, and what a chip holds."""
  name: str                 # the topology name, or "local:<platform>"
  devices: list
  device_kind: str
  platform: str
  hbm_bytes: int | None     # per chip; None where unknown (CPU)
  peak_flops: float | None  # per chip, bf16; None where unknown


@dataclasses.dataclass
class Record:
  """One compiled program: bytes per chip (XLA's buffer assignment) and FLOPs per chip."""
  program: str
  topology: str
  device_kind: str
  mesh: dict[str, int]
  batch_per_chip: int
  images_per_step: int
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  generated_code_bytes: int
  peak_bytes_per_chip: int
  hbm_bytes_per_chip: int | None
  fits: bool | None
  flops_per_chip: float
  # An estimate, not a measurement: the images per second per chip that `flops_per_chip` implies
  # at 50 % of the chip's peak bf16 FLOP/s (None where the peak is unknown).
  est_images_per_s_per_chip: float | None = None
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  note: str = ""

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----- targets -----------------------------------------------------------------------------------
def tpu_generation(topology: str) -> str:
  """'v5e' of 'v5e:2x4' (also 'v5litepod-8', 'v4-8'); a ValueError names an unknown one."""
  m = re.match(r"^(v\d+[a-z]*|v5litepod)(?=[:\-_=])", topology or "")
  gen = m.group(1) if m else None
  gen = "v5e" if gen == "v5litepod" else gen
  if gen not in TPU_CHIPS:
    raise ValueError(f"--topology={topology!r}: unknown TPU topology; expected "
                     f"<generation>:<chips per axis> with a generation in {sorted(TPU_CHIPS)}, "
                     "e.g. v5e:2x4 (a v5e-8), v4:2x2x1 (a v4-8), v5p:2x2x1, v6e:2x4")
  return gen


def libtpu_available() -> bool:
  path = os.environ.get("TPU_LIBRARY_PATH")
  if path:
    return os.path.isfile(path)
  return importlib.util.find_spec("libtpu") is not None


def _quiet_libtpu_env(generation: str, chips: int) -> None:
  """libtpu, loaded on a machine without TPUs, warns that it cannot find the VM's accelerator
  type and worker hostnames (harmless for compiling); say them, unless the environment does.
  Nothing here applies on a TPU VM, whose runtime finds them itself."""
  if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
    return  # a TPU VM: its runtime finds them itself
  cores = chips * (2 if TPU_CHIPS[generation]["chip_config_name"] else 1)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{_ACCELERATOR_PREFIX[generation]}-{cores}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Without chips nothing is shared: let several planners (and tests) load libtpu at once,
  # instead of the second one failing on libtpu's lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_target(topology: str) -> Target:
  """The chips of a TPU topology, compiled for by libtpu without the hardware."""
  gen = tpu_generation(topology)
  if not libtpu_available():
    raise ValueError(f"--topology={topology} compiles for TPU and needs libtpu, which is not "
                     f"installed: {LIBTPU_HELP}")
  chips = TPU_CHIPS[gen]
  dims = re.findall(r"\d+", topology.split(":", 1)[1]) if ":" in topology else []
  _quiet_libtpu_env(gen, math.prod(int(d) for d in dims) if dims else 4)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {"chip_config_name": chips["chip_config_name"]} if chips["chip_config_name"] else {}
  try:
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                           **kwargs).devices
  except RuntimeError as e:  # JaxRuntimeError is a RuntimeError
    if "not installed" in str(e):
      raise ValueError(f"--topology={topology}: JAX cannot load libtpu ({e}); {LIBTPU_HELP}"
                       ) from e
    raise ValueError(f"--topology={topology}: libtpu cannot describe this topology: "
                     f"{str(e).splitlines()[0]}") from e
  return Target(topology, list(devices), devices[0].device_kind, "tpu", chips["hbm_bytes"],
                chips["peak_flops"])


def local_target() -> Target:
  """This host's devices (a GPU host's GPUs; CPU devices where there is no accelerator)."""
  devices = jax.local_devices()
  d = devices[0]
  hbm = None
  try:
    stats = d.memory_stats() or {}
    hbm = stats.get("bytes_limit")
  except Exception:  # noqa: BLE001 - CPU devices have no memory stats
    hbm = None
  return Target(f"local:{d.platform}", devices, d.device_kind, d.platform, hbm, None)


def make_target(topology: str | None) -> Target:
  return tpu_target(topology) if topology else local_target()


# ----- meshes ------------------------------------------------------------------------------------
def parse_mesh(text: str | None) -> dict[str, int] | None:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; errors name the offending item."""
  if not text:
    return None
  out = {}
  for item in text.split(","):
    name, sep, value = item.strip().partition("=")
    if not sep or name not in sharding.MESH_AXES:
      raise ValueError(f"--mesh={text}: {item!r} is not <axis>=<size> with an axis in "
                       f"{sharding.MESH_AXES}")
    if name in out:
      raise ValueError(f"--mesh={text}: axis {name!r} given twice")
    try:
      out[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh={text}: size {value!r} of {name!r} is not an integer") from None
    if out[name] < 1 and out[name] != -1:
      raise ValueError(f"--mesh={text}: size of {name!r} must be >= 1 (or -1: the rest)")
  return out


def mesh_shape_for(config: ml_collections.ConfigDict, override: dict[str, int] | None,
                   num_devices: int) -> dict[str, int]:
  """The mesh sizes a plan uses: `override` (--mesh; unnamed axes are 1) or the config's
  `mesh_shape`, resolved on `num_devices` devices, which it must use entirely."""
  shape = ({a: 1 for a in sharding.MESH_AXES} | override if override is not None
           else {a: int(config.mesh_shape[a]) for a in sharding.MESH_AXES})
  what = "--mesh" if override is not None else "config.mesh_shape"
  if list(shape.values()).count(-1) > 1:
    raise ValueError(f"{what} {shape}: at most one size may be -1")
  if -1 in shape.values():
    known = math.prod(s for s in shape.values() if s != -1)
    if num_devices % known:
      raise ValueError(f"{what} {shape}: {known} does not divide the {num_devices} devices")
    shape = {a: (num_devices // known if s == -1 else s) for a, s in shape.items()}
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"{what} {shape} spans {math.prod(shape.values())} devices; the target has "
                     f"{num_devices}: give sizes whose product is {num_devices}")
  return shape


def batch_shards(mesh_shape: dict[str, int], rules) -> int:
  """How many ways a batch's leading axis splits (the mesh axes the `batch` rule names)."""
  axes = nn.logical_to_mesh_axes(("batch",), rules=tuple(rules))[0]
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  return math.prod(mesh_shape[a] for a in axes)


# ----- programs of a config ----------------------------------------------------------------------
def _teacher_use(config: ml_collections.ConfigDict) -> tuple[bool, bool]:
  """(the trainer's first step holds the DINOv2 teacher, it switches to the step without it
  later): the trainer's own rule, `train.stage2.step_needs_teacher`, at step 1 and at the
  run's last step."""
  from idgbr_jax.assembly import stage2 as assembly  # pylint: disable=import-outside-toplevel
  from idgbr_jax.data import sources  # pylint: disable=import-outside-toplevel
  from idgbr_jax.train import stage2  # pylint: disable=import-outside-toplevel
  ref = assembly.build_refiner(config, sources.num_classes(config.data))
  first = stage2.step_needs_teacher(ref, config, 1)
  return first, first and not stage2.step_needs_teacher(ref, config, config.num_train_steps)


def programs_of(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """{program: the (sub)config it is built from}: a Stage I or Stage II config (`config.stage`,
  as `idgbr train` decides), or the demo's config holding both (`config.stage1/stage2`)."""
  if "stage" in config:
    if config.stage not in STAGE_PROGRAMS:
      raise ValueError(f"config.stage={config.stage!r}; allowed: {sorted(STAGE_PROGRAMS)}")
    return {p: config for p in STAGE_PROGRAMS[config.stage]}
  out = {}
  for stage, programs in STAGE_PROGRAMS.items():
    if stage in config and "stage" in config[stage]:
      out.update({p: config[stage] for p in programs})
  if not out:
    raise ValueError("the config has no `stage` (stage1 | stage2) and no stage1 / stage2 "
                     "sub-configs: not a training config")
  return out


def _part_meta_dir(kind: str, part_config) -> str:
  """A folder holding only a meta.json for `part_config` (the planner reads architectures
  from meta.json; no params are written or read)."""
  directory = tempfile.mkdtemp(prefix=f"idgbr_plan_{kind}_")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump({"kind": kind, "config": dataclasses.asdict(part_config)}, f)
  return directory


PART_KINDS = {"autoencoder": "autoencoder", "teacher": "dinov2", "unet": "denoiser"}


def with_parts(config: ml_collections.ConfigDict, parts: dict[str, str]
               ) -> ml_collections.ConfigDict:
  """`config` whose unset `init.<part>` checkpoints plan as the named variants
  ({'autoencoder': 'sd15'}: SD-1.5's VAE, as `idgbr convert --from=diffusers` writes it)."""
  if not parts:
    return config
  # pylint: disable-next=import-outside-toplevel
  from idgbr_jax.models import autoencoder, denoiser, dinov2
  getters = {"autoencoder": autoencoder.get_config, "teacher": dinov2.get_config,
             "unet": denoiser.get_config}
  config = copy.deepcopy(config)
  for part, variant in parts.items():
    if part not in getters:
      raise ValueError(f"--parts: unknown part {part!r}; allowed: {sorted(getters)}")
    if "init" not in config or part not in config.init:
      continue  # e.g. a Stage I config
    if config.init[part]:
      continue  # the config's own checkpoint wins
    with config.unlocked():
      config.init[part] = _part_meta_dir(PART_KINDS[part], getters[part](variant))
  return config


def parse_parts(text: str | None) -> dict[str, str]:
  out = {}
  for item in filter(None, (text or "").split(",")):
    name, sep, value = item.strip().partition("=")
    if not sep or not value:
      raise ValueError(f"--parts={text}: {item!r} is not <part>=<variant>")
    out[name] = value
  return out


# ----- abstract trees ----------------------------------------------------------------------------
def _abstract(init_fn: Callable, rng, mesh, rules):
  return sharding.abstract_sharded(init_fn, rng, mesh, rules)


def _cast_floats(tree, dtype):
  """ShapeDtypeStructs with floating leaves in `dtype` (same shardings)."""
  def one(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


def _frozen_in(config, frozen):
  """The frozen tree as the trainer and `idgbr refine` hold it: its weights in
  `config.model.frozen_dtype` (`assembly.stage2.cast_frozen`)."""
  from idgbr_jax.assembly import stage2 as assembly  # pylint: disable=import-outside-toplevel
  dtype = assembly.frozen_dtype(config)
  return {k: _cast_floats(v, dtype) if k in assembly.FROZEN_WEIGHTS else v
          for k, v in frozen.items()}


def _batch(mesh, rules, shapes: dict[str, tuple[tuple[int, ...], Any]]):
  """Abstract global batch arrays sharded as the trainers shard them."""
  return ({k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s), rules))
           for k, (s, d) in shapes.items()},
          {k: sharding.batch_sharding(mesh, len(s), rules) for k, (s, _) in shapes.items()})


def _rng(mesh):
  """An abstract typed PRNG key, replicated (the trainers' `fold_in(key(seed), ...)`)."""
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def stage1_program(config, mesh, rules, batch: int):
  """(jitted step, abstract args) of Stage I's train step."""
  from idgbr_jax.assembly import stage1 as assembly  # pylint: disable=import-outside-toplevel
  from idgbr_jax.data import sources  # pylint: disable=import-outside-toplevel
  from idgbr_jax.train import optim, stage1  # pylint: disable=import-outside-toplevel
  num_classes = sources.num_classes(config.data)
  model = assembly.build_model(config, num_classes)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  size = assembly.input_size(config)
  state, state_sh = _abstract(stage1.make_init_fn(model, tx, size), jax.random.key(config.seed),
                              mesh, rules)
  batch_arrays, batch_sh = _batch(mesh, rules, {"image": ((batch, size, size, 3), jnp.float32),
                                                "label": ((batch, size, size), jnp.int32)})
  repl = sharding.replicated(mesh)
  step = jax.jit(stage1.make_train_step(model, tx, schedule, num_classes, config),
                 in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                 donate_argnums=(0,))
  return step, (state, batch_arrays, _rng(mesh))


def _stage2_trees(config, mesh, rules, *, with_teacher: bool, with_projector: bool,
                  with_opt: bool, tx=None):
  """Abstract (trainable state or params, frozen) trees of a Stage II config, with shardings,
  as `train.stage2.init_state` / `init_frozen` (or `assembly.load_refiner`) would build them."""
  from idgbr_jax.assembly import stage2 as assembly  # pylint: disable=import-outside-toplevel
  from idgbr_jax.data import sources  # pylint: disable=import-outside-toplevel
  from idgbr_jax.models import denoiser  # pylint: disable=import-outside-toplevel
  ref = assembly.build_refiner(config, sources.num_classes(config.data))
  init_params = assembly.trainable_init_fn(ref, config)
  if with_opt:
    def init(rng):
      params = init_params(rng)
      return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    trainable, trainable_sh = _abstract(init, assembly.trainable_key(config), mesh, rules)
  else:
    trainable, trainable_sh = _abstract(init_params, assembly.trainable_key(config), mesh, rules)
    if not with_projector:
      trainable.pop("projector", None)
      trainable_sh.pop("projector", None)
  # The frozen tree of assembly.init_frozen, abstract: its own init functions (any key gives
  # the shapes).
  r = assembly.trainable_key(config)
  frozen, f_sh = {}, {}
  for part, init_fn in assembly.frozen_init_fns(ref, config, with_teacher=with_teacher).items():
    frozen[part], f_sh[part] = _abstract(init_fn, r, mesh, rules)
  unet, unet_sh = _abstract(lambda k: ref.init_unet(k, config.data.image_size), r, mesh, rules)
  frozen["unet_ori"], f_sh["unet_ori"] = (denoiser.encoder_params(unet),
                                          denoiser.encoder_params(unet_sh))
  f_sh["context"] = sharding.replicated(mesh)
  frozen["context"] = jax.ShapeDtypeStruct(assembly.context_shape(ref), jnp.float32,
                                           sharding=f_sh["context"])
  return ref, (trainable, trainable_sh), (frozen, f_sh)


def stage2_program(config, mesh, rules, batch: int, *, after_warmup: bool = False):
  """[(name, jitted, abstract args, trees the chip holds besides the args)] of Stage II's
  train step: one program, or the trainer's three with `config.split_step`; `after_warmup`:
  the trainer's step without the teacher (no REPA branch; the projector stays in the state)."""
  from idgbr_jax.assembly import stage2 as assembly  # pylint: disable=import-outside-toplevel
  from idgbr_jax.train import optim, stage2  # pylint: disable=import-outside-toplevel
  tx, lr_schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  ref, (state, state_sh), (frozen, f_sh) = _stage2_trees(
      config, mesh, rules, with_teacher=not after_warmup, with_projector=True, with_opt=True,
      tx=tx)
  size = config.data.crop_size or config.data.image_size
  shapes = {"image": ((batch, size, size, 3), jnp.float32),
            "label": ((batch, size, size), jnp.int32),
            "coarse": ((batch, size, size), jnp.int32)}
  cached_keys = ()
  if config.get("latent_cache", False):
    cached_keys = ("image", "label") + (("coarse",) if config.diffusion.use_coarse else ())
    h = ref.latent_size(size)
    for k in cached_keys:
      shapes[f"{k}_moments"] = ((batch, h, h, 2 * ref.config.autoencoder.latent_channels),
                                jnp.float32)
  batch_arrays, _ = _batch(mesh, rules, shapes)
  args = (state, _frozen_in(config, frozen), batch_arrays, _rng(mesh))
  # The trainer's own jitted step (one program, or three with config.split_step); keep_unused:
  # the step never reads some frozen weights (the VAE decoder), which jit would drop from the
  # compiled program's arguments; the trainer holds them on the chip all the same.
  step = stage2.jit_train_step(ref, tx, lr_schedule, assembly.make_schedule(config), config,
                               mesh, rules, state_sh, f_sh,
                               stage2.batch_shardings(mesh, rules, cached_keys),
                               with_teacher=not after_warmup, keep_unused=True)
  if isinstance(step, stage2.SplitTrainStep):
    # Each program with what the chip holds besides its arguments meanwhile.
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
      return step.programs(*args)
  return [("step", step, args, ())]


def refine_program(config, mesh, rules, batch: int):
  """(jitted refine function, abstract args, denoiser-call program), as `idgbr refine` loads a
  run (params only). The third item is (jitted, args, calls): one guided denoiser call of the
  sampling loop and how many the loop makes (XLA's cost analysis counts a loop body once)."""
  from idgbr_jax import diffusion  # pylint: disable=import-outside-toplevel
  from idgbr_jax.inference import refine  # pylint: disable=import-outside-toplevel
  ref, (trainable, t_sh), (frozen, f_sh) = _stage2_trees(
      config, mesh, rules, with_teacher=False, with_projector=False, with_opt=False)
  frozen = _frozen_in(config, frozen)
  size = config.data.image_size
  arrays, _ = _batch(mesh, rules, {"image": ((batch, size, size, 3), jnp.float32),
                                   "coarse": ((batch, size, size), jnp.int32)})
  fn = refine.make_refine_fn(ref, config, mesh, t_sh, f_sh)
  args = (trainable, frozen, arrays["image"], arrays["coarse"], _rng(mesh))
  # One call of the sampler's noise predictor (as make_refine_fn's eps_fn), on the conditions'
  # shapes; its FLOPs times (calls - 1) are what the loop adds beyond the one body counted.
  d = config.diffusion
  steps = int(d.num_inference_steps)
  calls = steps - diffusion.start_timestep_index(steps, float(d.get("strength", 1.0)))
  use_cfg = float(d.guidance_scale) != 1.0
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    cond = jax.eval_shape(lambda f, i, c, r: ref.encode_conditions(
        f, i, c, r, use_coarse=d.use_coarse), frozen, arrays["image"], arrays["coarse"],
                          _rng(mesh))
  cond_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim, rules), cond)
  cond = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cond,
                      cond_sh)
  h = ref.latent_size(size)
  z = jax.ShapeDtypeStruct((batch, h, h, ref.config.denoiser.in_channels), jnp.float32,
                           sharding=sharding.batch_sharding(mesh, 4, rules))
  t = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))

  def eps(tr, fr, z_t, t_, c):
    return ref.eps_cfg(tr, fr, z_t, t_, c) if use_cfg else ref.eps(tr, fr, z_t, t_, c)[0]
  step = jax.jit(eps, in_shardings=(t_sh, f_sh, z.sharding, t.sharding, cond_sh))
  return fn, args, (step, (trainable, frozen, z, t, cond), calls)


# ----- compile and measure -----------------------------------------------------------------------
def compile_program(fn, args, mesh, rules, platform: str):
  """`fn.lower(*args).compile()` under the mesh and the rules (as the trainers trace). On TPU a
  program over the chip's HBM is compiled again with `xla_tpu_no_crash_on_oom`, so its sizes can
  still be read; returns (compiled, the compiler's out-of-memory message or "")."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    lowered = fn.lower(*args)
  try:
    return lowered.compile(), ""
  except Exception as e:  # noqa: BLE001 - only an out-of-memory verdict is handled here
    if platform != "tpu" or not _OOM_PATTERN.search(str(e)):
      raise
    message = str(e).splitlines()[0]
  return lowered.compile(compiler_options={"xla_tpu_no_crash_on_oom": True}), message


def release_host_memory() -> None:
  """Hands the memory of a finished compile back to the OS before the next one: freed, it
  stays in the C allocator's heap otherwise (after the sd15 prepare program ~8 GiB), and the
  next compile, on a 24 GiB host, starts that much higher."""
  gc.collect()
  try:
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to trim
    pass


def tree_bytes_per_chip(trees) -> int:
  """Bytes one chip holds of abstract arrays with shardings (the largest shard where shards
  differ in size)."""
  total = 0
  for x in jax.tree.leaves(trees):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return int(total)


def peak_bytes(memory) -> int:
  """XLA's peak (`peak_memory_in_bytes`, which on TPU also counts buffers outside the temp
  allocation) or arguments + temporaries + outputs - aliased (donated) bytes, the larger."""
  total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes +
           memory.output_size_in_bytes - memory.alias_size_in_bytes)
  return int(max(total, getattr(memory, "peak_memory_in_bytes", 0) or 0))


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def _multislice_notes(available: dict[str, ml_collections.ConfigDict], chips: int) -> list[str]:
  """A config whose `dcn_mesh_shape` spans several slices is planned as one slice: its
  `mesh_shape` is per slice, and each chip of every slice runs the same program as long as the
  per-chip batch is the same (data parallelism across slices, the usual layout)."""
  notes = []
  for cfg in {id(c): c for c in available.values()}.values():
    dcn = {a: int(v) for a, v in cfg.get("dcn_mesh_shape", {}).items()}
    if any(v > 1 for v in dcn.values()):
      notes.append(
          f"config.dcn_mesh_shape={dcn}: planned as one slice of {chips} chips (mesh_shape is "
          "per slice). Across slices over data, each chip holds what is planned here; an fsdp "
          "or tensor axis across slices would shard further (not modelled), and the "
          "cross-slice (DCN) gradient traffic is not counted")
  return notes


def default_batch(config, program: str, shards: int) -> tuple[int, str]:
  """Per-chip batch from the config: `batch_size` (train) / `eval_batch_size` (refine) over the
  batch shards, rounded up to one."""
  key = "eval_batch_size" if program == "refine" else "batch_size"
  total = int(config.get(key, 1) or 1)
  per = max(1, -(-total // shards))
  note = "" if per * shards == total else (f"config.{key}={total} over {shards} batch shards: "
                                           f"planned at {per} per chip")
  return per, note


def plan(config: ml_collections.ConfigDict, target: Target, *, mesh: dict[str, int] | None = None,
         batch_per_chip: int | None = None, programs: Sequence[str] | None = None,
         log: Callable[[str], None] | None = None) -> tuple[list[Record], list[str]]:
  """Compiles the config's programs for `target`; returns (records, notes on skipped ones)."""
  log = log or (lambda _: None)
  available = programs_of(config)
  wanted = list(programs or available)
  unknown = [p for p in wanted if p not in PROGRAMS]
  if unknown:
    raise ValueError(f"--programs: unknown {unknown}; allowed: {list(PROGRAMS)}")
  if batch_per_chip is not None and batch_per_chip < 1:
    raise ValueError(f"--batch_per_chip={batch_per_chip} must be >= 1")
  records, notes = [], []
  notes.extend(_multislice_notes(available, len(target.devices)))
  for program in wanted:
    if program not in available:
      notes.append(f"{program}: skipped, not a program of this config (it has "
                   f"{', '.join(available)})")
      continue
    cfg = available[program]
    starts_with_teacher, drops_teacher = (_teacher_use(cfg) if program.startswith("stage2")
                                          else (False, False))
    if program == "stage2_after_warmup" and not drops_teacher:
      notes.append("stage2_after_warmup: skipped, the config's trainer never switches to it "
                   "(no teacher, REPA off or no warm-up, repa.drop_teacher=False, or "
                   "num_train_steps <= repa.active_steps): stage2 is its only step")
      continue
    rules = tuple(cfg.sharding_rules)
    shape = mesh_shape_for(cfg, mesh, len(target.devices))
    the_mesh = sharding.make_mesh(shape, devices=target.devices)
    shards = batch_shards(shape, rules)
    note = ""
    if batch_per_chip is None:
      per_chip, note = default_batch(cfg, program, shards)
    else:
      per_chip = batch_per_chip
    batch = per_chip * shards
    log(f"compiling {program} for {target.name}, mesh {shape}, {per_chip} per chip ...")
    loop = None
    if program == "stage1":
      pieces = [("step", *stage1_program(cfg, the_mesh, rules, batch), ())]
    elif program == "refine":
      fn, args, loop = refine_program(cfg, the_mesh, rules, batch)
      pieces = [("refine", fn, args, ())]
    else:
      # `stage2` is the trainer's first step: with the teacher only if it loads one.
      pieces = stage2_program(cfg, the_mesh, rules, batch,
                              after_warmup=(program == "stage2_after_warmup"
                                            or not starts_with_teacher))
    # A step in several programs (config.split_step) needs, per chip, the largest of each
    # program's peak plus what the chip holds besides its arguments meanwhile.
    measured, ooms, flops = [], [], 0.0
    for name, fn, args, others in pieces:
      if len(pieces) > 1:
        log(f"  program {name} ...")
      compiled, oom = compile_program(fn, args, the_mesh, rules, target.platform)
      memory = compiled.memory_analysis()
      measured.append((peak_bytes(memory) + tree_bytes_per_chip(others), name, memory))
      ooms += [f"{name}: {oom}" if len(pieces) > 1 else oom] if oom else []
      flops += flops_of(compiled)
      del compiled
      release_host_memory()
    peak, _, memory = max(measured, key=lambda m: m[0])
    if len(pieces) > 1:
      note = "; ".join(filter(None, [note, "config.split_step: the step is " + ", ".join(
          f"{n} {p / GiB:.2f} GiB" for p, n, _ in measured) + " (each program's peak plus what "
          "the chip holds meanwhile); bytes columns are the largest one's"]))
    oom = "; ".join(ooms)
    fits = None
    if target.hbm_bytes is not None:
      fits = not oom and peak <= target.hbm_bytes
    if oom:
      note = "; ".join(filter(None, [note, f"compiler: {oom}"]))
    if program != "stage1" and cfg.model.get("attention", "") == "chunked":
      note = "; ".join(filter(None, [note, "model.attention=chunked: XLA counts each "
                                      "attention's loop of query blocks once, so the FLOPs "
                                      "under-count (plan without it for FLOPs)"]))
    options = {"model.dtype": str(cfg.model.get("dtype", "float32")),
               "model.remat": bool(cfg.model.get("remat", False))}
    if program != "stage1":
      options["model.frozen_dtype"] = str(cfg.model.get("frozen_dtype", "float32"))
    if target.platform == "tpu":
      # What TPU's compiler was started with (`xla_flags.TPU_DEFAULT_FLAGS`, as `idgbr train`).
      options["LIBTPU_INIT_ARGS"] = os.environ.get("LIBTPU_INIT_ARGS", "")
    if loop is not None and loop[2] > 1:
      # XLA counts the sampling loop's body once: add the other calls of the denoiser.
      step, step_args, calls = loop
      step_compiled, _ = compile_program(step, step_args, the_mesh, rules, target.platform)
      flops += (calls - 1) * flops_of(step_compiled)
      del step_compiled
    per_chip_images = batch / len(target.devices)
    estimate = (per_chip_images * 0.5 * target.peak_flops / flops
                if target.peak_flops and flops else None)
    records.append(Record(
        program=program, topology=target.name, device_kind=target.device_kind, mesh=shape,
        batch_per_chip=per_chip, images_per_step=batch,
        argument_bytes=int(memory.argument_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        peak_bytes_per_chip=peak, hbm_bytes_per_chip=target.hbm_bytes, fits=fits,
        flops_per_chip=flops, est_images_per_s_per_chip=estimate, options=options, note=note))
    del pieces
  return records, notes


# ----- output ------------------------------------------------------------------------------------
def _size(n: int | None, unit: int) -> str:
  return "-" if n is None else f"{n / unit:.2f}"


def format_table(records: Iterable[Record], notes: Sequence[str] = ()) -> str:
  """The records as a fixed-width table: bytes per chip in GiB (MiB when every peak is under
  1 GiB), TFLOP per step per chip."""
  records = list(records)
  small = records and max(r.peak_bytes_per_chip for r in records) < GiB
  unit, unit_name = (1 << 20, "MiB") if small else (GiB, "GiB")
  head = ("program", "mesh", "img/chip", "img/step", "args", "temp", "out", "alias", "peak",
          "HBM", "fits", "TFLOP/chip")
  rows = []
  for r in records:
    mesh = ",".join(f"{a}={s}" for a, s in r.mesh.items() if s != 1) or "1 device"
    fits = "-" if r.fits is None else ("yes" if r.fits else "NO")
    rows.append((r.program, mesh, str(r.batch_per_chip), str(r.images_per_step),
                 *(_size(n, unit) for n in (r.argument_bytes, r.temp_bytes, r.output_bytes,
                                            r.alias_bytes, r.peak_bytes_per_chip,
                                            r.hbm_bytes_per_chip)),
                 fits, f"{r.flops_per_chip / 1e12:.4g}"))
  widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]

  def line(cells):
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))
  lines = []
  if records:
    lines.append(f"target {records[0].topology} ({records[0].device_kind}); bytes in "
                 f"{unit_name} per chip")
  lines += [line(head)] + [line(row) for row in rows]
  lines += [f"note: {r.program}: {r.note}" for r in records if r.note]
  lines += [f"note: {n}" for n in notes]
  return "\n".join(lines)
