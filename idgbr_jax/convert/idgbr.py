"""The original IDGBR (PyTorch) checkpoints in and out, in its own naming.

What the original writes (`tools/train.py`):

* `checkpoint-N/` (accelerate `save_state`, its save hook): `unet_gen/` — the trained denoiser,
  a diffusers folder whose `_class_name` is `UNet2DConditionNewModel` — and `interact_net/` —
  the CG net: config.json (`InteractNet`: `in_channels` and `block_out_resolutions` with one
  entry per skip plus the mid block, `attn_layers`, `attn_heads`) and
  `diffusion_pytorch_model.safetensors` with keys `attn_blocks_down.{i}.*` / `attn_blocks_mid.*`
  (`DformerBlock`: `conv`, `attn.conv1_q`, `attn.transformer.resblocks.{j}.attn.in_proj_weight`,
  ...).
* the final pipeline folder (`save_pretrained`): the same two plus `label_embed_net/`
  (`LabelEmbedNet`: `embedding_table.weight`, `embedding_conv.{0,2}.*`), `vae/`, `unet_ori/`,
  `text_encoder/`, `tokenizer/`, `scheduler/`.
* The REPA projector (`SIDModel.projectors.0.{0,2,4}.*`, an `nn.Sequential`) is never saved by
  the original; our export writes it to `projectors.safetensors` under those names so
  `sid_model.load_state_dict(..., strict=False)` can take it.

`export_idgbr` writes exactly that layout (a `checkpoint-N`-style folder), so the original's
`load_model_hook` / `InteractNet.from_pretrained` / `LabelEmbedNet.from_pretrained` read our
weights, and `load_idgbr` reads either layout back; the round trip is exact.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from idgbr_jax import paths
from idgbr_jax.convert import diffusers_folder, files
from idgbr_jax.convert.files import ConversionError
from idgbr_jax.models import guidance as guidance_lib
from idgbr_jax.models import label_embedding, repa
from idgbr_jax.models.denoiser import DenoiserConfig

UNET_DIR, GUIDANCE_DIR, LABEL_EMBED_DIR, VAE_DIR = ("unet_gen", "interact_net",
                                                    "label_embed_net", "vae")
PROJECTOR_FILE = "projectors.safetensors"
PROJECTOR_PREFIX = "projectors.0."
WEIGHTS_FILE = diffusers_folder.WEIGHTS_STEM + ".safetensors"


def _np32(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float32), nn.meta.unbox(tree))


# ----- guidance net (InteractNet) ----------------------------------------------------------------

def _guidance_get(state_dict: Mapping[str, Any], key: str) -> np.ndarray:
  if key not in state_dict:
    raise KeyError(f"guidance state dict is missing {key!r}")
  v = state_dict[key]
  if hasattr(v, "detach"):
    v = v.detach().cpu().float().numpy()
  return np.asarray(v, np.float32)


def guidance_block_params_from_torch(state_dict: Mapping[str, Any], prefix: str = "",
                                     num_layers: int = 1) -> dict:
  """Params of one GuidanceBlock from a torch `DformerBlock` state dict (keys under `prefix`).

  torch's packed `in_proj_weight` (3W, W) is split into the separate query/key/value kernels.
  """
  g = lambda k: _guidance_get(state_dict, prefix + k)
  conv = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))
  ln = lambda k: {"scale": g(k + ".weight"), "bias": g(k + ".bias")}
  lin = lambda k: {"kernel": np.ascontiguousarray(g(k + ".weight").T), "bias": g(k + ".bias")}
  attn = {
      "pos_embedding": g("attn.positional_embedding"),
      "conv_q": {"kernel": conv(g("attn.conv1_q.weight"))},
      "conv_k": {"kernel": conv(g("attn.conv1_k.weight"))},
      "ln_pre_q": ln("attn.ln_pre_q"),
      "ln_pre_k": ln("attn.ln_pre_k"),
      "ln_post": ln("attn.ln_post"),
      "proj": {"kernel": conv(g("attn.proj.weight"))},
  }
  for i in range(num_layers):
    p = f"attn.transformer.resblocks.{i}."
    w_in, b_in = g(p + "attn.in_proj_weight"), g(p + "attn.in_proj_bias")
    width = w_in.shape[1]
    if w_in.shape[0] != 3 * width:
      raise ValueError(f"{prefix}{p}attn.in_proj_weight has shape {w_in.shape}, expected "
                       f"(3*W, W)")
    mha = {name: {"kernel": np.ascontiguousarray(w_in[j * width:(j + 1) * width].T),
                  "bias": b_in[j * width:(j + 1) * width]}
           for j, name in enumerate(("query", "key", "value"))}
    mha["out"] = lin(p + "attn.out_proj")
    attn[f"block_{i}"] = {"ln_1q": ln(p + "ln_1q"), "ln_1k": ln(p + "ln_1k"),
                          "ln_1v": ln(p + "ln_1v"), "ln_2": ln(p + "ln_2"), "mha": mha,
                          "mlp_fc": lin(p + "mlp.c_fc"), "mlp_proj": lin(p + "mlp.c_proj")}
  return {"res": {"kernel": conv(g("conv.weight")), "bias": g("conv.bias")}, "attn": attn}


def guidance_params_from_torch(state_dict: Mapping[str, Any],
                               config: guidance_lib.GuidanceConfig, prefix: str = "") -> dict:
  """Params of a GuidanceNet from the original `InteractNet` state dict
  (`attn_blocks_down.{i}.*`, `attn_blocks_mid.*`; pass `prefix='interact_net.'` for SIDModel)."""
  out = {f"skip_{i}": guidance_block_params_from_torch(
      state_dict, f"{prefix}attn_blocks_down.{i}.", config.layers)
         for i in range(len(config.skip_channels))}
  out["mid"] = guidance_block_params_from_torch(state_dict, f"{prefix}attn_blocks_mid.",
                                                config.layers)
  return out


def guidance_block_params_to_torch(block: Mapping[str, Any], prefix: str = "") -> dict:
  """One GuidanceBlock's params -> the original `DformerBlock` state dict (keys under prefix).

  Exact inverse of `guidance_block_params_from_torch`: the separate q/k/v kernels are packed
  back into torch's (3W, W) `in_proj_weight`."""
  conv = lambda w: np.ascontiguousarray(np.asarray(w).transpose(3, 2, 0, 1))  # HWIO -> OIHW
  out = {f"{prefix}conv.weight": conv(block["res"]["kernel"]),
         f"{prefix}conv.bias": np.asarray(block["res"]["bias"])}
  attn = block.get("attn")
  if attn is None:
    raise KeyError(f"guidance block {prefix!r} has no 'attn' params (the original always "
                   "holds the attention branch)")
  a = prefix + "attn."
  out[a + "positional_embedding"] = np.asarray(attn["pos_embedding"])
  out[a + "conv1_q.weight"] = conv(attn["conv_q"]["kernel"])
  out[a + "conv1_k.weight"] = conv(attn["conv_k"]["kernel"])
  for name in ("ln_pre_q", "ln_pre_k", "ln_post"):
    out[f"{a}{name}.weight"] = np.asarray(attn[name]["scale"])
    out[f"{a}{name}.bias"] = np.asarray(attn[name]["bias"])
  out[a + "proj.weight"] = conv(attn["proj"]["kernel"])
  layers = sorted((k for k in attn if k.startswith("block_")), key=lambda k: int(k[6:]))
  for i, name in enumerate(layers):
    blk, p = attn[name], f"{a}transformer.resblocks.{i}."
    mha = blk["mha"]
    out[p + "attn.in_proj_weight"] = np.ascontiguousarray(np.concatenate(
        [np.asarray(mha[n]["kernel"]).T for n in ("query", "key", "value")]))
    out[p + "attn.in_proj_bias"] = np.concatenate(
        [np.asarray(mha[n]["bias"]) for n in ("query", "key", "value")])
    out[p + "attn.out_proj.weight"] = np.ascontiguousarray(np.asarray(mha["out"]["kernel"]).T)
    out[p + "attn.out_proj.bias"] = np.asarray(mha["out"]["bias"])
    for ln in ("ln_1q", "ln_1k", "ln_1v", "ln_2"):
      out[f"{p}{ln}.weight"] = np.asarray(blk[ln]["scale"])
      out[f"{p}{ln}.bias"] = np.asarray(blk[ln]["bias"])
    for mine, theirs in (("mlp_fc", "mlp.c_fc"), ("mlp_proj", "mlp.c_proj")):
      out[f"{p}{theirs}.weight"] = np.ascontiguousarray(np.asarray(blk[mine]["kernel"]).T)
      out[f"{p}{theirs}.bias"] = np.asarray(blk[mine]["bias"])
  return out


