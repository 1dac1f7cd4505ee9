"""lora-ext's ComfyUI patches on ComfyUI's own Flux model class (issue 15) and a Wan 2.2 A14B
two-expert workflow in ComfyUI's own sampling code (issue 12), in the ComfyUI
checkout's python (``-m realhost``; needs ``LORA_EXT_COMFYUI_DIR``, and the checkout's venv or
``LORA_EXT_COMFYUI_PYTHON``): a BFL kohya LoRA patched by lora-ext equals ComfyUI's own loader
(comfy.lora.load_lora) bit for bit; a diffusers-named LoRA lands on the fused qkv / linear1 rows
and the swapped final modulation exactly (ComfyUI's offset patches)."""
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from dit_models import OriginalTree, original_state, tiny
from host_common import FAKES, purge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.realhost
def test_comfy_dit_patches_and_two_expert_schedule_in_real_comfyui(tmp_path):
    comfy = os.environ.get("LORA_EXT_COMFYUI_DIR")
    if not comfy:
        pytest.skip("set LORA_EXT_COMFYUI_DIR to a ComfyUI checkout (with its venv) to run this check")
    python = os.environ.get("LORA_EXT_COMFYUI_PYTHON") or os.path.join(comfy, "venv", "bin", "python")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([python, os.path.join(ROOT, "tests", "comfy_dit_check.py"), comfy, str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["bfl_changed"] == 4 and res["bfl_max_diff"] == 0.0, res
    assert res["diffusers_changed"] == 4 and res["diffusers_max_diff"] == 0.0, res
    # Wan 2.2 A14B: ComfyUI built both experts as WAN21 / WAN21_T2V from their keys; through its own
    # KSamplerAdvanced halves (6 steps split at 3) every evaluation carried the schedule's strength
    # at its global step, only its own expert's file, and left no hook nor changed weight; with
    # the two-experts loader (euler, dpm_2) and with the prompt tag node on each expert ("tags":
    # unet= keyframes on the high expert, the low expert's own low= keyframes)
    assert (res["wan_model_class"], res["wan_config_class"]) == ("WAN21", "WAN21_T2V"), res
    for sampler, evals in (("euler", 6), ("dpm_2", 11), ("tags", 6)):
        r = res[f"wan_{sampler}"]
        assert len(r["evaluations"]) == evals, r
        assert r["max_strength_error"] < 1e-5 and r["max_other_residual"] < 1e-5, r
        assert r["final_finite"] and r["weights_pristine"] and r["hooks_left"] == 0, r


# --- the two-expert Wan 2.2 A14B workflow against the ComfyUI fake -------------------------------
# A Wan 2.2 A14B workflow loads the high- and the low-noise expert as two MODELs and samples in
# two KSamplerAdvanced nodes over one step count: the high-noise expert for steps 0..k
# (return_with_leftover_noise), the low-noise one for k..n (add_noise off). A keyframed LoRA pair
# given through the two-experts loader must follow ONE schedule over the n steps: the low half's
# first step is global step k.
HOST_MODULES = ("comfy", "folder_paths", "nodes", "lora_ext.hosts.comfyui", "lora_ext_custom_nodes")
# what the pair's files change (original Wan names): {module: (rows, cols)} of the tiny model
PAIR_MODULES = {"blocks.0.self_attn.q": (32, 32), "blocks.1.ffn.0": (64, 32), "blocks.1.cross_attn.o": (32, 32)}


def _pair_files(folder, seed):
    """A HIGH file in musubi's names (alpha 2, rank 4) and a LOW file in native PEFT names
    (scale 1), with different factors: {expert: {module: delta at strength 1}}."""
    g = torch.Generator().manual_seed(seed)
    deltas = {"high": {}, "low": {}}
    high, low = {}, {}
    for mod, (rows, cols) in PAIR_MODULES.items():
        down, up = torch.randn(4, cols, generator=g) * 0.2, torch.randn(rows, 4, generator=g) * 0.2
        k = "lora_unet_" + mod.replace(".", "_")
        high.update({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(2.0)})
        deltas["high"][mod] = up @ down * 0.5
        a, b = torch.randn(4, cols, generator=g) * 0.2, torch.randn(rows, 4, generator=g) * 0.2
        low.update({f"diffusion_model.{mod}.lora_A.weight": a, f"diffusion_model.{mod}.lora_B.weight": b})
        deltas["low"][mod] = b @ a
    save_file(high, os.path.join(folder, "wanpair_HIGH_fp16.safetensors"))
    save_file(low, os.path.join(folder, "wanpair_LOW_fp16.safetensors"))
    return deltas


@pytest.fixture
def wan_comfy(tmp_path, monkeypatch):
    purge(*HOST_MODULES)
    monkeypatch.syspath_prepend(os.path.join(FAKES, "comfyui"))
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import folder_paths
    import nodes

    (tmp_path / "loras").mkdir()
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], folder_paths.supported_pt_extensions)
    experts = {}
    for expert, seed in (("high", 0), ("low", 1)):  # two experts: the same architecture, other weights
        tree = OriginalTree(original_state(tiny("wan", seed=seed, image_dim=None, added_kv_proj_dim=None)))
        base = comfy.model_base.WAN21(tree)
        experts[expert] = types.SimpleNamespace(
            patcher=comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu")), tree=tree,
            pristine={k: v.clone() for k, v in tree.state_dict().items()})
    spec = importlib.util.spec_from_file_location("lora_ext_custom_nodes", os.path.join(ROOT, "__init__.py"))
    package = importlib.util.module_from_spec(spec)
    sys.modules["lora_ext_custom_nodes"] = package
    spec.loader.exec_module(package)
    ns = types.SimpleNamespace(nodes=package.NODE_CLASS_MAPPINGS, experts=experts, comfy=comfy, host_nodes=nodes,
                               deltas=_pair_files(str(tmp_path / "loras"), 7))
    yield ns
    comfy.model_management.unload_all_models()
    purge(*HOST_MODULES)


