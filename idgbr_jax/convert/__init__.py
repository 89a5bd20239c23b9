"""PyTorch <-> Flax weight conversion (diffusers, DINOv2, original IDGBR checkpoints).

Loaders return `(module, params)`: a Linen module whose `.config` was read from the files, and
its float32 params tree (`variables['params']`). Errors are `ConversionError` (a ValueError)
naming the file and the key.

    load_diffusers(path)        diffusers UNet2DConditionModel / AutoencoderKL folder
    load_dinov2(path)           official DINOv2 .pth or transformers Dinov2Model folder
    load_idgbr(path, base=)     original IDGBR checkpoint-N / pipeline folder (or our export)
                                -> IdgbrParts (with unet_ori, the text context, the schedule)
    load_interactnet(path)      original `interact_net/` folder (the CG net)
    load_label_embed(path)      `labelembednet{2,8}` folder or .safetensors
    load_projector(path)        REPA projector state dict (`projectors.0.*`)
    empty_prompt_context(path)  CLIP states of "" (1, 77, 768) via transformers (torch)

    save_diffusers(path, config, params)   diffusers folder (config.json + safetensors)
    export_idgbr(path, ...)                the original's layout (unet_gen/, interact_net/, ...,
                                           unet_ori/, scheduler/, text_encoder/ + tokenizer/)
"""
from idgbr_jax.convert.clip_context import empty_prompt_context, save_context
from idgbr_jax.convert.diffusers_folder import load_diffusers, save_diffusers
from idgbr_jax.convert.dinov2 import load_dinov2
from idgbr_jax.convert.files import ConversionError, read_state_dict, write_safetensors
from idgbr_jax.convert.idgbr import (IdgbrParts, export_idgbr, guidance_params_from_torch,
                                     guidance_params_to_torch, label_embed_params_from_torch,
                                     label_embed_params_to_torch, load_idgbr, load_interactnet,
                                     load_label_embed, load_projector, projector_params_from_torch,
                                     projector_params_to_torch)

__all__ = [
    "ConversionError", "IdgbrParts", "empty_prompt_context", "export_idgbr",
    "guidance_params_from_torch", "guidance_params_to_torch", "label_embed_params_from_torch",
    "label_embed_params_to_torch", "load_diffusers", "load_dinov2", "load_idgbr",
    "load_interactnet", "load_label_embed", "load_projector", "projector_params_from_torch",
    "projector_params_to_torch", "read_state_dict", "save_context", "save_diffusers",
    "write_safetensors",
]
