"""``lora-ext merge`` into DiT single files (issue 15): BFL-style (no prefix), ComfyUI-saved
(``model.diffusion_model.`` with ``text_encoders.*``) and diffusers-named transformer files.
The merged file, mapped to the diffusers layout, equals the live engine's fuse of the same LoRA
into the diffusers twin; nothing else in the file changes; fp16 files stay fp16.
"""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_models import dit_table, diffusers_state, original_state, tiny
from lora_ext.engine import apply
from lora_ext.merge import merge


def _kohya_and_peft_lora(path, h=32, m=128, r=4):
    g = torch.Generator().manual_seed(4)
    sd = {}
    for name, out, inp in (("lora_unet_double_blocks_1_img_attn_qkv", 3 * h, h), ("lora_unet_single_blocks_0_linear1", 3 * h + m, h),
                           ("lora_unet_final_layer_adaLN_modulation_1", 2 * h, h), ("lora_unet_double_blocks_0_txt_mlp_2", h, m)):
        sd[f"{name}.lora_down.weight"] = torch.randn(r, inp, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(out, r, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(3.0)
    sd["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"] = torch.randn(r, h, generator=g)
    sd["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"] = torch.randn(h, r, generator=g)
    save_file(sd, path)


@pytest.mark.parametrize("root", ["", "model.diffusion_model.", "diffusion_model."])
def test_merge_into_flux_single_file_equals_engine(tmp_path, root):
    base = tiny("flux")
    table = dit_table(base)
    state = {root + k: v for k, v in original_state(base, table).items()}
    if root == "model.diffusion_model.":  # ComfyUI saves unrelated tensors too (VAE, text encoders)
        state["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    save_file(state, tmp_path / "flux.safetensors")
    _kohya_and_peft_lora(tmp_path / "lora.safetensors")
    reports = merge(tmp_path / "flux.safetensors", [(tmp_path / "lora.safetensors", 0.8)], tmp_path / "out.safetensors")
    assert reports[0].unmatched == []
    merged = load_file(tmp_path / "out.safetensors")
    assert set(merged) == set(state)
    twin = copy.deepcopy(base)
    h = apply(twin, [(tmp_path / "lora.safetensors", 0.8)], "fuse")
    assert h.unmatched == []
    back = diffusers_state({k[len(root):]: v for k, v in merged.items() if k.startswith(root)}, table)
    want = twin.state_dict()
    changed = 0
    for k, t in back.items():
        assert torch.allclose(t, want[k], rtol=0, atol=1e-6), k
        changed += not torch.equal(t, base.state_dict()[k])
    assert changed >= 8  # q, k, v of two blocks, linear1's four parts, the modulation, txt_mlp.2, to_v
    if root == "model.diffusion_model.":
        assert torch.equal(merged["first_stage_model.decoder.conv_in.weight"], state["first_stage_model.decoder.conv_in.weight"])


def test_merge_keeps_fp16_and_detects_sd3(tmp_path):
    base = tiny("sd3")
    table = dit_table(base)
    state = {"model.diffusion_model." + k: v.half() for k, v in original_state(base, table).items()}
    save_file(state, tmp_path / "sd3.safetensors")
    g = torch.Generator().manual_seed(1)
    sd = {"lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.lora_down.weight": torch.randn(4, 32, generator=g),
          "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.lora_up.weight": torch.randn(64, 4, generator=g),
          "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight": torch.randn(4, 32, generator=g),
          "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight": torch.randn(96, 4, generator=g)}
    save_file(sd, tmp_path / "lora.safetensors")
    reports = merge(tmp_path / "sd3.safetensors", [(tmp_path / "lora.safetensors", 1.0)], tmp_path / "out.safetensors")
    assert reports[0].unmatched == []
    merged = load_file(tmp_path / "out.safetensors")
    key = "model.diffusion_model.joint_blocks.2.context_block.adaLN_modulation.1.weight"
    assert merged[key].dtype == torch.float16
    # the original layout stores this (last-block) modulation as the LoRA does: no swap
    want = (state[key].float() + sd[key.replace("model.diffusion_model.", "lora_unet_").replace(".weight", "").replace(".", "_")
                                    + ".lora_up.weight"] @ sd["lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.lora_down.weight"]).half()
    assert torch.equal(merged[key], want)


def test_generate_refuses_a_dit_checkpoint_clearly(tmp_path, capsys):
    from lora_ext.cli import main

    save_file({"model.diffusion_model." + k: v for k, v in original_state(tiny("flux")).items()}, tmp_path / "f.safetensors")
    code = main(["generate", "--checkpoint", str(tmp_path / "f.safetensors"), "--prompt", "a cat", "--steps", "1",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "Flux.1 checkpoint" in err[0] and "ComfyUI" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_merge_into_a_diffusers_folder_with_transformer(tmp_path):
    """A diffusers pipeline folder whose denoiser is ``transformer/`` (Flux): a BFL-named kohya
    LoRA lands on the split modules exactly as the live engine puts it."""
    import json

    base = tiny("flux")
    folder = tmp_path / "flux-pipe"
    base.save_pretrained(folder / "transformer", safe_serialization=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    (folder / "notes.txt").write_text("not part of the pipeline")
    _kohya_and_peft_lora(tmp_path / "lora.safetensors")
    reports = merge(folder, [(tmp_path / "lora.safetensors", 0.8)], tmp_path / "out")
    assert reports[0].unmatched == []
    merged = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    twin = copy.deepcopy(base)
    apply(twin, [(tmp_path / "lora.safetensors", 0.8)], "fuse")
    want = twin.state_dict()
    assert set(merged) == set(want)
    for k, t in merged.items():
        assert torch.allclose(t, want[k], rtol=0, atol=1e-6), k
    assert not (tmp_path / "out" / "notes.txt").exists()


def test_convert_dit_lora_between_kohya_and_peft(tmp_path):
    """kohya (BFL names, fused qkv / linear1, the swapped modulation) -> PEFT (diffusers names,
    split q/k/v/mlp) -> kohya again: every file applies exactly like the original."""
    from lora_ext.tools.convert import convert

    base = tiny("flux")
    save_file({"model.diffusion_model." + k: v for k, v in original_state(base).items()}, tmp_path / "flux.safetensors")
    _kohya_and_peft_lora(tmp_path / "lora.safetensors")
    convert(tmp_path / "lora.safetensors", tmp_path / "peft.safetensors", to="peft", base=tmp_path / "flux.safetensors")
    convert(tmp_path / "peft.safetensors", tmp_path / "kohya.safetensors", to="kohya", base=tmp_path / "flux.safetensors")
    peft_keys = set(load_file(tmp_path / "peft.safetensors"))
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in peft_keys
    assert "transformer.norm_out.linear.lora_B.weight" in peft_keys
    kohya_keys = set(load_file(tmp_path / "kohya.safetensors"))
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya_keys
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in kohya_keys
    want = copy.deepcopy(base)
    apply(want, [tmp_path / "lora.safetensors"], "fuse")
    for name in ("peft.safetensors", "kohya.safetensors"):
        got = copy.deepcopy(base)
        h = apply(got, [tmp_path / name], "fuse")
        assert h.unmatched == []
        for k, t in want.state_dict().items():
            assert torch.allclose(got.state_dict()[k], t, rtol=0, atol=2e-6), (name, k)


def test_merge_into_an_fp8_flux_file_rounds_once_to_nearest(tmp_path):
    """An fp8 (float8_e4m3fn) single file: each patched weight is the fp32 result (the fp32
    upcast of the stored weight plus the fp32 delta) rounded once to nearest; the rest is
    untouched and stays fp8."""
    base = tiny("flux")
    state = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v) for k, v in original_state(base).items()}
    save_file(state, tmp_path / "flux_fp8.safetensors")
    _kohya_and_peft_lora(tmp_path / "lora.safetensors")
    merge(tmp_path / "flux_fp8.safetensors", [(tmp_path / "lora.safetensors", 1.0)], tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")
    lora = load_file(tmp_path / "lora.safetensors")
    key = "double_blocks.1.img_attn.qkv.weight"
    p = "lora_unet_double_blocks_1_img_attn_qkv"
    delta = 0.75 * lora[f"{p}.lora_up.weight"] @ lora[f"{p}.lora_down.weight"]
    want = (state[key].float() + delta).to(torch.float8_e4m3fn)
    assert merged[key].dtype == torch.float8_e4m3fn
    assert torch.equal(merged[key].view(torch.uint8), want.view(torch.uint8))
    untouched = "double_blocks.0.img_mod.lin.weight"
    assert torch.equal(merged[untouched].view(torch.uint8), state[untouched].view(torch.uint8))
