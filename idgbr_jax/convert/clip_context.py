"""The empty-prompt CLIP text context, computed once at conversion time.

IDGBR conditions every UNet call on the CLIP ViT-L/14 states of the prompt "" (77 x 768 for
SD-1.5): `text_encoder(tokenizer([""], padding="max_length", max_length=77,
truncation=True).input_ids)[0]`, i.e. `last_hidden_state`, no attention mask. It is a constant,
so this module computes it with transformers' `CLIPTextModel` (PyTorch, float32) from model
folders (local, or a URL such as `gs://...`: transformers only opens local folders, so a remote
one is copied to a temporary folder first) and stores it as a `.npy` that Stage II configs point
at (`config.init.context`). No Flax CLIP model is needed.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from idgbr_jax import paths
from idgbr_jax.convert import files
from idgbr_jax.convert.files import ConversionError


def _resolve(src: str, tokenizer: str | None) -> tuple[str, str]:
  """(text_encoder folder, tokenizer folder) from a pipeline root or a text-encoder folder."""
  if files.is_dir(files.join(src, "text_encoder")):
    enc = files.join(src, "text_encoder")
    tok = tokenizer or files.join(src, "tokenizer")
  else:
    enc, tok = src, tokenizer
  config_json = files.join(enc, "config.json")
  if not files.is_file(config_json):
    raise ConversionError(f"{config_json}: not found (pass a Stable Diffusion folder with "
                          "text_encoder/ and tokenizer/, or a CLIPTextModel folder plus "
                          "--tokenizer)")
  model_type = files.read_json(config_json).get("model_type")
  if model_type not in ("clip_text_model", "clip"):
    raise ConversionError(f"{config_json}: model_type {model_type!r} is not a CLIP text "
                          "encoder ('clip_text_model')")
  if tok is None:
    if files.is_file(files.join(enc, "vocab.json")):
      tok = enc
    else:
      raise ConversionError(f"{enc}: no tokenizer given and no vocab.json here (pass the "
                            "tokenizer folder)")
  if not files.is_file(files.join(tok, "vocab.json")):
    raise ConversionError(f"{files.join(tok, 'vocab.json')}: not found (not a CLIP tokenizer "
                          "folder)")
  return enc, tok


def empty_prompt_context(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                         prompt: str = "") -> np.ndarray:
  """CLIP text states of `prompt` (default ""), float32, shape (1, max_length, hidden).

  Args:
    src: a Stable Diffusion folder (with `text_encoder/` and `tokenizer/`) or a
      `CLIPTextModel` folder.
    tokenizer: the tokenizer folder when `src` is a bare text-encoder folder.
    prompt: the text; IDGBR trains and samples with "".
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import CLIPTextModel, CLIPTokenizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError("computing the CLIP context needs torch and transformers "
                          "(the `torch` extra)") from e
  enc_dir, tok_dir = _resolve(os.fspath(src), None if tokenizer is None else os.fspath(tokenizer))
  with contextlib.ExitStack() as stack:  # transformers reads local folders only
    local_tok = stack.enter_context(paths.local_copy(tok_dir))
    local_enc = (local_tok if enc_dir == tok_dir else
                 stack.enter_context(paths.local_copy(enc_dir)))
    # The original uses the slow tokenizer (use_fast=False); for "" both give BOS, EOS, pad...
    tok = CLIPTokenizer.from_pretrained(local_tok, local_files_only=True)
    model = CLIPTextModel.from_pretrained(local_enc, local_files_only=True,
                                          torch_dtype=torch.float32).eval()
  ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids
  if ids.shape[1] > model.config.max_position_embeddings:
    raise ConversionError(f"{tok_dir}: model_max_length {ids.shape[1]} exceeds the text "
                          f"encoder's {model.config.max_position_embeddings} positions")
  with torch.no_grad():
    states = model(ids)[0]
  return states.float().numpy()


def save_context(dst: str | os.PathLike, context: np.ndarray) -> str:
  """Writes the context as `.npy` (float32, (1, L, D)), locally or to a URL."""
  dst = os.fspath(dst)
  if not dst.endswith(".npy"):
    raise ConversionError(f"{dst}: the context is written as a .npy file; give a path ending "
                          "in .npy")
  paths.save_npy(dst, np.asarray(context, np.float32))
  return dst


# ----- the context as a text encoder, for the original's inference --------------------------------
# The original builds its prompt states itself: `tokenizer/` + `text_encoder/` (a CLIPTextModel)
# of its base folder, run on "" (configs/inference: prompt ""). To hand it *our* context (the
# SD CLIP states a run was converted with, or a test config's zeros), the export writes a
# CLIPTextModel with no transformer layers whose output for every prompt is that context:
#   last_hidden_state[i] = LayerNorm(token_embedding[id] + position_embedding[i]) * w + b,
# all token embeddings 0. LayerNorm removes each position's mean and divides by its spread, so
# every row of (context - b) / w must have zero mean: 1/w =: r is taken orthogonal to all
# differences context[i] - context[0] (with no small entries), and b along r so that
# (context[0] - b) . r = 0. Each position embedding is then scaled so LayerNorm's division by
# sqrt(var + eps) undoes itself. That exists whenever the rows are the output of *some*
# LayerNorm (always for a CLIP model's states, such as SD's; and for any context of fewer tokens
# than features); in float32 it reproduces the context to ~1e-7 relative (tested with
# transformers), below the difference between two frameworks' UNets. The exact array is
# exported beside it as `context.npy`.
TOKENIZER_VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1}


