"""DINOv2 checkpoints (PyTorch) -> `idgbr_jax.models.dinov2.DinoV2` params (numpy only).

Two layouts:
* transformers `Dinov2Model` state dicts: both the current names (`attention.q_proj`,
  `mlp.gate_proj/up_proj/down_proj`, transformers >= 5) and the hub-file names
  (`attention.attention.query`, `attention.output.dense`, `mlp.weights_in/weights_out`);
* facebookresearch `dinov2_vit*14_pretrain.pth` (`blocks.N.attn.qkv`, `ls1.gamma`,
  `mlp.w12/w3`, ...), which is what IDGBR loads.

Every expected tensor must be present with the shape the config implies, and nothing unknown
may be left over (like `load_state_dict(strict=True)`); errors name the offending key. The
unused `mask_token` (iBOT masking) is dropped. Remember the position-interpolation convention
differs between the two sources (`DinoV2Config.interpolate_offset`, see the model's doc).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idgbr_jax.models.dinov2 import DinoV2, DinoV2Config

_IGNORED = ("mask_token", "embeddings.mask_token")


def _np(v) -> np.ndarray:
  if hasattr(v, "detach"):
    v = v.detach().cpu().float().numpy()
  return np.asarray(v, np.float32)


class _Reader:
  """Pops tensors from a state dict, remembering which were used."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self.sd = state_dict
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return key in self.sd

  def __call__(self, key: str) -> np.ndarray:
    if key not in self.sd:
      raise KeyError(f"DINOv2 state dict is missing {key!r}")
    self.used.add(key)
    return _np(self.sd[key])

  def check_leftovers(self):
    extra = sorted(k for k in self.sd if k not in self.used and k not in _IGNORED)
    if extra:
      raise ValueError(f"unexpected DINOv2 state dict keys (unsupported layout or config?): "
                       f"{extra[:10]}{' ...' if len(extra) > 10 else ''}")


def _expected_shapes(config: DinoV2Config) -> dict:
  x = jax.ShapeDtypeStruct((1, config.patch_size, config.patch_size, 3), jnp.float32)
  boxed = jax.eval_shape(DinoV2(config).init, jax.random.PRNGKey(0), x)
  return jax.tree.map(lambda s: s.shape, nn.unbox(boxed)["params"])


def _check_shapes(params: dict, sources: dict, config: DinoV2Config) -> dict:
  expected = _expected_shapes(config)
  flat_e = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
      expected, is_leaf=lambda x: isinstance(x, tuple))}
  flat_p = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
  missing = sorted(set(flat_e) - set(flat_p))
  if missing:
    raise KeyError(f"converted DINOv2 params lack {missing[:5]} (depth/ffn mismatch?)")
  for path, arr in flat_p.items():
    if path not in flat_e:
      raise ValueError(f"{sources.get(path, path)!r} has no place in the config's model")
    if tuple(arr.shape) != tuple(flat_e[path]):
      raise ValueError(f"{sources.get(path, path)!r}: shape {tuple(arr.shape)} but the config "
                       f"expects {tuple(flat_e[path])}")
  return params


class _Builder:
  """Nested param dict plus the torch key each leaf came from (for error messages)."""

  def __init__(self):
    self.params: dict = {}
    self.sources: dict[str, str] = {}

  def put(self, path: tuple[str, ...], value: np.ndarray, source: str):
    d = self.params
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = np.ascontiguousarray(value)
    self.sources["".join(f"[{k!r}]" for k in path)] = source

  def linear(self, path, r: _Reader, key: str, bias: bool = True):
    self.put(path + ("kernel",), r(key + ".weight").T, key + ".weight")
    if bias:
      self.put(path + ("bias",), r(key + ".bias"), key + ".bias")

  def norm(self, path, r: _Reader, key: str):
    self.put(path + ("scale",), r(key + ".weight"), key + ".weight")
    self.put(path + ("bias",), r(key + ".bias"), key + ".bias")

  def split_linear(self, paths, r: _Reader, key: str, has_bias: bool = True):
    """A packed (n*D, in) torch Linear split into n consecutive output blocks."""
    w = r(key + ".weight")
    b = r(key + ".bias") if has_bias else None
    n = len(paths)
    if w.shape[0] % n:
      raise ValueError(f"{key}.weight has {w.shape[0]} rows, not divisible into {n} parts")
    d = w.shape[0] // n
    for i, path in enumerate(paths):
      self.put(path + ("kernel",), w[i * d:(i + 1) * d].T, f"{key}.weight[{i}]")
      if b is not None:
        self.put(path + ("bias",), b[i * d:(i + 1) * d], f"{key}.bias[{i}]")