def guidance_params_to_torch(params: Mapping[str, Any], config: guidance_lib.GuidanceConfig,
                             prefix: str = "") -> dict[str, np.ndarray]:
  """GuidanceNet params -> the original `InteractNet` state dict (`attn_blocks_down.{i}.*`,
  `attn_blocks_mid.*`; `prefix='interact_net.'` gives the `SIDModel` names)."""
  params = _np32(params)
  out = {}
  for i in range(len(config.skip_channels)):
    out.update(guidance_block_params_to_torch(params[f"skip_{i}"],
                                              f"{prefix}attn_blocks_down.{i}."))
  out.update(guidance_block_params_to_torch(params["mid"], f"{prefix}attn_blocks_mid."))
  return out


def _guidance_abstract(config: guidance_lib.GuidanceConfig) -> dict:
  def feats(c, r):
    return jax.ShapeDtypeStruct((1, r, r, c), jnp.float32)
  skips = tuple(feats(c, r) for c, r in zip(config.skip_channels, config.skip_resolutions))
  mid = feats(config.mid_channels, config.mid_resolution)
  boxed = jax.eval_shape(guidance_lib.GuidanceNet(config).init, jax.random.PRNGKey(0), skips, mid,
                         skips, mid, skips, mid)
  return nn.unbox(boxed)["params"]


