"""Mirrors the parts of comfy/model_management.py (ComfyUI 0.3.64) the sampling path uses:
``cast_to_device``, and ``load_models_gpu``: a model patcher is loaded (its patches applied to
the shared weights); loading another patcher of the same model first unloads (unpatches) the
one loaded; a loaded patcher stays loaded after sampling. ``LOWVRAM_BUDGET`` (bytes, 0: whole)
stands for a GPU too small for the model: it is passed as ``lowvram_model_memory`` (the real
load_models_gpu computes it from free VRAM, L671-L684), so the patcher loads partially."""
import torch

current_loaded_models = []
LOWVRAM_BUDGET = 0


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    for m in models:
        for loaded in list(current_loaded_models):
            if loaded is m:
                if m.model.current_weight_patches_uuid != m.patches_uuid:
                    m.unpatch_model()
                    current_loaded_models.remove(m)
                    break
            elif loaded.model is m.model:
                loaded.unpatch_model()
                current_loaded_models.remove(loaded)
        if m not in current_loaded_models:
            m.patch_model(lowvram_model_memory=LOWVRAM_BUDGET if hasattr(m.model, "diffusion_model") else 0)
            current_loaded_models.append(m)


def unload_all_models():
    for m in list(current_loaded_models):
        m.unpatch_model()
    current_loaded_models.clear()


def get_torch_device():
    return torch.device("cpu")