def constant_text_encoder(context: np.ndarray, seed: int = 0
                          ) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, state dict) of a CLIPTextModel whose output for any prompt is `context`.

  `context` is (1, L, D) or (L, D). With L < 2 the rows are repeated to 2 positions (the
  tokenizer's "" is BOS + EOS); repeating every key/value of a cross-attention leaves it
  unchanged.

  Raises:
    ConversionError: when no LayerNorm can output these rows (more tokens than features and
      not the states of a text model).
  """
  c = np.asarray(context, np.float64)
  c = c[0] if c.ndim == 3 else c
  if c.ndim != 2:
    raise ConversionError(f"context of shape {np.shape(context)}; expected (1, L, D)")
  if c.shape[0] < 2:
    c = np.repeat(c, 2, axis=0)
  length, dim = c.shape
  scale = max(float(np.abs(c).max()), 1e-30)
  # Null space of the row differences (numerically: singular values at float32 rounding).
  _, sing, vt = np.linalg.svd(c[1:] - c[:1], full_matrices=True)
  sing = np.concatenate([sing, np.zeros(dim - len(sing))])
  basis = vt[sing <= 1e-5 * max(float(sing.max()), 1e-30) + 1e-30].T  # (D, k)
  if basis.shape[1] == 0:
    raise ConversionError(f"a context of {length} tokens x {dim} features that is not the "
                          "output of a LayerNorm: no text encoder can reproduce it")
  # r = 1/w in that space, with entries of one magnitude (alternating projections between it
  # and sign vectors).
  rng = np.random.default_rng(seed)
  r = np.where(rng.random(dim) < 0.5, -1.0, 1.0)
  for i in range(50):
    r = basis @ (basis.T @ r)
    if i < 49:
      r = np.where(r < 0, -1.0, 1.0)
  if np.abs(r).min() < 1e-3 * np.abs(r).max():
    raise ConversionError("the context's text-encoder stand-in would be ill-conditioned "
                          f"(min |1/w| {np.abs(r).min():.3g})")
  b = (c[0] @ r) * r / (r @ r)  # (c_i - b) . r = 0 for every row i
  u = (c - b) * r  # what LayerNorm must output before its scale w = 1/r
  var = np.mean(u * u, axis=1)
  if var.max() > 0:
    r = r * np.sqrt(0.5 / var.max())
    u = (c - b) * r
    var = np.mean(u * u, axis=1)
  eps = 1.0
  positions = (u * np.sqrt(eps / (1.0 - var))[:, None]).astype(np.float32)
  w, b32 = (1.0 / r).astype(np.float32), b.astype(np.float32)
  # What transformers computes (float32 LayerNorm), checked here rather than trusted.
  x = positions.astype(np.float32)
  mean = x.mean(axis=1, keepdims=True)
  out = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + np.float32(eps))
  err = float(np.abs(out * w + b32 - c).max())
  if err > 1e-5 * scale:
    raise ConversionError(f"the context's text-encoder stand-in reproduces it only to {err:.3g} "
                          f"(max |context| {scale:.3g})")
  config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": len(TOKENIZER_VOCAB), "hidden_size": dim,
            "intermediate_size": 4 * dim, "projection_dim": dim, "num_hidden_layers": 0,
            "num_attention_heads": 1, "max_position_embeddings": length,
            "layer_norm_eps": eps, "hidden_act": "quick_gelu", "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 1, "torch_dtype": "float32",
            "idgbr_jax_note": "constant text encoder: its output for any prompt is the exported "
                              "context (context.npy); see idgbr_jax/convert/clip_context.py"}
  state_dict = {
      "text_model.embeddings.token_embedding.weight":
          np.zeros((len(TOKENIZER_VOCAB), dim), np.float32),
      "text_model.embeddings.position_embedding.weight": positions,
      "text_model.final_layer_norm.weight": w,
      "text_model.final_layer_norm.bias": b32}
  return config, state_dict


def write_constant_text_encoder(root: str, context: np.ndarray) -> tuple[str, str]:
  """`root/text_encoder/` (see `constant_text_encoder`) and a matching `root/tokenizer/` (a
  CLIPTokenizer with only BOS / EOS, padding "" to the context's length)."""
  config, state_dict = constant_text_encoder(context)
  enc, tok = files.join(root, "text_encoder"), files.join(root, "tokenizer")
  paths.makedirs(enc)
  files.write_safetensors(files.join(enc, "model.safetensors"), state_dict)
  files.write_json(files.join(enc, "config.json"), config)
  paths.makedirs(tok)
  special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
  files.write_json(files.join(tok, "vocab.json"), TOKENIZER_VOCAB)
  paths.write_bytes(files.join(tok, "merges.txt"), b"#version: 0.2\n")
  files.write_json(files.join(tok, "special_tokens_map.json"), special)
  files.write_json(files.join(tok, "tokenizer_config.json"), {
      "tokenizer_class": "CLIPTokenizer", "model_max_length": config["max_position_embeddings"],
      "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special})
  return enc, tok