def _num_layers(sd: Mapping[str, Any], pattern: str) -> int:
  idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
  return max(idx) + 1 if idx else 0


def _check_depth(found: int, config: DinoV2Config):
  if found != config.depth:
    raise ValueError(f"state dict has {found} blocks but config.depth is {config.depth}")


def dinov2_params_from_transformers(state_dict: Mapping[str, Any], config: DinoV2Config) -> dict:
  """Params from a transformers `Dinov2Model` state dict (optionally prefixed `dinov2.`)."""
  if any(k.startswith("dinov2.") for k in state_dict):
    state_dict = {k[len("dinov2."):]: v for k, v in state_dict.items() if k.startswith("dinov2.")}
  r, out = _Reader(state_dict), _Builder()
  _check_depth(_num_layers(state_dict, r"encoder\.layer\.(\d+)\."), config)
  out.put(("cls_token",), r("embeddings.cls_token"), "embeddings.cls_token")
  out.put(("pos_embed",), r("embeddings.position_embeddings"), "embeddings.position_embeddings")
  key = "embeddings.patch_embeddings.projection"
  out.put(("patch_embed", "kernel"), r(key + ".weight").transpose(2, 3, 1, 0), key + ".weight")
  out.put(("patch_embed", "bias"), r(key + ".bias"), key + ".bias")
  for i in range(config.depth):
    p, blk = f"encoder.layer.{i}.", (f"blocks_{i}",)
    out.norm(blk + ("norm1",), r, p + "norm1")
    out.norm(blk + ("norm2",), r, p + "norm2")
    old = r.has(p + "attention.attention.query.weight")
    for name, new_key, old_key in (("query", "q_proj", "attention.query"),
                                   ("key", "k_proj", "attention.key"),
                                   ("value", "v_proj", "attention.value")):
      out.linear(blk + ("attn", name), r, p + "attention." + (old_key if old else new_key),
                 bias=config.qkv_bias)
    out.linear(blk + ("attn", "out"), r,
               p + ("attention.output.dense" if old else "attention.o_proj"))
    out.put(blk + ("ls1",), r(p + "layer_scale1.lambda1"), p + "layer_scale1.lambda1")
    out.put(blk + ("ls2",), r(p + "layer_scale2.lambda1"), p + "layer_scale2.lambda1")
    mlp = blk + ("mlp",)
    if config.ffn == "mlp":
      out.linear(mlp + ("fc1",), r, p + "mlp.fc1")
      out.linear(mlp + ("fc2",), r, p + "mlp.fc2")
    elif r.has(p + "mlp.weights_in.weight"):  # hub files: packed [gate; up]
      out.split_linear((mlp + ("gate",), mlp + ("up",)), r, p + "mlp.weights_in")
      out.linear(mlp + ("down",), r, p + "mlp.weights_out")
    else:
      out.linear(mlp + ("gate",), r, p + "mlp.gate_proj")
      out.linear(mlp + ("up",), r, p + "mlp.up_proj")
      out.linear(mlp + ("down",), r, p + "mlp.down_proj")
  out.norm(("norm",), r, "layernorm")
  r.check_leftovers()
  return _check_shapes(out.params, out.sources, config)