def _check_tree(params, abstract, what: str):
  got = traverse_util.flatten_dict(params, sep="/")
  want = traverse_util.flatten_dict(abstract, sep="/")
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"{what}: params missing {missing[:8]}, unexpected {extra[:8]}")
  for k, v in want.items():
    if tuple(np.shape(got[k])) != tuple(v.shape):
      raise ValueError(f"{what}: shape mismatch for {k}: expected {tuple(v.shape)}, got "
                       f"{tuple(np.shape(got[k]))}")


def guidance_config_from_interactnet(config_json: Mapping[str, Any],
                                     state_dict: Mapping[str, Any]) -> guidance_lib.GuidanceConfig:
  """GuidanceConfig from an `InteractNet` config.json; the attention width (hard-coded 512 in
  the original) and MLP ratio are read off the weights. `init_mode='code'` (+ skipping the
  branch) when every attention weight is exactly zero, as the released code leaves them."""
  chans = [int(c) for c in config_json.get("in_channels", ())]
  res = [int(r) for r in config_json.get("block_out_resolutions", ())]
  if not chans or len(chans) != len(res):
    raise ValueError(f"InteractNet config needs in_channels and block_out_resolutions of equal "
                     f"length (one per skip, then the mid block); got {len(chans)} / {len(res)}")
  key = "attn_blocks_mid.attn.ln_post.weight"
  if key not in state_dict:
    raise KeyError(f"InteractNet state dict is missing {key!r}")
  width = int(np.shape(state_dict[key])[0])
  fc = "attn_blocks_mid.attn.transformer.resblocks.0.mlp.c_fc.weight"
  mlp_ratio = int(np.shape(state_dict[fc])[0]) // width if fc in state_dict else 4
  inert = all(not np.any(files.to_numpy(v)) for k, v in state_dict.items()
              if ".attn." in k and k.startswith(("attn_blocks_down.", "attn_blocks_mid.")))
  return guidance_lib.GuidanceConfig(
      skip_channels=tuple(chans[:-1]), mid_channels=chans[-1],
      skip_resolutions=tuple(res[:-1]), mid_resolution=res[-1], width=width,
      heads=int(config_json.get("attn_heads", 8)), mlp_ratio=mlp_ratio,
      layers=int(config_json.get("attn_layers", 1)), init_mode="code" if inert else "paper",
      skip_inert_attention=inert)


def interactnet_config_json(config: guidance_lib.GuidanceConfig,
                            layers_per_block: int = 2) -> dict[str, Any]:
  """`InteractNet` config.json for a GuidanceConfig (its constructor arguments)."""
  return {"_class_name": "InteractNet",
          "_diffusers_version": diffusers_folder.DIFFUSERS_VERSION,
          "conditioning_channels": 3,
          "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
          "in_channels": list(config.skip_channels) + [config.mid_channels],
          "block_out_resolutions": list(config.skip_resolutions) + [config.mid_resolution],
          "layers_per_block": int(layers_per_block),
          "attn_layers": int(config.layers),
          "attn_heads": int(config.heads)}


