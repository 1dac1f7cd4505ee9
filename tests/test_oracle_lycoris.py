"""Oracle: every LyCORIS algorithm, on files lycoris-lora 4.1.3 writes for a tiny UNet (1x1 and
3x3 convs, attention) and a CLIP text encoder, merged by ``lora-ext merge`` at strength 1,
must reproduce lycoris's own forward pass with the network attached (fp32, max relative
error <= 1e-5). Its merge helpers are not the reference (they apply alpha/rank twice for
LoHa/LoKr); alpha != rank everywhere so such bugs would show.
"""
import pytest
import torch
from safetensors.torch import load_file

from lora_ext.merge import merge
from tiny_models import load_pipeline, max_rel_err, save_pipeline, te_out, tiny_text_encoder, tiny_unet, unet_out

lycoris = pytest.importorskip("lycoris")

ALGOS = {
    "locon": dict(algo="locon"),
    "locon-tucker": dict(algo="locon", use_tucker=True),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-decompose-both": dict(algo="lokr", factor=4, decompose_both=True),
    "lokr-tucker": dict(algo="lokr", factor=4, use_tucker=True, decompose_both=True),
    "lokr-full-matrix": dict(algo="lokr", factor=4, full_matrix=True),
    "dora-locon-out": dict(algo="locon", dora_wd=True, wd_on_output=True),
    "dora-locon-in": dict(algo="locon", dora_wd=True, wd_on_output=False),
    "dora-loha": dict(algo="loha", dora_wd=True),
    "dora-lokr-in": dict(algo="lokr", factor=4, dora_wd=True, wd_on_output=False),
    "ia3": dict(algo="ia3"),
    "diag-oft": dict(algo="diag-oft", block_size=4),
    "diag-oft-constrained": dict(algo="diag-oft", block_size=4, constraint=0.05, rescaled=True),
    "boft": dict(algo="boft", block_size=4),
    "glora": dict(algo="glora"),
    "full": dict(algo="full"),
    "norms": dict(algo="locon", train_norm=True),
}


def _randomise(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "oft_blocks" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "dora_scale" in name or "rescale" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("diff") or name.endswith("diff_b") or "w_norm" in name or "b_norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _attach(model, kw, seed):
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=3, conv_dim=4, conv_alpha=2, **kw)
    net.apply_to()
    _randomise(net, seed)
    return net


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    save_pipeline(folder, tiny_unet(), tiny_text_encoder())
    return folder


@pytest.mark.parametrize("case", list(ALGOS))
def test_lycoris_algo_merge_matches_forward(base, tmp_path, case):
    kw = ALGOS[case]
    unet, te = load_pipeline(base)
    unet_net = _attach(unet, kw, 1)
    te_net = _attach(te, kw, 2)
    want_unet, want_te = unet_out(unet), te_out(te)
    unet_net.save_weights(str(tmp_path / "unet.safetensors"), torch.float32, {})
    te_net.save_weights(str(tmp_path / "te.safetensors"), torch.float32, {})

    reports = merge(base, [(tmp_path / "unet.safetensors", 1.0), (tmp_path / "te.safetensors", 1.0)], tmp_path / "merged")
    for r in reports:
        assert r.unmatched == [], r.unmatched[:3]
        assert r.applied > 0
    unet2, te2 = load_pipeline(tmp_path / "merged")
    err_unet = max_rel_err(unet_out(unet2), want_unet)
    err_te = max_rel_err(te_out(te2), want_te)
    assert err_unet <= 1e-5, err_unet
    assert err_te <= 1e-5, err_te
    # the network really changes the output, so the check is not vacuous
    unet0, te0 = load_pipeline(base)
    assert max_rel_err(unet_out(unet0), want_unet) > 1e-4
    assert max_rel_err(te_out(te0), want_te) > 1e-4
    # strength 0 is an exact no-op for every type
    merge(base, [(tmp_path / "unet.safetensors", 0.0), (tmp_path / "te.safetensors", 0.0)], tmp_path / "zero")
    for sub, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        got, ref = load_file(tmp_path / "zero" / sub / fname), load_file(base / sub / fname)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
