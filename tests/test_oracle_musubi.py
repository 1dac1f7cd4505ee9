"""musubi-tuner as an oracle (issue 12): files written by musubi-tuner's own network modules
(``networks/lora.py`` for HunyuanVideo, ``lora_wan.py`` for Wan, ``lora_zimage.py`` for Z-Image,
``lokr.py`` / ``loha.py``) on tiny models of musubi's own classes (``wan.modules.model.WanModel``,
``hunyuan_model.models.HYVideoDiffusionTransformer``, ``zimage.zimage_model.ZImageTransformer2DModel``),
applied by lora-ext, must give musubi's
forward with the network attached (fp32, max relative error <= 1e-5; alpha != rank, so a reader
that ignores the stored alpha fails). The same files after musubi's converter
(``convert_lora.py --target other``: ``diffusion_model.*.lora_A/B`` with sqrt(alpha/rank) baked
into both factors, no alpha) must give the same output, as must Z-Image files after musubi's
ComfyUI converter (q|k|v joined into the fused ``attention.qkv``); and Wan and HunyuanVideo files
land on the diffusers twins (``WanTransformer3DModel``; ``HunyuanVideoTransformer3DModel`` with
split q / k / v / proj_mlp where musubi's model fuses them) as on musubi's own models.

musubi-tuner is read from a checkout at test time, never vendored: set ``LORA_EXT_MUSUBI_DIR``
to it (the folder holding ``src/musubi_tuner``). It is not installed; these tests import its
modules from there. Two spots of it do not run on a CPU-only torch, and the tests step around
them without changing what is measured:

* ``musubi_tuner/wan/modules/__init__.py`` imports ``t5.py``, whose ``T5EncoderModel`` has a
  default argument ``device=torch.cuda.current_device()`` (evaluated at import: "Torch not
  compiled with CUDA enabled"), and ``tokenizers.py`` (needs ``ftfy``). The model module
  ``wan/modules/model.py`` needs neither: the two packages are entered as empty namespace
  packages so their ``__init__`` does not run.
* ``hunyuan_model/attention.py get_cu_seqlens`` allocates on ``device="cuda"``; the HunyuanVideo
  forward here uses a CPU copy of it (the same six lines, written here). Its output only feeds
  flash attention; the torch attention mode ignores it.
"""
import copy
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_ext.engine import apply
from lora_ext.hostmodel import HostModel, bind

MUSUBI_DIR = os.environ.get("LORA_EXT_MUSUBI_DIR", "")
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(MUSUBI_DIR, "src", "musubi_tuner")),
                                reason="set LORA_EXT_MUSUBI_DIR to a musubi-tuner checkout to run these oracles")


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def musubi():
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)  # musubi's modules call logging.basicConfig(INFO)
    src = os.path.join(MUSUBI_DIR, "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    import musubi_tuner  # noqa: F401

    for name in ("musubi_tuner.wan", "musubi_tuner.wan.modules"):  # skip their CUDA-bound __init__
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [os.path.join(src, *name.split("."))]
            sys.modules[name] = mod
    import musubi_tuner.convert_lora as convert
    import musubi_tuner.hunyuan_model.models as hv
    import musubi_tuner.networks.loha as loha
    import musubi_tuner.networks.lokr as lokr
    import musubi_tuner.networks.lora as lora
    import musubi_tuner.networks.convert_z_image_lora_to_comfy as zimage_to_comfy
    import musubi_tuner.networks.lora_wan as lora_wan
    import musubi_tuner.networks.lora_zimage as lora_zimage
    import musubi_tuner.wan.modules.model as wan
    import musubi_tuner.zimage.zimage_model as zimage

    root.setLevel(level)
    root.handlers[:] = handlers
    return types.SimpleNamespace(wan=wan, hv=hv, lora=lora, lora_wan=lora_wan, lokr=lokr, loha=loha, convert=convert,
                                 zimage=zimage, lora_zimage=lora_zimage, zimage_to_comfy=zimage_to_comfy)


def _cu_seqlens_cpu(text_mask, img_len):
    b = text_mask.shape[0]
    n = text_mask.sum(dim=1)
    full = text_mask.shape[1] + img_len
    out = torch.zeros([2 * b + 1], dtype=torch.int32)
    for i in range(b):
        out[2 * i + 1] = i * full + n[i] + img_len
        out[2 * i + 2] = (i + 1) * full
    return out


def _randomised(make, seed=0):
    """``make()`` built under a fixed seed, every weight non-trivial: initialised ones get noise,
    ones the class leaves uninitialised (``torch.empty``: Z-Image's pad tokens) are drawn afresh."""
    torch.manual_seed(seed)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            if not bool(torch.isfinite(p).all()) or float(p.abs().max()) > 10:
                p.copy_(torch.randn_like(p) * 0.05)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _wan(ms):
    return _randomised(lambda: ms.wan.WanModel(model_type="t2v", dim=32, ffn_dim=64, freq_dim=16, text_dim=8, out_dim=4,
                                               in_dim=4, num_heads=2, num_layers=2, attn_mode="torch"))


def _wan_forward(model):
    g = torch.Generator().manual_seed(1)
    x, ctx = [torch.randn(4, 1, 4, 4, generator=g)], [torch.randn(5, 8, generator=g)]
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), ctx, seq_len=4)[0]


