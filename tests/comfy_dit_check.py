"""Run inside a ComfyUI checkout's python (see tests/test_comfy_dit.py): lora-ext's ComfyUI
patches on a real ComfyUI Flux model (comfy.ldm.flux, tiny) against ComfyUI's own LoRA
loader (comfy.lora.load_lora + comfy.lora.model_lora_keys_unet) on the same file; and a
diffusers-named file (split q/k/v, proj_mlp, norm_out.linear) against ComfyUI's loader on the
same LoRA converted to BFL names. Prints one JSON line."""
import json
import os
import sys

import torch

comfy_dir, work = sys.argv[1], sys.argv[2]
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, comfy_dir)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.lora  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
from comfy.ldm.flux.model import Flux  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lora_ext.hosts.comfyui import patching as P  # noqa: E402
from lora_ext.hostmodel import bind  # noqa: E402
from lora_ext.network import load_lora  # noqa: E402
from lora_ext.spec import LoraSpec  # noqa: E402


class Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.diffusion_model = Flux(image_model="flux", in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=8,
                                    hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                                    axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                                    operations=comfy.ops.disable_weight_init)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.05)


def patched(path, ours):
    holder = Holder()
    patcher = comfy.model_patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))
    if ours:
        bound = bind(P.unet_host(patcher))
        P._add(patcher, bound, [(LoraSpec(name="x", path=path), load_lora(path))], ["unet"])
    else:
        # ComfyUI's generic key rule (comfy/lora.py model_lora_keys_unet, the loop over the state
        # dict: "lora_unet_" + flattened key); its diffusers-name tables need a full model_config
        key_map = {}
        for k in holder.state_dict():
            if k.startswith("diffusion_model.") and k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        patches = comfy.lora.load_lora(load_file(path), key_map)
        patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    return {k: v.detach().clone() for k, v in holder.state_dict().items()}, Holder().state_dict()


out = {}
g = torch.Generator().manual_seed(3)
h, m, r = 32, 128, 4
bfl = {}
for name, rows, inp in (("double_blocks_0_img_attn_qkv", 3 * h, h), ("single_blocks_1_linear1", 3 * h + m, h),
                        ("final_layer_adaLN_modulation_1", 2 * h, h), ("double_blocks_1_txt_mlp_2", h, m)):
    bfl[f"lora_unet_{name}.lora_down.weight"] = torch.randn(r, inp, generator=g) * 0.3
    bfl[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, r, generator=g) * 0.3
    bfl[f"lora_unet_{name}.alpha"] = torch.tensor(3.0)
save_file(bfl, os.path.join(work, "bfl.safetensors"))
a, base = patched(os.path.join(work, "bfl.safetensors"), True)
b, _ = patched(os.path.join(work, "bfl.safetensors"), False)
out["bfl_max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
out["bfl_changed"] = sum(not torch.equal(a[k], base[k]) for k in a)
# a diffusers-named file: lora-ext maps it onto the fused rows / swapped halves itself
dif = {}
for name, rows, inp in (("transformer_blocks.0.attn.to_k", h, h), ("single_transformer_blocks.1.proj_mlp", m, h),
                        ("single_transformer_blocks.0.attn.to_q", h, h), ("norm_out.linear", 2 * h, h)):
    dif[f"transformer.{name}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.3
    dif[f"transformer.{name}.lora_B.weight"] = torch.randn(rows, r, generator=g) * 0.3
save_file(dif, os.path.join(work, "dif.safetensors"))
c, _ = patched(os.path.join(work, "dif.safetensors"), True)
want = {k: v.clone() for k, v in base.items()}
pre = "diffusion_model."
def add(key, rows, d):
    want[pre + key][rows[0]:rows[1]] += d
A = lambda n: dif[f"transformer.{n}.lora_B.weight"] @ dif[f"transformer.{n}.lora_A.weight"]  # noqa: E731
add("double_blocks.0.img_attn.qkv.weight", (h, 2 * h), A("transformer_blocks.0.attn.to_k"))
add("single_blocks.1.linear1.weight", (3 * h, 3 * h + m), A("single_transformer_blocks.1.proj_mlp"))
add("single_blocks.0.linear1.weight", (0, h), A("single_transformer_blocks.0.attn.to_q"))
d = A("norm_out.linear")
add("final_layer.adaLN_modulation.1.weight", (0, 2 * h), torch.cat([d[h:], d[:h]], 0))
out["diffusers_max_diff"] = max(float((c[k] - want[k]).abs().max()) for k in c)
out["diffusers_changed"] = sum(not torch.equal(c[k], base[k]) for k in c)
print(json.dumps(out))
