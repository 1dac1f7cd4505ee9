"""Tiny SD-shaped models built from configs with seeded random weights (no download).

The UNet has cross-attention, 1x1 convs (proj_in/out, conv_shortcut) and 3x3 convs (resnet
convs, down/upsamplers); the text encoder is a 2-layer CLIP. ``save_pipeline`` writes them as
a diffusers folder, the layout ``lora-ext merge`` reads.
"""
import os

import torch

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
)
TE_CONFIG = dict(
    hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=64,
    max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16,
)


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    with torch.no_grad():  # default init leaves some weights zero; make every module matter
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def tiny_text_encoder(seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TE_CONFIG)).eval()


def unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g))


def te_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (2, 6), generator=g)


@torch.no_grad()
def unet_out(unet, inputs=None):
    sample, t, ctx = inputs or unet_inputs()
    return unet(sample, t, encoder_hidden_states=ctx).sample


@torch.no_grad()
def te_out(te, ids=None):
    return te(ids if ids is not None else te_inputs()).last_hidden_state


def save_pipeline(folder, unet=None, te=None):
    os.makedirs(folder, exist_ok=True)
    if unet is not None:
        unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    if te is not None:
        te.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    return folder


def load_pipeline(folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
    te = None
    if os.path.isdir(os.path.join(folder, "text_encoder")):
        te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
    return unet, te


def ldm_tree(table, model):
    """The compvis (ldm) view of ``model``: its modules re-parented under their ``ldm_path`` from
    lora-ext's module ``table``, the very same module objects (the fake hosts' compvis UNets)."""
    root = torch.nn.Module()
    for path, info in table.items():
        if info.ldm_path is None:
            continue
        parts = info.ldm_path.split(".")
        cur = root
        for q in parts[:-1]:
            if not hasattr(cur, q):
                cur.add_module(q, torch.nn.Module())
            cur = getattr(cur, q)
        cur.add_module(parts[-1], model.get_submodule(path))
    return root


def max_rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def one_thread_fixture():
    """A module-scoped autouse fixture running the module's tests on one intra-op thread.

    Tiny models and small matrices are all overhead: a second BLAS/LAPACK thread only adds
    contention (10x slower on a busy box). Use as ``one_thread = one_thread_fixture()``.
    """
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def one_thread():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(n)

    return one_thread
