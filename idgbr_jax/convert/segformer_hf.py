"""transformers `SegformerForSemanticSegmentation` state dict -> Flax variables of the Stage I
`idgbr_jax.models.backbones.segformer.SegFormer` (numpy only; torch tensors are accepted).

Used by the logits-parity test against the HF model (`tests/test_backbones.py`).
"""
from __future__ import annotations

import numpy as np

from idgbr_jax.convert.torch_layout import conv_kernel_to_flax, linear_kernel_to_flax
from idgbr_jax.models.backbones.segformer import SegFormerConfig


def segformer_params_from_hf(state_dict, config: SegFormerConfig) -> dict:
  """HF `SegformerForSemanticSegmentation` state dict -> {'params', 'batch_stats'} (numpy, unboxed).

  Covers transformers >= 5 key names (`segformer.stages.{i}...`, separate q/k/v/o projections).
  Remember HF's LayerNorm eps is 1e-5: build the model with `layer_norm_eps=1e-5` for parity.
  """
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in state_dict.items()}
  conv = lambda p: {"kernel": conv_kernel_to_flax(sd[p + ".weight"]),  # noqa: E731
                    **({"bias": sd[p + ".bias"]} if p + ".bias" in sd else {})}
  dense = lambda p: {"kernel": linear_kernel_to_flax(sd[p + ".weight"]),  # noqa: E731
                     "bias": sd[p + ".bias"]}
  norm = lambda p: {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}  # noqa: E731

  encoder = {}
  for i in range(len(config.embed_dims)):
    st = f"segformer.stages.{i}"
    encoder[f"patch_embed{i + 1}"] = conv(f"{st}.patch_embeddings.proj")
    encoder[f"patch_embed{i + 1}_norm"] = norm(f"{st}.patch_embeddings.layer_norm")
    for j in range(config.depths[i]):
      bl = f"{st}.blocks.{j}"
      attn = {"query": dense(f"{bl}.attention.q_proj"), "key": dense(f"{bl}.attention.k_proj"),
              "value": dense(f"{bl}.attention.v_proj"), "proj": dense(f"{bl}.attention.o_proj")}
      if config.sr_ratios[i] > 1:
        sr = f"{bl}.attention.sequence_reduction"
        attn["sr"] = conv(f"{sr}.sequence_reduction")
        attn["sr_norm"] = norm(f"{sr}.layer_norm")
      encoder[f"block{i + 1}_{j}"] = {
          "norm1": norm(f"{bl}.layernorm_before"), "attn": attn,
          "norm2": norm(f"{bl}.layernorm_after"),
          "mlp": {"fc1": dense(f"{bl}.mlp.fc1"), "dwconv": conv(f"{bl}.mlp.dwconv.dwconv"),
                  "fc2": dense(f"{bl}.mlp.fc2")}}
    encoder[f"norm{i + 1}"] = norm(f"{st}.layer_norm")
  params = {"encoder": encoder}
  for i in range(len(config.embed_dims)):
    params[f"linear_c{i + 1}"] = dense(f"decode_head.linear_projections.{i}.proj")
  params["linear_fuse"] = conv("decode_head.linear_fuse")
  params["linear_fuse_bn"] = norm("decode_head.batch_norm")
  params["classifier"] = conv("decode_head.classifier")
  batch_stats = {"linear_fuse_bn": {"mean": sd["decode_head.batch_norm.running_mean"],
                                    "var": sd["decode_head.batch_norm.running_var"]}}
  return {"params": params, "batch_stats": batch_stats}
