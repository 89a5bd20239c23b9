"""Stage II inference: refine coarse maps with DDIM (a jitted `lax.scan`) and Control-CFG.

Per batch: the frozen image/coarse features are computed once, then `ddim_sample` runs the
guided denoiser for `num_inference_steps` (ε = ε₀ + s(ε_c − ε₀), both from one batched call),
and the final latent is decoded to colours and then to class indices.

`config.diffusion.strength` < 1 runs only the last int(strength · steps) steps, from
`config.diffusion.start`: "coarse" (ours, the default: the coarse latent noised to that step,
diffusers' img2img) or "noise" (the original's pipeline: pure noise). Guidance: s = 1 runs the
conditional branch alone (one pass); any other s uses Control-CFG, including s < 1 (the
original needs s > 1: at s ≤ 1 its pipeline fails on an undefined variable). The original
batches its CFG halves as [uncond | cond], ours as [cond | uncond] (`Refiner.eps_cfg`): each
example's forward pass is independent of its batch position, so the order does not change ε
(tested).

Noise: `refine_fn(..., rng)` takes one key per example, (B,) (a single key still works: one
draw for the whole batch, as before). `refine_dataset` and `evaluate` key example `id` as
`window_keys(seed, [example_key(id)], [0])`, and whole scenes (`idgbr refine`, `scene_predictor`)
key window w of image `stem` as `window_keys(seed, [example_key(stem)], [w])`: a map depends on
the seed and its own name only, not on the batch, the batch size or the other images, and an
image of the training size refines to the same map either way.
"""
from __future__ import annotations

import copy
import functools
import zlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from idgbr_jax import diffusion
from idgbr_jax.assembly import stage2 as assembly
from idgbr_jax.data import pipeline, sources
from idgbr_jax.parallel import multihost, sharding


# The posterior draws of one example use its own key, folded with a constant tag per draw
# (image / coarse latent) that `encode_conditions` derives by splitting this key.
_DRAW_TAGS_SEED = 0


def _per_example_draws(ref, keys: jax.Array):
  """A shallow copy of `ref` whose VAE posterior draws (`latent_from_moments`) take example i's
  noise from keys[i]: its latents do not depend on the rest of the batch. The rng the copy is
  handed (a constant) only tells its draws apart."""
  keyed = copy.copy(ref)

  def latent_from_moments(moments, rng):
    tag = jax.random.key_data(rng).reshape(-1)

    def one(m, k):
      for t in range(tag.shape[0]):
        k = jax.random.fold_in(k, tag[t])
      return ref.latent_from_moments(m[None], k)[0]
    return jax.vmap(one)(moments, keys)
  keyed.latent_from_moments = latent_from_moments
  return keyed


def example_key(name: str) -> int:
  """A stable 31-bit number for an example id or image stem (CRC-32): the noise of an image
  depends on its name, not on its position among the others."""
  if isinstance(name, (bytes, np.bytes_)):
    name = bytes(name).decode()
  return zlib.crc32(str(name).encode()) & 0x7FFFFFFF


@jax.jit
def _fold(base, scenes, windows):
  return jax.vmap(lambda s, w: jax.random.fold_in(jax.random.fold_in(base, s), w))(scenes,
                                                                                   windows)


def window_keys(seed: int, scene_keys, window_indices) -> jax.Array:
  """(B,) keys: fold_in(fold_in(key(seed), scene key), window index) per row."""
  return _fold(jax.random.key(seed), np.asarray(scene_keys, np.int32),
               np.asarray(window_indices, np.int32))


def make_refine_fn(ref, config: ml_collections.ConfigDict, mesh, trainable_sh, frozen_sh, *,
                   autoencode_only: bool = False, output: str = "classes"):
  """Jitted (trainable, frozen, image, coarse, rng) -> refined class maps (uint8), or with
  `output="probs"` the label decoder's class probabilities (B, H, W, K) float32 (the softmax of
  its logits: what windows of a scene blend; see `stage1.make_scores_fn` for why
  probabilities). `rng`: (B,) keys, one per example, or one key for the batch.

  `autoencode_only=True` is the control without diffusion: the coarse map through the label
  embedding and the VAE and back (what refinement would return if it changed nothing in the
  latent), so reports can separate the autoencoder's effect from the denoiser's.
  """
  rules = tuple(config.sharding_rules)
  d = config.diffusion
  schedule = assembly.make_schedule(config)
  num_steps = int(d.num_inference_steps)
  scale = float(d.guidance_scale)
  use_cfg = scale != 1.0
  strength = float(d.get("strength", 1.0))
  # strength < 1: "coarse" (ours, img2img) starts from the noised coarse latent, "noise" (the
  # original's pipeline) skips the early steps but still starts from pure noise.
  start = diffusion.check_start(d.get("start", "coarse"))
  diffusion.start_timestep_index(num_steps, strength)  # validates before tracing
  from_coarse = strength < 1.0 and start == "coarse"
  if from_coarse and not d.use_coarse and not autoencode_only:
    raise ValueError("diffusion.strength < 1 with diffusion.start='coarse' starts from the "
                     "coarse latent; it needs diffusion.use_coarse=True (or start='noise')")
  if output not in ("classes", "probs"):
    raise ValueError(f"output={output!r}; allowed: 'classes', 'probs'")

  def finish(logits):
    if output == "probs":
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  @functools.partial(
      jax.jit,
      in_shardings=(trainable_sh, frozen_sh, sharding.batch_sharding(mesh, 4, rules),
                    sharding.batch_sharding(mesh, 3, rules), sharding.replicated(mesh)),
      out_shardings=sharding.batch_sharding(mesh, 4 if output == "probs" else 3, rules))
  def refine(trainable, frozen, image, coarse, rng):
    h = ref.latent_size(image.shape[1])
    shape = (h, h, ref.config.denoiser.in_channels)
    if rng.ndim == 1:  # one key per example
      pairs = jax.vmap(jax.random.split)(rng)
      model = _per_example_draws(ref, pairs[:, 0])
      r_cond = jax.random.key(_DRAW_TAGS_SEED)
      z_T = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(pairs[:, 1])
    else:
      model = ref
      r_cond, r_noise = jax.random.split(rng)
      z_T = jax.random.normal(r_noise, (image.shape[0],) + shape, jnp.float32)
    if autoencode_only:
      del trainable, image
      z0 = model.encode_labels(frozen, coarse, jax.random.split(r_cond)[1])
      return finish(ref.decode_logits(frozen, z0))
    cond = model.encode_conditions(frozen, image, coarse, r_cond, use_coarse=d.use_coarse)
    if from_coarse:
      z_T = diffusion.initial_latent(schedule, z_T, num_steps, strength, start,
                                     cond.coarse_latent.astype(jnp.float32))
    if use_cfg:
      eps_fn = lambda z, t: ref.eps_cfg(trainable, frozen, z, t, cond)  # noqa: E731
    else:
      eps_fn = lambda z, t: ref.eps(trainable, frozen, z, t, cond)[0]  # noqa: E731
    z0 = diffusion.ddim_sample(eps_fn, z_T, schedule, num_steps,
                               scale if use_cfg else None, strength=strength)
    return finish(ref.decode_logits(frozen, z0))

  return refine


