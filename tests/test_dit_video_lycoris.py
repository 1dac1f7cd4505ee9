"""LyCORIS as an oracle on the video and newer DiT families (issue 12): files written by
lycoris-lora's own network (``create_lycoris`` + ``save_weights``) on tiny diffusers
HunyuanVideo, Wan, Lumina2 and Z-Image denoisers, applied by lora-ext, reproduce LyCORIS's own
forward with the network attached (fp32, max relative error <= 1e-5); each file also goes onto
the model's original-layout twin (fused qkv / linear1, Wan's norm2/norm3 swap) and must give
the same merged weights (bit-identical for plain LoRA) and forward output, with a bit-exact
restore (``test_dit_oracles._apply_both``)."""
import copy

import pytest
import torch

from dit_models import forward, max_rel, tiny
from test_dit_oracles import LYCORIS_CASES, _apply_both

lycoris = pytest.importorskip("lycoris")

#: the transformer blocks LyCORIS wraps, per family (its preset's target_module)
BLOCKS = {
    "hunyuan_video": ["HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
                      "HunyuanVideoIndividualTokenRefinerBlock"],
    "wan": ["WanTransformerBlock"],
    "lumina2": ["Lumina2TransformerBlock"],
    "z_image": ["ZImageTransformerBlock"],
}
CASES = ("lora", "loha", "lokr", "full")


@pytest.fixture
def preset(request):
    from lycoris.wrapper import LycorisNetwork

    saved = {k: getattr(LycorisNetwork, k) for k in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV")}
    LycorisNetwork.apply_preset({"target_module": BLOCKS[request.param], "enable_conv": False})
    yield request.param
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("preset", sorted(BLOCKS), indirect=True)
def test_lycoris_file_reproduces_lycoris_forward(tmp_path, preset, case):
    family = preset
    base = tiny(family)
    model = copy.deepcopy(base)
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=3, **LYCORIS_CASES[case])
    net.apply_to()
    assert len(net.loras) > 0, "LyCORIS wrapped nothing"
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("diff", "diff_b")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    want = forward(model, family)
    path = tmp_path / f"{family}_{case}.safetensors"
    net.save_weights(str(path), torch.float32, None)
    got_model, h = _apply_both(base, family, path, exact=case == "lora")
    assert h.unmatched == []
    assert max_rel(forward(got_model, family), want) <= 1e-5
    assert max_rel(forward(base, family), want) > 1e-3, "the file changes the model"
