"""Optimizers from config (optax): AdamW, warmup+cosine or constant schedule, global-norm clip."""
from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  if cfg.schedule == "warmup_cosine":
    warmup = min(cfg.warmup_steps, max(num_train_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(num_train_steps, warmup + 1), end_value=0.0)
  if cfg.schedule == "warmup_constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
         optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.learning_rate)
  raise ValueError(f"config.optim.schedule={cfg.schedule!r}; allowed: warmup_cosine, "
                   "warmup_constant, constant")


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(cfg: ml_collections.ConfigDict, num_train_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (torch defaults eps=1e-8; the default) or plain SGD (`cfg.optimizer="sgd"`, e.g. to
  compare updates across device counts: its step is lr * gradient, which Adam's is not), after
  clipping the global gradient norm."""
  schedule = learning_rate_schedule(cfg, num_train_steps)
  chain = []
  if cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  name = cfg.get("optimizer", "adamw")
  if name == "adamw":
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.get("eps", 1e-8),
                             weight_decay=cfg.weight_decay))
  elif name == "sgd":
    chain.append(optax.sgd(schedule))
  else:
    raise ValueError(f"config.optim.optimizer={name!r}; allowed: {OPTIMIZERS}")
  return optax.chain(*chain), schedule
