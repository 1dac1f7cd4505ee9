"""Run inside a ComfyUI checkout's python (see tests/test_comfy_dit.py): lora-ext's ComfyUI
patches on a real ComfyUI Flux model (comfy.ldm.flux, tiny) against ComfyUI's own LoRA
loader (comfy.lora.load_lora + comfy.lora.model_lora_keys_unet) on the same file; and a
diffusers-named file (split q/k/v, proj_mlp, norm_out.linear) against ComfyUI's loader on the
same LoRA converted to BFL names. Then a Wan 2.2 A14B two-expert workflow (issue 12): two tiny
Wan models that ComfyUI itself detects and builds from their state dicts (WAN21_T2V, flow
sampling with shift 8), a HIGH/LOW LoRA pair with keyframes through lora-ext's two-experts loader
node, sampled by ComfyUI's own KSamplerAdvanced nodes as the Wan 2.2 templates do (steps 0..k on
the high-noise model with leftover noise, k..n on the low-noise one); at every model evaluation
the strength each expert's modules carry is measured on probe inputs. Prints one JSON line."""
import json
import os
import sys

import torch

if __name__ != "__main__":  # a script run by a host test in the host's python; importing it (a
    # pytest command line naming it) would take that command line for its paths and write there
    raise ImportError("tests/comfy_dit_check.py is a script, not a module: see its docstring")
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


# --- Wan 2.2 A14B: two experts, one keyframed LoRA pair, two KSamplerAdvanced halves -------------
import comfy.ldm.wan.model  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from comfy.patcher_extension import CallbacksMP  # noqa: E402

from lora_ext.hosts.comfyui import nodes as ext_nodes  # noqa: E402


def wan_state(seed):
    """A tiny Wan 2.x T2V in ComfyUI's own class (original names); ComfyUI's detection reads
    dim, heads (dim // 128), ffn, layers and in/out channels back from the keys."""
    torch.manual_seed(seed)
    m = comfy.ldm.wan.model.WanModel(model_type="t2v", dim=128, ffn_dim=256, num_heads=1, num_layers=2, in_dim=16,
                                     out_dim=16, text_dim=4096, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


MODS = {"blocks.0.self_attn.q": (128, 128), "blocks.1.ffn.0": (256, 128), "blocks.1.cross_attn.o": (128, 128)}
loras = os.path.join(work, "loras")
os.makedirs(loras, exist_ok=True)
folder_paths.folder_names_and_paths["loras"] = ([loras], folder_paths.supported_pt_extensions)
deltas = {"high": {}, "low": {}}
fh, fl = {}, {}
for mod, (rows, cols) in MODS.items():
    down, up = torch.randn(4, cols, generator=g) * 0.2, torch.randn(rows, 4, generator=g) * 0.2
    k = "lora_unet_" + mod.replace(".", "_")  # musubi-tuner's names
    fh.update({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(2.0)})
    deltas["high"][mod] = up @ down * 0.5
    a, b = torch.randn(4, cols, generator=g) * 0.2, torch.randn(rows, 4, generator=g) * 0.2
    fl.update({f"diffusion_model.{mod}.lora_A.weight": a, f"diffusion_model.{mod}.lora_B.weight": b})  # native PEFT
    deltas["low"][mod] = b @ a
save_file(fh, os.path.join(loras, "wanpair_HIGH_fp16.safetensors"))
save_file(fl, os.path.join(loras, "wanpair_LOW_fp16.safetensors"))
experts = {}
for expert, seed in (("high", 0), ("low", 1)):
    patcher = comfy.sd.load_diffusion_model_state_dict(wan_state(seed))
    dm = patcher.model.diffusion_model
    experts[expert] = (patcher, dm, {k: v.detach().clone() for k, v in dm.state_dict().items()})
out["wan_model_class"] = type(experts["high"][0].model).__name__
out["wan_config_class"] = type(experts["high"][0].model.model_config).__name__
probes = {mod: torch.randn(3, cols, generator=torch.Generator().manual_seed(5)) for mod, (_, cols) in MODS.items()}


def wan_run(steps, split, sampler, scheduler, keyframes, strength=0.8, tags=None):
    """``tags``: the prompt tag node on each expert (its ``expert`` input set) instead of the
    two-experts loader."""
    seen = []

    def observer(expert):
        _, dm, pristine = experts[expert]
        count = [0]

        def observe(patcher, timestep):  # ComfyUI calls it after lora-ext's own ON_PREPARE_STATE callback
            row = {"expert": expert, "i": count[0], "sigma": float(timestep.max()), "mods": {}}
            with torch.no_grad():
                for mod, x in probes.items():
                    m = dm.get_submodule(mod)
                    ch = m(x.to(m.weight.dtype)).float() - torch.nn.functional.linear(
                        x, pristine[mod + ".weight"].float(), pristine[mod + ".bias"].float())
                    d = torch.nn.functional.linear(x, deltas[expert][mod])
                    st = float((ch * d).sum() / (d * d).sum())
                    row["mods"][mod] = (st, float((ch - st * d).abs().max() / d.abs().max()))
            seen.append(row)
            count[0] += 1

        return observe

    if tags is None:
        high, low = ext_nodes.LoraExtExpertLoader().load(experts["high"][0], experts["low"][0],
                                                         "wanpair_HIGH_fp16.safetensors", strength, keyframes=keyframes)
    else:
        node = ext_nodes.LoraExtPromptLoader()
        high = node.load(experts["high"][0], None, tags, expert="high")[0]
        low = node.load(experts["low"][0], None, tags, expert="low")[0]
    high, low = high.clone(), low.clone()
    high.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, "test-observer", observer("high"))
    low.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, "test-observer", observer("low"))
    cond = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(9)), {}]]
    neg = [[torch.zeros(1, 8, 4096), {}]]
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    adv = nodes.KSamplerAdvanced()
    (mid,) = adv.sample(high, "enable", 11, steps, 1.0, sampler, scheduler, cond, neg, latent, 0, split, "enable")
    (end,) = adv.sample(low, "disable", 11, steps, 1.0, sampler, scheduler, cond, neg, mid, split, 10000, "disable")
    return seen, end["samples"]