def _run_two_halves(ns, high, low, steps, split, sampler="euler", scheduler="simple", leftover="enable"):
    """The two KSamplerAdvanced nodes of a Wan 2.2 A14B workflow; returns, per model evaluation,
    (expert, index of the evaluation in its half, {module: the module's output change on a probe
    input}) in the order ComfyUI evaluates."""
    seen = []
    probes = {mod: torch.randn(3, cols, generator=torch.Generator().manual_seed(5)) for mod, (_, cols) in
              PAIR_MODULES.items()}

    def observer(expert):
        ex = ns.experts[expert]
        count = [0]

        def observe(patcher, timestep):  # after lora-ext's own ON_PREPARE_STATE callback
            changes = {}
            with torch.no_grad():
                for mod, x in probes.items():
                    m = ex.tree.get_submodule(mod)
                    w0 = ex.pristine[f"{mod}.weight"]
                    b0 = ex.pristine.get(f"{mod}.bias")
                    changes[mod] = m(x) - torch.nn.functional.linear(x, w0, b0)
            seen.append((expert, count[0], float(timestep.max()), changes))
            count[0] += 1

        return observe

    pe = ns.comfy.patcher_extension
    high, low = high.clone(), low.clone()
    high.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, "test-observer", observer("high"))
    low.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, "test-observer", observer("low"))
    adv = ns.host_nodes.NODE_CLASS_MAPPINGS["KSamplerAdvanced"]()
    latent = {"samples": torch.zeros(1, 4, 1, 4, 4)}
    (mid,) = adv.sample(high, "enable", 3, steps, 1.0, sampler, scheduler, None, None, latent, 0, split, leftover)
    adv.sample(low, "disable", 3, steps, 1.0, sampler, scheduler, None, None, mid, split, 10000, "disable")
    return seen


def _strength_seen(changes, delta, x):
    """The strength s with ``change == s * x @ delta.T``, and the residual (max relative)."""
    d = torch.nn.functional.linear(x, delta)
    s = float((changes * d).sum() / (d * d).sum())
    return s, float((changes - s * d).abs().max() / d.abs().max())


def _check_schedule(ns, seen, steps, split, want, evals_per_step=1):
    """Each evaluation of each half: the strength on every module of that expert's file equals
    the schedule's value at the evaluation's global step; the other expert's file is not there."""
    probes = {mod: torch.randn(3, cols, generator=torch.Generator().manual_seed(5)) for mod, (_, cols) in
              PAIR_MODULES.items()}
    got = {}
    for expert, i, _, changes in seen:
        step = i // evals_per_step + (split if expert == "low" else 0)
        for mod, ch in changes.items():
            s, resid = _strength_seen(ch, ns.deltas[expert][mod], probes[mod])
            assert resid < 1e-5, f"{expert} step {step} {mod}: not (only) this expert's LoRA (residual {resid:.2e})"
            got.setdefault((expert, step), set()).add(round(s, 5))
    assert sorted(got) == [("high", i) for i in range(split)] + [("low", i) for i in range(split, steps)], sorted(got)
    for (expert, step), values in got.items():
        assert len(values) == 1, (expert, step, values)
        assert abs(values.pop() - want[step]) < 1e-5, (expert, step, want[step])


