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

The original's inference (`tools/infer.py`) loads a checkpoint dir's `unet_gen/` and
`interact_net/`, and takes `tokenizer/`, `text_encoder/`, `vae/`, `scheduler/` and `unet_ori/`
from the experiment root only if it holds all five, else from `--base_model_name_or_path` (SD);
`label_embed_net/` from the root, else `--label_embed_dir`. `unet_ori` is loaded as a
`UNet2DConditionEncodeModel` (no up path) from `unet_ori/`, or from the base's whole `unet/`.

`export_idgbr` writes that layout (a `checkpoint-N`-style folder that is its own experiment
root): `unet_gen/`, `interact_net/`, `label_embed_net/`, `vae/`, `unet_ori/` (the whole initial
UNet), `scheduler/` (DDIMScheduler config), `text_encoder/` + `tokenizer/` (a layer-free CLIP
text model whose output is the run's context, `clip_context.constant_text_encoder`), so
`tools/infer.py --model_path=<export>` refines with our weights only; plus, ignored by the
original, `projectors.safetensors`, `context.npy` (the exact context) and `idgbr_jax.json` (our
refinement settings). `load_idgbr` reads either layout back; the round trip is exact.
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
from idgbr_jax.convert import diffusers_folder, diffusers_unet, files
from idgbr_jax.convert.files import ConversionError
from idgbr_jax.models import guidance as guidance_lib
from idgbr_jax.models import label_embedding, repa
from idgbr_jax.models.denoiser import DenoiserConfig, UNet2DConditionModel

UNET_DIR, GUIDANCE_DIR, LABEL_EMBED_DIR, VAE_DIR = ("unet_gen", "interact_net",
                                                    "label_embed_net", "vae")
UNET_ORI_DIR, SCHEDULER_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR = ("unet_ori", "scheduler",
                                                                "text_encoder", "tokenizer")
# What the original's inference needs beside a checkpoint, else it takes all of them from
# --base_model_name_or_path (tools/infer.py: _resolve_base_source).
BASE_COMPONENTS = (TOKENIZER_DIR, TEXT_ENCODER_DIR, VAE_DIR, SCHEDULER_DIR, UNET_ORI_DIR)
ENCODE_CLASS = "UNet2DConditionEncodeModel"  # the original's unet_ori class (no up path)
# Ours, ignored by the original: the exact text context and the refinement settings.
CONTEXT_FILE = "context.npy"
SETTINGS_FILE = "idgbr_jax.json"
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


# ----- the frozen encoder copy (unet_ori) -------------------------------------------------------

def load_unet_ori(path: str):
  """A `unet_ori/` (the original pipeline's `UNet2DConditionEncodeModel`: the encoder half
  only) or a whole UNet folder (SD's `unet/`, or our export's `unet_ori/`) ->
  (UNet2DConditionModel, params, encoder_only). The encoder half is what unet_ori is used for;
  a whole UNet's up path is kept so it can be exported again."""
  cfg_json = diffusers_folder.read_config(path)
  where = files.join(path, "config.json")
  name = cfg_json.get("_class_name")
  if name not in diffusers_folder.UNET_CLASSES + (ENCODE_CLASS,):
    raise ConversionError(f"{where}: _class_name {name!r} is not a UNet "
                          f"({diffusers_folder.UNET_CLASSES + (ENCODE_CLASS,)})")
  try:
    config = diffusers_folder.denoiser_config_from_diffusers(
        {**cfg_json, "_class_name": "UNet2DConditionModel"})
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e
  weights = files.find_weights(path, (diffusers_folder.WEIGHTS_STEM,))
  sd = {k: files.to_numpy(v).astype(np.float32) for k, v in files.read_state_dict(weights).items()}
  encoder_only = not any(k.startswith(("up_blocks.", "conv_out.")) for k in sd)
  try:
    params = (diffusers_unet.unet_encoder_params_from_torch(sd, config) if encoder_only else
              diffusers_unet.unet_params_from_torch(sd, config))
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{weights}: {e}") from e
  return UNet2DConditionModel(config), params, encoder_only


def save_unet_ori(path: str, config: DenoiserConfig, params, encoder_only: bool = False) -> str:
  """unet_ori for the original: a whole UNet2DConditionModel folder (as SD's `unet/`, which its
  training and inference load into `UNet2DConditionEncodeModel`, ignoring the up path), or,
  when only the encoder half exists, a `UNet2DConditionEncodeModel` folder as its pipeline's
  `save_pretrained` writes."""
  if not encoder_only:
    return diffusers_folder.save_diffusers(path, config, params)
  sd = diffusers_unet.unet_encoder_params_to_torch(_np32(params), config)
  cfg_json = diffusers_folder.unet_config_json(config, ENCODE_CLASS)
  paths.makedirs(path)
  files.write_safetensors(files.join(path, WEIGHTS_FILE), sd)
  files.write_json(files.join(path, "config.json"), cfg_json)
  return path


# ----- the scheduler -----------------------------------------------------------------------------

def scheduler_config_json(diffusion: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers `DDIMScheduler` config.json of our sampler: the schedule of `diffusion` (a
  config.diffusion or refiner.json's), "leading" spacing, offset 1, no final ᾱ = 1, ε."""
  return {"_class_name": "DDIMScheduler",
          "_diffusers_version": diffusers_folder.DIFFUSERS_VERSION,
          "beta_schedule": str(diffusion["beta_schedule"]),
          "beta_start": float(diffusion["beta_start"]), "beta_end": float(diffusion["beta_end"]),
          "num_train_timesteps": int(diffusion["num_train_timesteps"]),
          "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
          "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None,
          "thresholding": False, "rescale_betas_zero_snr": False}


# What our sampler implements, as DDIMScheduler reads a config (its defaults when a key is
# absent, e.g. from SD-1.5's PNDMScheduler config.json); prediction_type is forced to epsilon by
# the original, so it is not checked.
_SCHEDULER_FIXED = {"set_alpha_to_one": (True, False), "steps_offset": (0, 1),
                    "timestep_spacing": ("leading", "leading"), "clip_sample": (True, False),
                    "thresholding": (False, False), "rescale_betas_zero_snr": (False, False),
                    "trained_betas": (None, None)}


def schedule_from_scheduler_config(path: str) -> dict[str, Any]:
  """The schedule settings (beta_schedule, beta_start, beta_end, num_train_timesteps) of a
  `scheduler/` folder as `DDIMScheduler.from_pretrained` reads it; anything our DDIM sampler
  does not implement is an error naming the key."""
  where = files.join(path, "scheduler_config.json")
  if not files.is_file(where):
    raise ConversionError(f"{where}: not found")
  cfg = files.read_json(where)
  bad = [f"{k}={cfg.get(k, default)!r} (supported: {want!r})"
         for k, (default, want) in _SCHEDULER_FIXED.items() if cfg.get(k, default) != want]
  if cfg.get("beta_schedule", "linear") not in ("scaled_linear", "linear"):
    bad.append(f"beta_schedule={cfg.get('beta_schedule')!r}")
  if bad:
    raise ConversionError(f"{where}: the port's DDIM sampler does not implement {bad}")
  return {"beta_schedule": cfg.get("beta_schedule", "linear"),
          "beta_start": float(cfg.get("beta_start", 0.0001)),
          "beta_end": float(cfg.get("beta_end", 0.02)),
          "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000))}


# ----- what the original can load ----------------------------------------------------------------

ORIGINAL_GUIDANCE_WIDTH = 512  # src/models/clip.py: CrossAttentionLayer(width=512), not a config
ORIGINAL_MLP_RATIO = 4         # ResidualAttentionBlock: Linear(d, 4 d)
ORIGINAL_LABEL_EMBED_HIDDEN = 128  # SuperModel.LabelEmbedNet: Conv2d(3, 128, 1)


def original_load_problems(guidance_config: guidance_lib.GuidanceConfig | None,
                           label_embed_config: label_embedding.LabelEmbedConfig | None = None
                           ) -> list[str]:
  """Why the original's `from_pretrained` would fail on these nets (shape errors), with the
  fix; empty when it loads them. Everything else (UNet and VAE layouts, heads, layers, skip
  grids) is read from the exported config.json files."""
  out = []
  if guidance_config is not None and guidance_config.width != ORIGINAL_GUIDANCE_WIDTH:
    out.append(f"the CG net's attention width is {guidance_config.width} "
               f"(config.model.guidance_width={guidance_config.width}), but the original "
               f"hard-codes {ORIGINAL_GUIDANCE_WIDTH} (CrossAttentionLayer(width=512) in "
               "src/models/clip.py), so InteractNet.from_pretrained fails with a shape error: "
               f"train with --config.model.guidance_width={ORIGINAL_GUIDANCE_WIDTH}")
  if guidance_config is not None and guidance_config.mlp_ratio != ORIGINAL_MLP_RATIO:
    out.append(f"the CG net's MLP ratio is {guidance_config.mlp_ratio}; the original's "
               f"ResidualAttentionBlock hard-codes {ORIGINAL_MLP_RATIO}")
  if (label_embed_config is not None
      and label_embed_config.hidden != ORIGINAL_LABEL_EMBED_HIDDEN):
    out.append(f"the label embedding's decoder has {label_embed_config.hidden} hidden channels; "
               f"the original's LabelEmbedNet hard-codes {ORIGINAL_LABEL_EMBED_HIDDEN}: "
               f"pretrain it with hidden={ORIGINAL_LABEL_EMBED_HIDDEN}, or use the released "
               "labelembednet2/8 (idgbr convert --from=idgbr)")
  return out


# ----- whole checkpoints -----------------------------------------------------------------------

class IdgbrParts(NamedTuple):
  """What an original IDGBR folder holds; each model entry is (module, params) or None.

  `unet_ori` is the frozen encoder copy (a whole initial UNet, or only its encoder half when
  `unet_ori_encoder_only`), `context` the text states (1, L, D) its prompt "" gives, `schedule`
  the scheduler's schedule settings, `settings` our export's refinement settings
  (`idgbr_jax.json`, absent in the original's own folders), `sources` where each part was read.
  """
  unet: Any
  guidance: Any
  label_embed: Any
  vae: Any
  projector: Any
  unet_ori: Any = None
  unet_ori_encoder_only: bool = False
  context: np.ndarray | None = None
  schedule: dict | None = None
  settings: dict | None = None
  sources: dict | None = None


def _has_base_components(path: str) -> bool:
  return files.is_dir(path) and all(paths.exists(files.join(path, name))
                                    for name in BASE_COMPONENTS)


def base_folders(path: str, base: str | None = None) -> list[str]:
  """Where the original's inference takes the frozen parts of the run at `path`, in order:
  `path` itself, then its base source — the experiment root (`path`'s parent for a
  `checkpoint-N`) when it holds all of tokenizer/, text_encoder/, vae/, scheduler/ and
  unet_ori/ (`tools/infer.py: _resolve_base_source`), else `base`
  (`--base_model_name_or_path`, e.g. the SD-1.5 folder)."""
  path = os.fspath(path).rstrip("/")
  root = os.path.dirname(path) if os.path.basename(path).startswith("checkpoint-") else path
  out = [path]
  if root != path and _has_base_components(root):
    out.append(root)
  elif base:
    out.append(os.fspath(base))
  return out


def _first(folders: list[str], *names: str) -> str | None:
  for folder in folders:
    for name in names:
      candidate = files.join(folder, name)
      if paths.exists(candidate):
        return candidate
  return None


def load_idgbr(path: str | os.PathLike, *, base: str | os.PathLike | None = None,
               label_embed: str | os.PathLike | None = None,
               with_context: bool = True) -> IdgbrParts:
  """Reads an original IDGBR checkpoint (`checkpoint-N/`), pipeline output folder, or our
  `idgbr export --to=idgbr` folder.

  `unet_gen/` and `interact_net/` are required and read from `path`. The frozen parts are looked
  for as the original's inference does (`base_folders`): `label_embed_net/` in `path`, then
  the experiment root, then `label_embed` (`--label_embed_dir`); `vae/`, `unet_ori/` (or a base
  SD folder's `unet/`), `scheduler/` and the text context in `path`, then the base source. The
  context is our export's exact `context.npy` when present, else (`with_context`) the CLIP
  states of "" from `text_encoder/` + `tokenizer/` (needs torch). `projectors.safetensors` is
  read from `path`. A bare `labelembednet{2,8}` folder is not a checkpoint: use
  `load_label_embed`.
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
  folders = base_folders(path, base)
  sources = {}

  def opt(name, where, fn):
    found = _first(where, name)
    if found is None:
      return None
    sources[name] = found
    return fn(found)

  le_where = [path] + ([os.path.dirname(path.rstrip("/"))]
                       if os.path.basename(path.rstrip("/")).startswith("checkpoint-") else [])
  le = opt(LABEL_EMBED_DIR, le_where, load_label_embed)
  if le is None and label_embed is not None:
    sources[LABEL_EMBED_DIR] = os.fspath(label_embed)
    le = load_label_embed(os.fspath(label_embed))
  vae = opt(VAE_DIR, folders, diffusers_folder.load_diffusers)
  ori_path = _first(folders, UNET_ORI_DIR) or _first(folders[1:], "unet")
  unet_ori, encoder_only = None, False
  if ori_path is not None:
    sources[UNET_ORI_DIR] = ori_path
    module, params, encoder_only = load_unet_ori(ori_path)
    if module.config != unet[0].config:
      raise ConversionError(f"{ori_path}: unet_ori's architecture differs from "
                            f"{files.join(path, UNET_DIR)}'s")
    unet_ori = (module, params)
  context = None
  ctx_file = _first(folders[:1], CONTEXT_FILE)
  if ctx_file is not None:
    sources["context"] = ctx_file
    context = np.asarray(paths.load_npy(ctx_file), np.float32)
  elif with_context:
    enc = _first(folders, TEXT_ENCODER_DIR)
    if enc is not None and paths.exists(files.join(os.path.dirname(enc), TOKENIZER_DIR)):
      from idgbr_jax.convert import clip_context  # pylint: disable=import-outside-toplevel
      sources["context"] = os.path.dirname(enc)
      context = clip_context.empty_prompt_context(os.path.dirname(enc))
  schedule = opt(SCHEDULER_DIR, folders, schedule_from_scheduler_config)
  settings_file = _first(folders[:1], SETTINGS_FILE)
  settings = files.read_json(settings_file) if settings_file else None
  return IdgbrParts(unet=unet, guidance=guid, label_embed=le, vae=vae,
                    projector=opt(PROJECTOR_FILE, [path], load_projector), unet_ori=unet_ori,
                    unet_ori_encoder_only=encoder_only, context=context, schedule=schedule,
                    settings=settings, sources=sources)


def export_idgbr(path: str | os.PathLike, *, unet_config: DenoiserConfig, unet_params,
                 guidance_config: guidance_lib.GuidanceConfig, guidance_params,
                 projector_params=None, label_embed_params=None, vae_config=None,
                 vae_params=None, unet_ori_params=None, unet_ori_encoder_only: bool = False,
                 context: np.ndarray | None = None, settings: Mapping[str, Any] | None = None,
                 text_encoder: bool = True) -> str:
  """Writes our weights in the original's layout (see the module doc) under `path`; returns
  `path` (`exported_parts` lists what is there).

  With every part given, `path` is complete for the original's `tools/infer.py
  --model_path=path`: a checkpoint dir (`unet_gen/`, `interact_net/`) whose own folder holds the
  base components its `_resolve_base_source` needs (`tokenizer/`, `text_encoder/`, `vae/`,
  `scheduler/`, `unet_ori/`) and `label_embed_net/`, so nothing falls back to a base SD folder.
  `context` becomes `text_encoder/` + `tokenizer/` (`clip_context.write_constant_text_encoder`;
  not with `text_encoder=False`) and, exactly, `context.npy`; `settings`
  (`assembly.stage2.refine_settings`) gives `scheduler/` and `idgbr_jax.json`. The original
  ignores `context.npy`, `idgbr_jax.json` and `projectors.safetensors`; `load_idgbr` reads them
  back."""
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
  if unet_ori_params is not None:
    save_unet_ori(files.join(path, UNET_ORI_DIR), unet_config, unet_ori_params,
                  unet_ori_encoder_only)
  if context is not None:
    from idgbr_jax.convert import clip_context  # pylint: disable=import-outside-toplevel
    context = np.asarray(context, np.float32)
    if text_encoder:
      clip_context.write_constant_text_encoder(path, context)
    paths.save_npy(files.join(path, CONTEXT_FILE), context)
  if settings is not None:
    files.write_json(files.join(path, SCHEDULER_DIR, "scheduler_config.json"),
                     scheduler_config_json(settings["diffusion"]))
    files.write_json(files.join(path, SETTINGS_FILE), dict(settings))
  return path


# Part -> its entry in an exported folder.
EXPORTED_PARTS = {"unet": UNET_DIR, "guidance": GUIDANCE_DIR, "label_embed": LABEL_EMBED_DIR,
                  "vae": VAE_DIR, "unet_ori": UNET_ORI_DIR, "scheduler": SCHEDULER_DIR,
                  "text_encoder": TEXT_ENCODER_DIR, "tokenizer": TOKENIZER_DIR,
                  "projector": PROJECTOR_FILE, "context": CONTEXT_FILE,
                  "settings": SETTINGS_FILE}


def exported_parts(path: str) -> dict[str, str]:
  """{part: path} of what an `export_idgbr` folder holds."""
  entries = {part: files.join(os.fspath(path), name) for part, name in EXPORTED_PARTS.items()}
  return {part: p for part, p in entries.items() if paths.exists(p)}
