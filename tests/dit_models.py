"""Tiny DiT denoisers (diffusers classes, seeded random weights) and their original-layout
twins, for the DiT family tests.

``original_state`` writes a diffusers model's weights under the original (BFL / SAI) names
the way the families' converters do: q/k/v (and Flux's single-block MLP) concatenated by rows
into one fused weight, the final modulation's halves swapped. ``OriginalTree`` holds such a
state dict as a module tree of ``nn.Linear`` s (and bare ``scale`` parameters), which is how
ComfyUI's and Forge's models look to lora-ext. ``diffusers_state`` maps back.
"""
import warnings

import torch
import torch.nn as nn

warnings.filterwarnings("ignore", message=".*deprecat.*")

FLUX = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
           joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
           pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
CHROMA = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
              approximator_hidden_dim=20, approximator_layers=2)
HV = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
          num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
          pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8,
           freq_dim=16, ffn_dim=64, num_layers=2, image_dim=12, added_kv_proj_dim=32)
LUMINA = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=48, num_layers=2, num_refiner_layers=1,
              num_attention_heads=3, num_kv_heads=1, multiple_of=16, cap_feat_dim=8, axes_dim_rope=(4, 6, 6),
              axes_lens=(8, 8, 8))
ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=48, n_layers=2, n_refiner_layers=1,
              n_heads=3, n_kv_heads=3, cap_feat_dim=8, axes_dims=[4, 6, 6], axes_lens=[256, 16, 16])
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=(4, 6, 6))


def tiny(family: str, seed: int = 0, **overrides):
    import diffusers

    cls, cfg = {
        "flux": (diffusers.FluxTransformer2DModel, FLUX),
        "sd3": (diffusers.SD3Transformer2DModel, SD3),
        "chroma": (diffusers.ChromaTransformer2DModel, CHROMA),
        "qwen_image": (diffusers.QwenImageTransformer2DModel, QWEN),
        "hunyuan_video": (diffusers.HunyuanVideoTransformer3DModel, HV),
        "wan": (diffusers.WanTransformer3DModel, WAN),
        "lumina2": (diffusers.Lumina2Transformer2DModel, LUMINA),
        "z_image": (diffusers.ZImageTransformer2DModel, ZIMAGE),
    }[family]
    torch.manual_seed(seed)
    model = cls(**dict(cfg, **overrides)).eval()
    with torch.no_grad():  # every weight non-trivial (norm scales start at 1, some biases at 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def dit_table(model):
    from lora_ext import dit

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return dit.table_for_shapes(shapes)[2]


def _swap(t):
    n = t.shape[0] // 2
    return torch.cat([t[n:], t[:n]], 0)


def original_state(model, table=None) -> dict:
    """{original key: tensor} of a diffusers DiT (fused rows concatenated, halves swapped)."""
    table = table or dit_table(model)
    sd = model.state_dict()
    out, fused = {}, {}
    for path, info in table.items():
        for param, key in (("weight", info.ldm_weight), ("bias", info.ldm_bias)):
            t = sd.get(f"{path}.{param}")
            if t is None and param == "weight" and not key.endswith((".weight", ".scale")):
                t = sd.get(path)  # a bare parameter (Wan's scale_shift_table <-> modulation)
            if t is None or key is None:
                continue
            t = t.detach().clone()
            if info.ldm_swap:
                t = _swap(t)
            if info.ldm_rows is not None:
                fused.setdefault(key, []).append((info.ldm_rows[0], t))
            else:
                out[key] = t
    for key, parts in fused.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], 0)
    return out


def diffusers_state(orig: dict, table) -> dict:
    """The inverse of :func:`original_state` for the modules of ``table``."""
    out = {}
    for path, info in table.items():
        for param, key in (("weight", info.ldm_weight), ("bias", info.ldm_bias)):
            if key is None or key not in orig:
                continue
            t = orig[key]
            if info.ldm_rows is not None:
                t = t[info.ldm_rows[0]:info.ldm_rows[1]]
            if info.ldm_swap:
                t = _swap(t)
            bare = param == "weight" and not key.endswith((".weight", ".scale"))
            out[path if bare else f"{path}.{param}"] = t.clone()
    return out