@pytest.mark.parametrize("sampler,evals", [("euler", 1), ("dpm_2", 2)])
def test_wan22_two_expert_keyframes_follow_one_schedule_across_the_halves(wan_comfy, sampler, evals):
    ns = wan_comfy
    hi, lo = ns.experts["high"].patcher, ns.experts["low"].patcher
    # strength 0.8, keyframes in step numbers over the 6 steps: 0.2@0 -> 1@3 -> 0.4@5
    high, low = ns.nodes["LoraExtExpertLoader"]().load(hi, lo, "wanpair_LOW_fp16.safetensors", 0.8,
                                                         keyframes="0.2@0,1@3,0.4@5")
    want = [0.8 * v for v in (0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0, 0.7, 0.4)]
    seen = _run_two_halves(ns, high, low, 6, 3, sampler=sampler)
    if evals == 2:  # a second-order sampler: the evaluation inside step i has step i's strengths
        n_high = sum(1 for s in seen if s[0] == "high")
        assert n_high == 2 * 3 and len(seen) == 2 * 6 - 1, [s[:3] for s in seen]  # no mid-point past sigma 0
    _check_schedule(ns, seen, 6, 3, want, evals)
    # the experts' weights are untouched (the schedule ran as hooks), and no hook is left
    for ex in ns.experts.values():
        assert all(torch.equal(v, ex.pristine[k]) for k, v in ex.tree.state_dict().items())
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ex.tree.modules())


def test_wan22_two_expert_low_strength_and_split_point(wan_comfy):
    """The low expert's own strength; a 5-step run split at 2 with the first half fully denoised
    (KSamplerAdvanced zeroes the slice's last sigma in KSampler's own list)."""
    ns = wan_comfy
    hi, lo = ns.experts["high"].patcher, ns.experts["low"].patcher
    high, low = ns.nodes["LoraExtExpertLoader"]().load(hi, lo, "wanpair_HIGH_fp16.safetensors", 1.0, 0.5,
                                                         keyframes="0@0,1@1")
    seen = _run_two_halves(ns, high, low, 5, 2, leftover="disable", scheduler="normal")
    frac = [i / 4 for i in range(5)]  # fractions of the run: step i of 5 is at i / (5 - 1)
    want = [f * (1.0 if i < 2 else 0.5) for i, f in enumerate(frac)]
    _check_schedule(ns, seen, 5, 2, want)


def test_two_halves_without_the_whole_schedule_would_restart_the_schedule(wan_comfy, monkeypatch):
    """The check has teeth: with the whole-run sigmas not found (each half taken as a run of its
    own), the low half's strengths are off schedule and the check says so."""
    ns = wan_comfy
    from lora_ext.hosts.comfyui import patching

    monkeypatch.setattr(patching, "whole_schedule", lambda sigmas: sigmas)
    hi, lo = ns.experts["high"].patcher, ns.experts["low"].patcher
    high, low = ns.nodes["LoraExtExpertLoader"]().load(hi, lo, "wanpair_LOW_fp16.safetensors", 0.8,
                                                         keyframes="0.2@0,1@3,0.4@5")
    want = [0.8 * v for v in (0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0, 0.7, 0.4)]
    seen = _run_two_halves(ns, high, low, 6, 3)
    with pytest.raises(AssertionError):
        _check_schedule(ns, seen, 6, 3, want)


def test_prompt_tag_node_applies_the_pairs_file_of_its_expert(wan_comfy):
    """LoRA Tags from Prompt with ``expert`` high / low: a tag naming the HIGH/LOW pair applies
    that expert's file, at its own ``low=`` strength; without an expert, the HIGH file (as a host
    that knows no experts loads it)."""
    ns = wan_comfy
    tags = ns.nodes["LoraExtPromptLoader"]()
    ksampler = ns.host_nodes.NODE_CLASS_MAPPINGS["KSampler"]()
    x = {mod: torch.randn(3, cols, generator=torch.Generator().manual_seed(5)) for mod, (_, cols) in PAIR_MODULES.items()}
    for expert, file_of, want in (("high", "high", 0.8), ("low", "low", 0.3), ("none", "high", 0.8)):
        ex = ns.experts["low" if expert == "low" else "high"]
        m, _, text = tags.load(ex.patcher, None, "a fox <lora:wanpair_fp16:0.8:low=0.3>", expert=expert)
        assert text == "a fox"
        ksampler.sample(m, 1, 2, 1.0, "euler", "simple", None, None, {"samples": torch.zeros(1, 4, 1, 4, 4)})
        with torch.no_grad():  # the loaded clone's weight patches are on the shared weights
            for mod, xi in x.items():
                w0 = ex.pristine[f"{mod}.weight"]
                got = torch.nn.functional.linear(xi, ex.tree.get_submodule(mod).weight - w0)
                s, resid = _strength_seen(got, ns.deltas[file_of][mod], xi)
                assert abs(s - want) < 1e-5 and resid < 1e-5, (expert, mod, s, resid)
        ns.comfy.model_management.unload_all_models()