RUNS = {  # name -> (sampler, wan_run keyword arguments, strength at each global step)
    "euler": ("euler", {}, [0.8 * v for v in (0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0, 0.7, 0.4)]),  # 0.2@0,1@3,0.4@5 x 0.8
    "dpm_2": ("dpm_2", {}, [0.8 * v for v in (0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0, 0.7, 0.4)]),
    # the prompt tag node on each expert: unet= keyframes for both, the low expert's own low= keyframes
    "tags": ("euler", {"tags": "a fox <lora:wanpair_fp16:1:unet=0@0,1@5:low=1@0,0@5>"},
             [i / 5 for i in range(3)] + [1 - i / 5 for i in range(3, 6)]),
}
for run, (sampler, kw, want) in RUNS.items():
    steps, split = 6, 3
    seen, final = wan_run(steps, split, sampler, "simple", "0.2@0,1@3,0.4@5", **kw)
    per = 2 if sampler == "dpm_2" else 1
    rows = []
    worst_strength, worst_resid = 0.0, 0.0
    for r in seen:
        step = r["i"] // per + (split if r["expert"] == "low" else 0)
        for mod, (st, resid) in r["mods"].items():
            worst_strength = max(worst_strength, abs(st - want[step]))
            worst_resid = max(worst_resid, resid)
        rows.append([r["expert"], step, round(r["sigma"], 5), round(next(iter(r["mods"].values()))[0], 6),
                     round(want[step], 6)])
    out[f"wan_{run}"] = {"evaluations": rows, "max_strength_error": worst_strength,
                             "max_other_residual": worst_resid, "final_finite": bool(torch.isfinite(final).all()),
                             "weights_pristine": all(torch.equal(v, experts[e][2][k]) for e in experts
                                                     for k, v in experts[e][1].state_dict().items()),
                             "hooks_left": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for e in experts
                                               for m in experts[e][1].modules())}
print(json.dumps(out))
