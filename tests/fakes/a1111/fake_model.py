"""A tiny stand-in for the model object A1111 v1.10.1 holds in ``shared.sd_model`` (an ldm
``LatentDiffusion`` after ``sd_hijack``): ``.model.diffusion_model`` is a compvis
``UNetModel`` (modules named ``input_blocks.1.1.proj_in`` ...), ``.cond_stage_model`` is
``FrozenCLIPEmbedderWithCustomWords`` whose ``.wrapped`` is ``FrozenCLIPEmbedder`` with the
transformers CLIP in ``.transformer`` (SD1), or ``FrozenOpenCLIPEmbedder`` whose ``.model``
holds OpenCLIP's modules (``transformer.resblocks.N.attn`` an ``nn.MultiheadAttention`` with
q/k/v fused in ``in_proj_weight``) for SD2; flags ``is_sd1``/``is_sd2``/``is_sdxl``.

The compvis tree is built by re-parenting the modules of a tiny diffusers UNet under their
ldm names (lora-ext's own module table gives the names), so both trees share the very same
module objects: ``apply_model`` runs the diffusers one, which exercises whatever lora-ext did
to those modules (fused weights or forward hooks).
"""
import types

import torch
from torch import nn

from tiny_models import ldm_tree  # a test helper (tests/tiny_models.py), not part of the host's layout


def openclip_tree(te):
    """OpenCLIP-named modules holding the weights of a tiny transformers CLIP (copies)."""
    cfg = te.config
    root = nn.Module()
    root.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    root.positional_embedding = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size))
    root.transformer = nn.Module()
    root.transformer.resblocks = nn.ModuleList()
    tm = te.text_model if hasattr(te, "text_model") else te
    with torch.no_grad():
        root.token_embedding.weight.copy_(tm.embeddings.token_embedding.weight)
        root.positional_embedding.copy_(tm.embeddings.position_embedding.weight)
        for layer in tm.encoder.layers:
            blk = nn.Module()
            blk.ln_1 = nn.LayerNorm(cfg.hidden_size)
            blk.ln_2 = nn.LayerNorm(cfg.hidden_size)
            blk.attn = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads)
            sa = layer.self_attn
            blk.attn.in_proj_weight.copy_(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]))
            blk.attn.in_proj_bias.copy_(torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias]))
            blk.attn.out_proj.weight.copy_(sa.out_proj.weight)
            blk.attn.out_proj.bias.copy_(sa.out_proj.bias)
            blk.mlp = nn.Module()
            blk.mlp.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
            blk.mlp.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
            for a, b in ((blk.ln_1, layer.layer_norm1), (blk.ln_2, layer.layer_norm2),
                         (blk.mlp.c_fc, layer.mlp.fc1), (blk.mlp.c_proj, layer.mlp.fc2)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            root.transformer.resblocks.append(blk)
        root.ln_final = nn.LayerNorm(cfg.hidden_size)
        root.ln_final.weight.copy_(tm.final_layer_norm.weight)
        root.ln_final.bias.copy_(tm.final_layer_norm.bias)
    return root


class FakeSDModel:
    def __init__(self, unet, unet_table, te=None, openclip=None, name="tiny.safetensors"):
        self.model = types.SimpleNamespace(diffusion_model=ldm_tree(unet_table, unet))
        self.diffusers_unet = unet
        self.te = te
        if openclip is not None:
            wrapped = types.SimpleNamespace(model=openclip)
            self.is_sd1, self.is_sd2 = False, True
        else:
            wrapped = types.SimpleNamespace(transformer=te)
            self.is_sd1, self.is_sd2 = True, False
        self.is_sdxl = False
        self.cond_stage_model = types.SimpleNamespace(wrapped=wrapped)
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra=name.rsplit(".", 1)[0], filename=name)
        self.observers = []  # called as observer(stage, info) while generating

    def get_learned_conditioning(self, prompts):
        out = None
        if self.te is not None:
            ids = torch.arange(2, 8).reshape(1, 6)
            out = self.te(ids).last_hidden_state
        for obs in self.observers:
            obs("te", {"prompts": list(prompts), "cond": out})
        return out

    def apply_model(self, x, sigma, cond):
        for obs in self.observers:
            obs("unet", {"sigma": sigma})
        ctx = torch.zeros(x.shape[0], 5, self.diffusers_unet.config.cross_attention_dim)
        return self.diffusers_unet(x, sigma.reshape(-1) * 100, encoder_hidden_states=ctx).sample