def _hv(ms):
    return _randomised(lambda: ms.hv.HYVideoDiffusionTransformer(
        text_states_dim=16, text_states_dim_2=8, in_channels=4, out_channels=4, hidden_size=32, heads_num=2,
        mm_double_blocks_depth=2, mm_single_blocks_depth=2, rope_dim_list=[4, 6, 6], guidance_embed=True,
        attn_mode="torch"))


def _hv_forward(model):
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(4, 16, generator=g)
    with torch.no_grad():
        return model(x=torch.randn(1, 4, 1, 4, 4, generator=g), t=torch.tensor([500.0]),
                     text_states=torch.randn(1, 5, 16, generator=g), text_mask=torch.ones(1, 5, dtype=torch.long),
                     text_states_2=torch.randn(1, 8, generator=g), freqs_cos=theta.cos(), freqs_sin=theta.sin(),
                     guidance=torch.tensor([3500.0]), return_dict=False)


def _write(network_module, base, path, forward, seed=3, **kwargs):
    """musubi's network on a copy of ``base``, every factor random; its forward and its file."""
    model = copy.deepcopy(base)
    net = network_module.create_arch_network(1.0, 4, 2.0, None, [], model, **kwargs)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "lokr_w1" not in name else 0.5))
    want = forward(model)
    net.save_weights(path, torch.float32, {})
    return want, len(net.unet_loras)


def _ours(base, path, naming="ldm"):
    """lora-ext fuses ``path`` into a copy of ``base`` (musubi's Wan / HunyuanVideo models have the
    original names; its Z-Image model diffusers')."""
    model = copy.deepcopy(base)
    bound = bind(HostModel({"unet": model}, naming=naming))
    h = apply({"unet": bound.views["unet"]}, [path], "fuse", keymap=bound.keymap_for(["unet"]))
    return model, h


def _converted(ms, path, out):
    """musubi's ``convert_lora.py --target other`` on ``path`` (its own function)."""
    sd = ms.convert.convert_to_diffusers("lora_unet_", None, load_file(path))
    save_file(sd, out)
    return sd


# musubi's LoKr: factor 2 gives w1 full and w2 = w2_a @ w2_b (scale alpha / rank = 0.5); factor 4
# gives a full w2 on the 32-wide modules, where musubi stores alpha = rank (scale 1) whatever was
# asked, and w2_a @ w2_b on the 64-wide ffn.0: both kinds in one file
@pytest.mark.parametrize("kind,alpha", [("lora", {2.0}), ("lokr-f2", {2.0}), ("lokr-f4", {2.0, 4.0}),
                                        ("loha", {2.0})])