def dinov2_params_from_official(state_dict: Mapping[str, Any], config: DinoV2Config) -> dict:
  """Params from a facebookresearch dinov2 checkpoint (`dinov2_vit*14_pretrain.pth` layout).

  Accepts a `{'model': ...}`/`{'state_dict': ...}` wrapper and a `block_chunks>0` layout
  (`blocks.<chunk>.<i>.`). Register-token checkpoints are rejected (no registers here).
  """
  for wrapper in ("model", "state_dict", "teacher"):
    if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
      state_dict = state_dict[wrapper]
      break
  if "register_tokens" in state_dict:
    raise ValueError("'register_tokens' present: DINOv2-with-registers is not supported")
  # block_chunks > 0 saves blocks as blocks.<chunk>.<global index>.; flatten to blocks.<i>.
  state_dict = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in
                state_dict.items()}
  r, out = _Reader(state_dict), _Builder()
  _check_depth(_num_layers(state_dict, r"blocks\.(\d+)\."), config)
  out.put(("cls_token",), r("cls_token"), "cls_token")
  out.put(("pos_embed",), r("pos_embed"), "pos_embed")
  out.put(("patch_embed", "kernel"), r("patch_embed.proj.weight").transpose(2, 3, 1, 0),
          "patch_embed.proj.weight")
  out.put(("patch_embed", "bias"), r("patch_embed.proj.bias"), "patch_embed.proj.bias")
  for i in range(config.depth):
    p, blk = f"blocks.{i}.", (f"blocks_{i}",)
    out.norm(blk + ("norm1",), r, p + "norm1")
    out.norm(blk + ("norm2",), r, p + "norm2")
    attn = blk + ("attn",)
    out.split_linear((attn + ("query",), attn + ("key",), attn + ("value",)), r, p + "attn.qkv",
                     has_bias=config.qkv_bias)
    out.linear(attn + ("out",), r, p + "attn.proj")
    out.put(blk + ("ls1",), r(p + "ls1.gamma"), p + "ls1.gamma")
    out.put(blk + ("ls2",), r(p + "ls2.gamma"), p + "ls2.gamma")
    mlp = blk + ("mlp",)
    if config.ffn == "mlp":
      out.linear(mlp + ("fc1",), r, p + "mlp.fc1")
      out.linear(mlp + ("fc2",), r, p + "mlp.fc2")
    else:  # SwiGLUFFNFused: w12 = [x1 (silu'd); x2], w3 = down
      out.split_linear((mlp + ("gate",), mlp + ("up",)), r, p + "mlp.w12")
      out.linear(mlp + ("down",), r, p + "mlp.w3")
  out.norm(("norm",), r, "norm")
  r.check_leftovers()
  return _check_shapes(out.params, out.sources, config)


# ----- files -------------------------------------------------------------------------------------

# Official DINOv2 backbones use 64-wide heads (vits14: 6, vitb14: 12, vitl14: 16, vitg14: 24);
# a .pth holds no head count, so it is inferred from this unless given.
OFFICIAL_HEAD_DIM = 64


def _ffn_mlp_ratio(embed_dim: int, hidden: int, ffn: str) -> float:
  """An mlp_ratio for which `DinoV2Config.ffn_hidden` equals the stored hidden width."""
  if ffn == "mlp":
    return hidden / embed_dim
  for ratio in (4.0, hidden * 1.5 / embed_dim, hidden / embed_dim):
    if DinoV2Config(embed_dim=embed_dim, depth=1, num_heads=1, mlp_ratio=ratio,
                    ffn=ffn).ffn_hidden == hidden:
      return ratio
  raise ValueError(f"no mlp_ratio gives a SwiGLU hidden width of {hidden} for embed_dim "
                   f"{embed_dim}")