class ReForgeSDXLModel(FakeSDModel):
    """reForge's SDXL (modules_forge/forge_loader.py ~L459-505 at 3b56b268): the conditioner's
    embedders hold ldm_patched CLIPs with transformers names under ``wrapped.transformer``
    (CLIP-L and CLIP-G alike; A1111 keeps CLIP-G as an OpenCLIP model instead)."""

    def __init__(self, unet, unet_table, te, te2, name="tiny-xl.safetensors"):
        super().__init__(unet, unet_table, te=te, name=name)
        del self.cond_stage_model
        self.conditioner = types.SimpleNamespace(embedders=[
            types.SimpleNamespace(wrapped=types.SimpleNamespace(transformer=te)),
            types.SimpleNamespace(wrapped=types.SimpleNamespace(transformer=te2))])
        self.te2 = te2
        self.is_sd1, self.is_sd2, self.is_sdxl = False, False, True


class FakeLoraLoader:
    """backend/patcher/lora.py ``LoraLoader`` of Forge (dfdcbab6): ``refresh(lora_patches,
    offload_device)`` puts its backups back (and forgets them) whenever the patches change."""

    def __init__(self):
        self.backup = {}
        self.loaded_hash = str([])
        self.refreshed = 0

    def refresh(self, lora_patches, offload_device="cpu", force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshed += 1
        with torch.no_grad():
            for param, saved in self.backup.items():
                param.copy_(saved)
        self.backup = {}
        self.loaded_hash = hashes


class ForgeEngine(FakeSDModel):
    """Forge 2.x's ``ForgeDiffusionEngine`` (backend/diffusion_engine/base.py, sd15.py at
    dfdcbab6): no ``.model``, ``cond_stage_model = None``; the UNet is
    ``forge_objects.unet.model.diffusion_model`` (ldm names, backend/nn/unet.py), the CLIP
    ``forge_objects.clip.cond_stage_model.clip_l.transformer`` (a transformers CLIPTextModel
    inside backend/nn/clip.py IntegratedCLIP); both patchers share one LoraLoader per model."""

    def __init__(self, unet, unet_table, te, name="tiny-forge.safetensors"):
        super().__init__(unet, unet_table, te=te, name=name)
        diffusion_model = self.model.diffusion_model
        del self.model
        self.cond_stage_model = None
        self.first_stage_model = None
        unet_patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=diffusion_model),
                                             lora_loader=FakeLoraLoader(), offload_device="cpu")
        clip_patcher = types.SimpleNamespace(lora_loader=FakeLoraLoader(), offload_device="cpu")
        clip = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(
            clip_l=types.SimpleNamespace(transformer=te)), patcher=clip_patcher)
        self.forge_objects = types.SimpleNamespace(unet=unet_patcher, clip=clip, vae=None, clipvision=None)
        self.forge_objects_original = self.forge_objects