def test_musubi_wan_files_apply_as_musubi_runs_them(musubi, tmp_path, kind, alpha):
    ms = musubi
    base = _wan(ms)
    module = {"lora": ms.lora_wan, "lokr-f2": ms.lokr, "lokr-f4": ms.lokr, "loha": ms.loha}[kind]
    kw = {"factor": int(kind[-1])} if kind.startswith("lokr") else {}
    path = str(tmp_path / f"wan_{kind}.safetensors")
    want, n = _write(module, base, path, _wan_forward, **kw)
    keys = load_file(path)
    assert n == 20 and "lora_unet_blocks_1_cross_attn_o.alpha" in keys  # 2 blocks x (4 self + 4 cross + 2 ffn)
    assert {float(v) for k, v in keys.items() if k.endswith(".alpha")} == alpha
    assert (kind != "lokr-f2") or any(k.endswith(".lokr_w2_a") for k in keys)
    model, h = _ours(base, path)
    assert h.unmatched == []
    assert _max_rel(_wan_forward(model), want) <= 1e-5
    assert _max_rel(_wan_forward(base), want) > 1e-3, "the adapter changes the output"
    if kind == "lora":  # the converter's output (sqrt(alpha/rank) in both factors, no alpha)
        sd = _converted(ms, path, str(tmp_path / "wan_other.safetensors"))
        assert not [k for k in sd if k.endswith("alpha")] and "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in sd
        model2, h2 = _ours(base, str(tmp_path / "wan_other.safetensors"))
        assert h2.unmatched == []
        assert _max_rel(_wan_forward(model2), want) <= 1e-5


def test_musubi_wan_file_on_the_diffusers_twin(musubi, tmp_path):
    """The musubi-named file on diffusers' WanTransformer3DModel holding the same weights: the
    merged weights, in musubi's names, equal the merge into musubi's model."""
    from dit_models import diffusers_state, dit_table, tiny

    ms = musubi
    base = _wan(ms)
    path = str(tmp_path / "wan.safetensors")
    _write(ms.lora_wan, base, path, _wan_forward)
    ours, _ = _ours(base, path)
    twin = tiny("wan", image_dim=None, added_kv_proj_dim=None, text_dim=8, freq_dim=16, ffn_dim=64)
    table = dit_table(twin)
    mapped = diffusers_state(base.state_dict(), table)
    missing = twin.load_state_dict(mapped, strict=False)
    assert not [k for k in missing.missing_keys if "blocks." in k and ("attn" in k or "ffn" in k)], missing
    h = apply(twin, [path], "fuse")
    assert h.unmatched == []
    merged = diffusers_state(ours.state_dict(), table)
    tw = twin.state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], mapped[k])]
    assert len(changed) == 20
    assert max(_max_rel(tw[k], merged[k]) for k in changed) <= 1e-6


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_musubi_hunyuan_video_files_apply_as_musubi_runs_them(musubi, tmp_path, monkeypatch, kind):
    ms = musubi
    monkeypatch.setattr(ms.hv, "get_cu_seqlens", _cu_seqlens_cpu)
    base = _hv(ms)
    module = {"lora": ms.lora, "lokr": ms.lokr, "loha": ms.loha}[kind]
    kw = {"factor": 2} if kind == "lokr" else {}
    path = str(tmp_path / f"hv_{kind}.safetensors")
    want, n = _write(module, base, path, _hv_forward, **kw)
    keys = load_file(path)
    # 2 double blocks x 8 (img/txt qkv, proj, mlp_fc1, mlp_fc2) + 2 single blocks x 2 (linear1, linear2)
    assert n == 20 and any("_img_mlp_fc1." in k for k in keys) and any("single_blocks_1_linear1." in k for k in keys)
    model, h = _ours(base, path)
    assert h.unmatched == []
    assert _max_rel(_hv_forward(model), want) <= 1e-5
    assert _max_rel(_hv_forward(base), want) > 1e-3, "the adapter changes the output"
    if kind == "lora":
        sd = _converted(ms, path, str(tmp_path / "hv_other.safetensors"))
        assert "diffusion_model.double_blocks.0.img_mlp.fc1.lora_A.weight" in sd, sorted(sd)[:6]
        assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight" in sd
        model2, h2 = _ours(base, str(tmp_path / "hv_other.safetensors"))
        assert h2.unmatched == []
        assert _max_rel(_hv_forward(model2), want) <= 1e-5


def _zi(ms):
    return _randomised(lambda: ms.zimage.ZImageTransformer2DModel(
        in_channels=4, dim=48, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=8,
        axes_dims=[4, 6, 6], axes_lens=[256, 16, 16]))