class OriginalTree(nn.Module):
    """A module tree holding an original-layout state dict: 2-D weights in ``nn.Linear`` s,
    4-D ones in ``nn.Conv2d`` s, anything else (norm scales) as bare parameters."""

    def __init__(self, state: dict):
        super().__init__()
        owners = {}
        for key, t in state.items():
            owner, _, name = key.rpartition(".")
            owners.setdefault(owner, {})[name] = t
        for owner, params in sorted(owners.items()):
            w = params.get("weight")
            if w is not None and w.dim() == 2:
                mod = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params)
            elif w is not None and w.dim() == 4:
                mod = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=w.shape[2:], bias="bias" in params)
            else:
                if not owner:  # top-level bare parameters (Z-Image's x_pad_token)
                    for name, t in params.items():
                        self.register_parameter(name, nn.Parameter(t.clone(), requires_grad=False))
                    continue
                mod = nn.Module()
                for name, t in params.items():
                    mod.register_parameter(name, nn.Parameter(t.clone(), requires_grad=False))
                self._put(owner, mod)
                continue
            with torch.no_grad():
                mod.weight.copy_(w)
                if "bias" in params:
                    mod.bias.copy_(params["bias"])
            mod.requires_grad_(False)
            self._put(owner, mod)

    def _put(self, path: str, mod: nn.Module) -> None:
        parent = self
        parts = path.split(".")
        for p in parts[:-1]:
            child = parent._modules.get(p)
            if child is None:
                child = nn.Module()
                parent.add_module(p, child)
            parent = child
        existing = parent._modules.get(parts[-1])
        if existing is not None:  # a container already made for deeper modules: keep its children
            for name, child in existing._modules.items():
                mod.add_module(name, child)
        parent.add_module(parts[-1], mod)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def inputs(family: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if family in ("flux", "chroma"):
        seq, txt = 16, 5
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                              -1).reshape(-1, 3)
        kw = dict(hidden_states=r(1, seq, 8), encoder_hidden_states=r(1, txt, 24), timestep=torch.tensor([0.5]),
                  img_ids=img_ids, txt_ids=torch.zeros(txt, 3))
        if family == "flux":
            kw.update(pooled_projections=r(1, 12), guidance=torch.tensor([3.5]))
        return kw
    if family == "sd3":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 5, 24), pooled_projections=r(1, 12),
                    timestep=torch.tensor([500.0]))
    if family == "qwen_image":
        return dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 5, 24),
                    encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.5]),
                    img_shapes=[(1, 4, 4)])
    if family == "hunyuan_video":
        return dict(hidden_states=r(1, 4, 1, 4, 4), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 5, 16),
                    encoder_attention_mask=torch.ones(1, 5), pooled_projections=r(1, 8), guidance=torch.tensor([3500.0]))
    if family == "wan":
        return dict(hidden_states=r(1, 4, 1, 4, 4), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 5, 8),
                    encoder_hidden_states_image=r(1, 3, 12))
    if family == "lumina2":
        return dict(hidden_states=r(1, 4, 8, 8), timestep=torch.tensor([0.5]), encoder_hidden_states=r(1, 5, 8),
                    encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool))
    if family == "z_image":  # lists: one (C, F, H, W) latent and one caption per sample
        return dict(x=[r(4, 1, 8, 8)], t=torch.tensor([0.5]), cap_feats=[r(5, 8)])
    raise KeyError(family)


@torch.no_grad()
def forward(model, family: str, seed: int = 1) -> torch.Tensor:
    out = model(**inputs(family, seed), return_dict=False)
    out = out[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out