def config_from_official(state_dict: Mapping[str, Any], num_heads: int | None = None,
                         **overrides) -> DinoV2Config:
  """A DinoV2Config read off a facebookresearch state dict's shapes (offset 0.1 convention)."""
  sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state_dict.items()}
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
    if key not in sd:
      raise KeyError(f"DINOv2 state dict is missing {key!r} (not the facebookresearch layout?)")
  embed_dim = int(np.shape(sd["cls_token"])[-1])
  patch = int(np.shape(sd["patch_embed.proj.weight"])[-1])
  grid = int(round(math.sqrt(np.shape(sd["pos_embed"])[1] - 1)))
  if "blocks.0.mlp.w12.weight" in sd:
    ffn, hidden = "swiglu", int(np.shape(sd["blocks.0.mlp.w3.weight"])[1])
  else:
    ffn, hidden = "mlp", int(np.shape(sd["blocks.0.mlp.fc1.weight"])[0])
  kwargs = dict(embed_dim=embed_dim, depth=_num_layers(sd, r"blocks\.(\d+)\."),
                num_heads=num_heads or max(1, embed_dim // OFFICIAL_HEAD_DIM),
                mlp_ratio=_ffn_mlp_ratio(embed_dim, hidden, ffn), ffn=ffn, patch_size=patch,
                img_size=grid * patch, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                interpolate_offset=0.1)
  kwargs.update(overrides)
  return DinoV2Config(**kwargs)


def config_from_transformers(config_json: Mapping[str, Any], **overrides) -> DinoV2Config:
  """A DinoV2Config from a transformers `Dinov2Model` config.json (offset 0.0 convention)."""
  if config_json.get("model_type", "dinov2") != "dinov2":
    raise ValueError(f"model_type {config_json.get('model_type')!r} is not 'dinov2'")
  if config_json.get("num_register_tokens"):
    raise ValueError("DINOv2-with-registers is not supported")
  act = config_json.get("hidden_act", "gelu")
  swiglu = bool(config_json.get("use_swiglu_ffn", False))
  if not swiglu and act != "gelu":
    raise ValueError(f"hidden_act {act!r} is not supported (only 'gelu')")
  embed_dim = int(config_json.get("hidden_size", 768))
  kwargs = dict(embed_dim=embed_dim, depth=int(config_json.get("num_hidden_layers", 12)),
                num_heads=int(config_json.get("num_attention_heads", 12)),
                mlp_ratio=float(config_json.get("mlp_ratio", 4)),
                ffn="swiglu" if swiglu else "mlp",
                patch_size=int(config_json.get("patch_size", 14)),
                img_size=int(config_json.get("image_size", 518)),
                layerscale_init=float(config_json.get("layerscale_value", 1.0)),
                layer_norm_eps=float(config_json.get("layer_norm_eps", 1e-6)),
                qkv_bias=bool(config_json.get("qkv_bias", True)), interpolate_offset=0.0)
  kwargs.update(overrides)
  return DinoV2Config(**kwargs)


def load_dinov2(path, *, num_heads: int | None = None, dtype=None, **overrides):
  """Reads DINOv2 weights: an official `.pth` (e.g. `dinov2_vitg14_pretrain.pth`, what IDGBR
  loads) or a transformers `Dinov2Model` folder (config.json + model.safetensors / .bin).

  The config is read off the file: for a `.pth`, from tensor shapes, with
  `num_heads = embed_dim // 64` (all official backbones) unless given; `overrides` set any other
  DinoV2Config field (e.g. `interpolate_offset`).

  Returns:
    (DinoV2 module, float32 params).

  Raises:
    ConversionError: naming the file and the offending key.
  """
  # pylint: disable=import-outside-toplevel
  import os

  from idgbr_jax.convert import files
  path = os.fspath(path)
  try:
    if files.is_dir(path):
      config_path = files.join(path, "config.json")
      cfg_json = files.read_json(config_path)
      try:
        config = config_from_transformers(cfg_json, **overrides)
      except ValueError as e:
        raise files.ConversionError(f"{config_path}: {e}") from e
      where = files.find_weights(path, ("model", "pytorch_model"))
      params = dinov2_params_from_transformers(files.read_state_dict(where), config)
    else:
      where = path
      sd = files.read_state_dict(path)
      config = config_from_official(sd, num_heads, **overrides)
      params = dinov2_params_from_official(sd, config)
  except files.ConversionError:
    raise
  except (ValueError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise files.ConversionError(f"{where}: {msg}") from e
  kw = {} if dtype is None else {"dtype": dtype}
  return DinoV2(config, **kw), jax.tree.map(lambda x: np.asarray(x, np.float32), params)