def _zi_forward(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(1, 4, 1, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 5, 8, generator=g),
                     torch.ones(1, 5, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_musubi_z_image_files_and_their_comfyui_conversion(musubi, tmp_path, kind):
    """musubi's Z-Image network (networks/lora_zimage.py: ``lora_unet_layers_N_attention_to_q`` ...,
    refiners and modulation excluded) on musubi's own Z-Image model; and the file after musubi's
    ComfyUI converter (networks/convert_z_image_lora_to_comfy.py: q|k|v joined into
    ``attention_qkv`` block-diagonally with rank and alpha x3, ``attention_out``) applied to the
    original-layout twin (fused ``attention.qkv``) gives the same output."""
    from dit_models import OriginalTree, diffusers_state, dit_table, original_state

    ms = musubi
    base = _zi(ms)
    module = {"lora": ms.lora_zimage, "loha": ms.loha}[kind]
    path = str(tmp_path / f"zi_{kind}.safetensors")
    want, n = _write(module, base, path, _zi_forward)
    assert n == 14  # 2 layers x (q, k, v, out, w1, w2, w3)
    model, h = _ours(base, path, naming="diffusers")
    assert h.unmatched == []
    assert _max_rel(_zi_forward(model), want) <= 1e-5
    assert _max_rel(_zi_forward(base), want) > 1e-3, "the adapter changes the output"
    comfy = str(tmp_path / f"zi_{kind}_comfy.safetensors")
    ms.zimage_to_comfy.main(types.SimpleNamespace(src_path=path, dst_path=comfy, reverse=False, lokr_rank=None))
    keys = load_file(comfy)
    assert any(k.startswith("lora_unet_layers_0_attention_qkv.") for k in keys)
    assert any(k.startswith("lora_unet_layers_1_attention_out.") for k in keys)
    assert not any("to_q" in k or "to_out" in k for k in keys)
    table = dit_table(base)
    tree = OriginalTree(original_state(base, table))
    bound = bind(HostModel({"unet": tree}, naming="ldm"))
    h2 = apply({"unet": bound.views["unet"]}, [comfy], "fuse", keymap=bound.keymap_for(["unet"]))
    assert h2.unmatched == []
    twin = copy.deepcopy(base)
    twin.load_state_dict(diffusers_state(tree.state_dict(), table), strict=False)
    assert _max_rel(_zi_forward(twin), want) <= 1e-5


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_musubi_hunyuan_video_file_on_the_diffusers_twin(musubi, tmp_path, kind):
    """The musubi file (Tencent names: fused ``img_attn_qkv``, single blocks' ``linear1`` =
    q|k|v|mlp) on diffusers' HunyuanVideoTransformer3DModel holding the same weights (split
    to_q / to_k / to_v / proj_mlp): the merged weights, mapped back, equal the merge into musubi's
    own model (whose forward equals musubi's, above)."""
    from dit_models import diffusers_state, tiny

    from lora_ext import dit

    ms = musubi
    base = _hv(ms)
    module = {"lora": ms.lora, "lokr": ms.lokr, "loha": ms.loha}[kind]
    path = str(tmp_path / f"hv_{kind}.safetensors")
    _write(module, base, path, lambda m: None, **({"factor": 2} if kind == "lokr" else {}))
    ours, _ = _ours(base, path)
    _, naming, table = dit.table_for_shapes({k: tuple(v.shape) for k, v in base.state_dict().items()})
    assert naming == "ldm"
    twin = tiny("hunyuan_video", num_refiner_layers=2, patch_size=2)
    mapped = diffusers_state(base.state_dict(), table)
    res = twin.load_state_dict(mapped, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    h = apply(twin, [path], "fuse")
    assert h.unmatched == []
    merged = diffusers_state(ours.state_dict(), table)
    tw = twin.state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], mapped[k])]
    # 2 double blocks x (img/txt: q, k, v, proj, fc1, fc2) + 2 single blocks x (q, k, v, mlp, linear2)
    assert len(changed) == 2 * 12 + 2 * 5, len(changed)
    assert max(_max_rel(tw[k], merged[k]) for k in changed) <= 1e-6
