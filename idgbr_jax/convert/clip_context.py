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