def guidance_params_from_state_dict(state_dict: Mapping[str, Any],
                                    config: guidance_lib.GuidanceConfig) -> dict:
  """GuidanceNet params from an InteractNet state dict; strict (every key used, shapes checked).
  """
  sd = {k: files.to_numpy(v) for k, v in state_dict.items()}
  params = _np32(guidance_params_from_torch(sd, config))
  _check_tree(params, _guidance_abstract(config), "InteractNet")
  expected = guidance_params_to_torch(params, config)
  extra = sorted(set(sd) - set(expected))
  if extra:
    raise ValueError(f"unexpected InteractNet keys {extra[:8]}")
  return params


def load_interactnet(path: str) -> tuple[guidance_lib.GuidanceNet, dict]:
  """An `interact_net/` folder -> (GuidanceNet, params)."""
  cfg_json = diffusers_folder.read_config(path)
  where = files.join(path, "config.json")
  if cfg_json.get("_class_name") != "InteractNet":
    raise ConversionError(f"{where}: _class_name {cfg_json.get('_class_name')!r} is not "
                          "'InteractNet'")
  weights = files.find_weights(path, (diffusers_folder.WEIGHTS_STEM,))
  sd = files.read_state_dict(weights)
  try:
    config = guidance_config_from_interactnet(cfg_json, sd)
    params = guidance_params_from_state_dict(sd, config)
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{weights}: {e.args[0] if e.args else e}") from e
  return guidance_lib.GuidanceNet(config), params


def save_interactnet(path: str, config: guidance_lib.GuidanceConfig, params,
                     layers_per_block: int = 2) -> str:
  paths.makedirs(path)
  files.write_safetensors(files.join(path, WEIGHTS_FILE),
                          guidance_params_to_torch(params, config))
  files.write_json(files.join(path, "config.json"),
                   interactnet_config_json(config, layers_per_block))
  return path


# ----- label embedding (LabelEmbedNet) ---------------------------------------------------------

def label_embed_params_from_torch(state_dict,
                                  config: label_embedding.LabelEmbedConfig | None = None) -> dict:
  """Params from the original `LabelEmbedNet` state dict (`embedding_table.weight`,
  `embedding_conv.{0,2}.{weight,bias}`), e.g. the released `labelembednet{2,8}` safetensors."""
  def get(key):
    if key not in state_dict:
      raise KeyError(f"label embedding state dict is missing {key!r}")
    return np.asarray(state_dict[key], np.float32)

  table = get("embedding_table.weight")
  if config is not None and table.shape != (config.num_classes, 3):
    raise ValueError(f"embedding_table.weight has shape {table.shape}, config expects "
                     f"({config.num_classes}, 3)")
  conv = lambda w: w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return {
      "embedding": table,
      "decoder_hidden": {"kernel": conv(get("embedding_conv.0.weight")),
                         "bias": get("embedding_conv.0.bias")},
      "decoder_out": {"kernel": conv(get("embedding_conv.2.weight")),
                      "bias": get("embedding_conv.2.bias")},
  }


def label_embed_params_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """LabelEmbedding params -> `LabelEmbedNet` state dict (inverse of
  `label_embed_params_from_torch`)."""
  p = _np32(params)
  conv = lambda w: np.ascontiguousarray(w.transpose(3, 2, 0, 1))
  return {"embedding_table.weight": p["embedding"],
          "embedding_conv.0.weight": conv(p["decoder_hidden"]["kernel"]),
          "embedding_conv.0.bias": p["decoder_hidden"]["bias"],
          "embedding_conv.2.weight": conv(p["decoder_out"]["kernel"]),
          "embedding_conv.2.bias": p["decoder_out"]["bias"]}