# --- Forge 2.x FLUX.1 (lllyasviel/stable-diffusion-webui-forge dfdcbab6) ---------------------
class _ForgeRMSNorm(nn.Module):
    """backend/nn/flux.py L115-126: the norm's weight is the bare ``scale``; ``weight = None`` is set
    on purpose (Forge's memory profiler looks for it)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = None
        self.scale = nn.Parameter(torch.ones(dim))


def _forge_qknorm(dim):
    m = nn.Module()
    m.query_norm, m.key_norm = _ForgeRMSNorm(dim), _ForgeRMSNorm(dim)
    return m


def _forge_attention(dim, heads, qkv_bias):
    m = nn.Module()  # SelfAttention, L142-149
    m.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    m.norm = _forge_qknorm(dim // heads)
    m.proj = nn.Linear(dim, dim)
    return m


def _forge_mlp_embedder(in_dim, hidden):
    m = nn.Module()  # MLPEmbedder, L92-97
    m.in_layer, m.silu, m.out_layer = nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
    return m


def _forge_modulation(dim, double):
    m = nn.Module()  # Modulation, L169-174
    m.lin = nn.Linear(dim, (6 if double else 3) * dim)
    return m


class IntegratedFluxTransformer2DModel(nn.Module):
    """The module tree of Forge's FLUX denoiser (backend/nn/flux.py L326-370 at dfdcbab6; blocks
    L181-205 DoubleStreamBlock, L267-281 SingleStreamBlock, L310-315 LastLayer): BFL names
    (``img_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``txt_in``, ``double_blocks.N.img_attn.qkv``,
    ``single_blocks.N.linear1``, ``final_layer.adaLN_modulation.1``, ...), ``in_channels * 4``
    input features (2x2 patches). Only the modules: the fake's ``apply_model`` reads what lora-ext
    did through each Linear's output (fused weights and forward hooks alike)."""

    def __init__(self, in_channels, vec_in_dim, context_in_dim, hidden_size, mlp_ratio, num_heads, depth,
                 depth_single_blocks, axes_dim, theta, qkv_bias, guidance_embed):
        super().__init__()
        h, mlp = hidden_size, int(hidden_size * mlp_ratio)
        self.guidance_embed = guidance_embed
        self.in_channels = in_channels * 4
        self.img_in = nn.Linear(self.in_channels, h, bias=True)
        self.time_in = _forge_mlp_embedder(256, h)
        self.vector_in = _forge_mlp_embedder(vec_in_dim, h)
        self.guidance_in = _forge_mlp_embedder(256, h) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, h)
        self.double_blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            for side in ("img", "txt"):
                setattr(b, f"{side}_mod", _forge_modulation(h, True))
                setattr(b, f"{side}_attn", _forge_attention(h, num_heads, qkv_bias))
                setattr(b, f"{side}_mlp", nn.Sequential(nn.Linear(h, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, h)))
            self.double_blocks.append(b)
        self.single_blocks = nn.ModuleList()
        for _ in range(depth_single_blocks):
            b = nn.Module()
            b.linear1 = nn.Linear(h, h * 3 + mlp)
            b.linear2 = nn.Linear(h + mlp, h)
            b.norm = _forge_qknorm(h // num_heads)
            b.modulation = _forge_modulation(h, False)
            self.single_blocks.append(b)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(h, self.in_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))


class ForgeFluxEngine:
    """backend/diffusion_engine/flux.py ``Flux(ForgeDiffusionEngine)`` (L15-78 at dfdcbab6): no
    ``.model``, ``cond_stage_model = None``, the flags of base.py L64-67 all False; the denoiser is
    ``forge_objects.unet.model.diffusion_model`` (an IntegratedFluxTransformer2DModel), the text
    encoders ``forge_objects.clip.cond_stage_model.clip_l.transformer`` (transformers CLIPTextModel)
    and ``.t5xxl.transformer`` (backend/nn/t5.py ``IntegratedT5.transformer``, transformers' T5
    module names). ``get_learned_conditioning`` runs CLIP-L and T5 (L84-97); ``apply_model`` calls the
    observers and returns zeros."""

    def __init__(self, transformer, clip_l, t5, name="tiny-flux.safetensors"):
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False
        self.is_inpaint = False
        self.cond_stage_model = None
        self.first_stage_model = None
        self.transformer, self.clip_l, self.t5 = transformer, clip_l, t5
        unet_patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=transformer),
                                             lora_loader=FakeLoraLoader(), offload_device="cpu")
        clip = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(
            clip_l=types.SimpleNamespace(transformer=clip_l), t5xxl=types.SimpleNamespace(transformer=t5)),
            patcher=types.SimpleNamespace(lora_loader=FakeLoraLoader(), offload_device="cpu"))
        self.forge_objects = types.SimpleNamespace(unet=unet_patcher, clip=clip, vae=None, clipvision=None)
        self.forge_objects_original = self.forge_objects
        self.forge_objects_after_applying_lora = self.forge_objects
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra=name.rsplit(".", 1)[0], filename=name)
        self.observers = []

    def get_learned_conditioning(self, prompts):
        ids = torch.tensor([[0, 5, 9, 13, 2, 1]])
        with torch.no_grad():
            out = {"crossattn": self.t5(input_ids=ids).last_hidden_state,
                   "vector": self.clip_l(input_ids=ids).pooler_output}
        for obs in self.observers:
            obs("te", {"prompts": list(prompts), "cond": out})
        return out

    def apply_model(self, x, sigma, cond):
        for obs in self.observers:
            obs("unet", {"sigma": sigma})
        return torch.zeros_like(x)