def _batch_keys(config, ids: list[str], batch_size: int) -> jax.Array:
  names = [example_key(i) for i in ids] + [0] * (batch_size - len(ids))
  return window_keys(config.diffusion.sampling_seed, names, [0] * batch_size)


def scene_predictor(refine_fn, trainable, frozen, config, mesh):
  """`windows.run`'s `predict` for Stage II: a host batch of windows (image, coarse) ->
  (B, T, T, K) probabilities (`refine_fn` made with output="probs"), window w of a scene with
  key k sampled with `window_keys(seed, [k], [w])`."""
  rules = tuple(config.sharding_rules)

  def predict(arrays, refs):
    n = len(arrays["image"])
    pad = [0] * (n - len(refs))
    keys = window_keys(config.diffusion.sampling_seed, [s.key for s, _ in refs] + pad,
                       [w.index for _, w in refs] + pad)
    g = pipeline.to_global(multihost.host_slice(
        {"image": arrays["image"], "coarse": arrays["coarse"].astype(np.int32)}), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return multihost.to_host(refine_fn(trainable, frozen, g["image"], g["coarse"], keys))
  return predict


def refine_dataset(refine_fn, trainable, frozen, ds, config, mesh
                   ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (id, refined, coarse, label) in order. Noise is seeded per example id (module doc)."""
  rules = tuple(config.sharding_rules)
  for batch, ids, valid in pipeline.eval_batches(ds, config.eval_batch_size):
    arrays = pipeline.to_global(multihost.host_slice(
        {"image": batch["image"], "coarse": batch["coarse"].astype(np.int32)}), mesh, rules)
    keys = _batch_keys(config, ids, config.eval_batch_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      refined = multihost.to_host(refine_fn(trainable, frozen, arrays["image"], arrays["coarse"],
                                         keys))
    for j in range(valid):
      yield ids[j], refined[j], batch["coarse"][j], batch["label"][j]


def eval_split_dataset(config, split: str | None = None, max_examples: int = 0):
  split = split or config.data.eval_split
  num_classes = sources.num_classes(config.data)
  indices = np.arange(max_examples) if max_examples else None
  return pipeline.eval_dataset(config, split, num_classes,
                               coarse_dir=assembly.coarse_dir_for(config, split), indices=indices)


def evaluate(ref, trainable, frozen, config, mesh, split: str | None = None, *,
             refine_fn=None) -> dict[str, Any]:
  """Refines a split and returns the evaluation suite's report for refined and coarse maps (the
  refined one with the repair analysis of class 1 against the coarse maps). Computed on the
  mesh: the maps stay sharded, only per-image statistics reach the hosts (`metrics.mesh`).
  `refine_fn` (from `make_refine_fn` for these params' shardings) lets a caller that
  evaluates repeatedly, as a trainer does, trace and compile it once."""
  from idgbr_jax.metrics import mesh as mesh_metrics  # pylint: disable=import-outside-toplevel
  if refine_fn is None:
    refine_fn = make_refine_fn(ref, config, mesh, jax.tree.map(lambda x: x.sharding, trainable),
                               jax.tree.map(lambda x: x.sharding, frozen))
  ds = eval_split_dataset(config, split, config.get("eval_max_examples", 0))
  kwargs = sources.eval_kwargs(config.data, sources.num_classes(config.data))
  refined_eval = mesh_metrics.MeshEvaluator(**kwargs, repair_class=1)
  coarse_eval = mesh_metrics.MeshEvaluator(**kwargs)
  rules = tuple(config.sharding_rules)
  for batch, ids, valid in pipeline.eval_batches(ds, config.eval_batch_size):
    arrays = pipeline.to_global(multihost.host_slice(
        {"image": batch["image"], "coarse": batch["coarse"].astype(np.int32),
         "label": batch["label"].astype(np.int32)}), mesh, rules)
    keys = _batch_keys(config, ids[:valid], config.eval_batch_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      refined = refine_fn(trainable, frozen, arrays["image"], arrays["coarse"], keys)
    refined_eval.add(ids[:valid], refined, arrays["label"], arrays["coarse"])
    coarse_eval.add(ids[:valid], arrays["coarse"], arrays["label"])
  return {"refined": refined_eval.finish(), "coarse": coarse_eval.finish()}