def label_embed_from_state_dict(state_dict: Mapping[str, Any], num_classes: int | None = None):
  """(LabelEmbedConfig, params) from a LabelEmbedNet state dict; strict about keys."""
  sd = {k: files.to_numpy(v) for k, v in state_dict.items()}
  if "embedding_table.weight" not in sd:
    raise KeyError("LabelEmbedNet state dict is missing 'embedding_table.weight'")
  table = sd["embedding_table.weight"]
  if table.ndim != 2 or table.shape[1] != 3:
    raise ValueError(f"embedding_table.weight has shape {table.shape}; the port needs "
                     "(num_classes, 3) (label_emb_inchannels=3)")
  if "embedding_conv.0.weight" not in sd:
    raise KeyError("LabelEmbedNet state dict is missing 'embedding_conv.0.weight'")
  config = label_embedding.LabelEmbedConfig(
      num_classes=int(num_classes or table.shape[0]),
      hidden=int(np.shape(sd["embedding_conv.0.weight"])[0]))
  params = _np32(label_embed_params_from_torch(sd, config))
  model = label_embedding.LabelEmbedding(config)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                     jnp.zeros((1, 2, 2), jnp.int32)))["params"]
  _check_tree(params, abstract, "LabelEmbedNet")
  extra = sorted(set(sd) - set(label_embed_params_to_torch(params)))
  if extra:
    raise ValueError(f"unexpected LabelEmbedNet keys {extra[:8]}")
  return config, params


def load_label_embed(path: str):
  """A `labelembednet{2,8}` / `label_embed_net` folder (config.json + safetensors), or a bare
  `.safetensors` file -> (LabelEmbedding module, params)."""
  path = os.fspath(path)
  num_classes = None
  if files.is_dir(path):
    cfg_json = diffusers_folder.read_config(path)
    where = files.join(path, "config.json")
    if cfg_json.get("_class_name") != "LabelEmbedNet":
      raise ConversionError(f"{where}: _class_name {cfg_json.get('_class_name')!r} is not "
                            "'LabelEmbedNet'")
    if int(cfg_json.get("label_emb_inchannels", 3)) != 3:
      raise ConversionError(f"{where}: label_emb_inchannels must be 3 (an RGB image for the VAE)")
    num_classes = cfg_json.get("num_classes")
    weights = files.find_weights(path, (diffusers_folder.WEIGHTS_STEM,))
  else:
    weights = path
  sd = files.read_state_dict(weights)
  try:
    config, params = label_embed_from_state_dict(sd, num_classes)
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{weights}: {e.args[0] if e.args else e}") from e
  return label_embedding.LabelEmbedding(config), params


def save_label_embed(path: str, params) -> str:
  sd = label_embed_params_to_torch(params)
  paths.makedirs(path)
  files.write_safetensors(files.join(path, WEIGHTS_FILE), sd)
  files.write_json(files.join(path, "config.json"), {
      "_class_name": "LabelEmbedNet", "_diffusers_version": diffusers_folder.DIFFUSERS_VERSION,
      "bit_scale": 1, "label_emb_inchannels": 3,
      "num_classes": int(sd["embedding_table.weight"].shape[0])})
  return path


# ----- projector ---------------------------------------------------------------------------------

def projector_params_from_torch(state_dict, prefix: str = PROJECTOR_PREFIX) -> dict:
  """Params for `Projector` from the original's `build_mlp` (nn.Sequential indices 0, 2, 4)."""
  out = {}
  for name, idx in (("fc1", 0), ("fc2", 2), ("fc3", 4)):
    wk, bk = f"{prefix}{idx}.weight", f"{prefix}{idx}.bias"
    for k in (wk, bk):
      if k not in state_dict:
        raise KeyError(f"projector state dict is missing {k!r}")
    out[name] = {"kernel": np.asarray(state_dict[wk], np.float32).T,
                 "bias": np.asarray(state_dict[bk], np.float32)}
  return out


def projector_params_to_torch(params: Mapping[str, Any],
                              prefix: str = PROJECTOR_PREFIX) -> dict[str, np.ndarray]:
  """Projector params -> the original's `build_mlp` Sequential (indices 0, 2, 4)."""
  p = _np32(params)
  out = {}
  for name, idx in (("fc1", 0), ("fc2", 2), ("fc3", 4)):
    out[f"{prefix}{idx}.weight"] = np.ascontiguousarray(p[name]["kernel"].T)
    out[f"{prefix}{idx}.bias"] = p[name]["bias"]
  return out


def load_projector(path: str, prefix: str = PROJECTOR_PREFIX) -> tuple[repa.Projector, dict]:
  """A projector state dict file (`projectors.0.{0,2,4}.*`) -> (Projector, params)."""
  sd = files.read_state_dict(path)
  try:
    params = _np32(projector_params_from_torch(sd, prefix))
    extra = sorted(k for k in sd if k.startswith("projectors.") and
                   k not in projector_params_to_torch(params, prefix))
    if extra:
      raise ValueError(f"unexpected projector keys {extra[:8]} (more than one projector?)")
    for a, b in (("fc1", "fc2"), ("fc2", "fc3")):
      if params[a]["kernel"].shape[1] != params[b]["kernel"].shape[0]:
        raise ValueError(f"projector layers do not chain: {a} out "
                         f"{params[a]['kernel'].shape[1]} != {b} in "
                         f"{params[b]['kernel'].shape[0]}")
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{path}: {e.args[0] if e.args else e}") from e
  return repa.Projector(params["fc1"]["kernel"].shape[1], params["fc3"]["kernel"].shape[1]), params


# ----- whole checkpoints -----------------------------------------------------------------------

class IdgbrParts(NamedTuple):
  """What an original IDGBR folder holds; each entry is (module, params) or None."""
  unet: Any
  guidance: Any
  label_embed: Any
  vae: Any
  projector: Any


def load_idgbr(path: str | os.PathLike) -> IdgbrParts:
  """Reads an original IDGBR checkpoint (`checkpoint-N/`) or pipeline output folder.

  `unet_gen/` and `interact_net/` are required; `label_embed_net/`, `vae/` and
  `projectors.safetensors` are read when present. A bare `labelembednet{2,8}` folder is not a
  checkpoint: use `load_label_embed`.
  """
  path = os.fspath(path)
  if not files.is_dir(path):
    raise ConversionError(f"{path}: not a directory")
  missing = [d for d in (UNET_DIR, GUIDANCE_DIR) if not files.is_dir(files.join(path, d))]
  if missing:
    raise ConversionError(f"{path}: not an IDGBR checkpoint, missing {missing} (expected the "
                          f"original's checkpoint-N/ or pipeline folder: {UNET_DIR}/, "
                          f"{GUIDANCE_DIR}/, optionally {LABEL_EMBED_DIR}/, {VAE_DIR}/)")
  unet = diffusers_folder.load_diffusers(files.join(path, UNET_DIR))
  if not isinstance(unet[0].config, DenoiserConfig):
    raise ConversionError(f"{files.join(path, UNET_DIR)}: not a UNet")
  guid = load_interactnet(files.join(path, GUIDANCE_DIR))
  skips = tuple(unet[0].config.skip_channels)
  if guid[0].config.skip_channels != skips:
    raise ConversionError(f"{files.join(path, GUIDANCE_DIR)}: skip channels "
                          f"{guid[0].config.skip_channels} do not match unet_gen's {skips}")
  opt = lambda name, fn: (fn(files.join(path, name))
                          if paths.exists(files.join(path, name)) else None)
  return IdgbrParts(unet=unet, guidance=guid, label_embed=opt(LABEL_EMBED_DIR, load_label_embed),
                    vae=opt(VAE_DIR, diffusers_folder.load_diffusers),
                    projector=opt(PROJECTOR_FILE, load_projector))


def export_idgbr(path: str | os.PathLike, *, unet_config: DenoiserConfig, unet_params,
                 guidance_config: guidance_lib.GuidanceConfig, guidance_params,
                 projector_params=None, label_embed_params=None, vae_config=None,
                 vae_params=None) -> str:
  """Writes our weights in the original's layout (see the module doc) under `path`.

  `path` can be passed to the original's `load_model_hook` as a checkpoint dir (`unet_gen/`,
  `interact_net/`); `label_embed_net/` and `vae/` load with `from_pretrained`."""
  path = os.fspath(path)
  paths.makedirs(path)
  diffusers_folder.save_diffusers(files.join(path, UNET_DIR), unet_config, unet_params,
                                  class_name="UNet2DConditionNewModel")
  save_interactnet(files.join(path, GUIDANCE_DIR), guidance_config, guidance_params,
                   unet_config.layers_per_block)
  if projector_params is not None:
    files.write_safetensors(files.join(path, PROJECTOR_FILE),
                            projector_params_to_torch(projector_params))
  if label_embed_params is not None:
    save_label_embed(files.join(path, LABEL_EMBED_DIR), label_embed_params)
  if vae_params is not None:
    diffusers_folder.save_diffusers(files.join(path, VAE_DIR), vae_config, vae_params)
  return path
