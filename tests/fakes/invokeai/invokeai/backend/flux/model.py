"""Mirrors InvokeAI's FLUX.1 transformer (InvokeAI 6.14.2 from PyPI, whose line numbers L... cite):
``invokeai/backend/flux/model.py`` (``FluxParams`` L25-38, ``Flux`` L41-92: ``img_in``, ``time_in``,
``vector_in``, ``guidance_in`` (``nn.Identity`` without a guidance embedder, i.e. schnell),
``txt_in``, ``double_blocks``, ``single_blocks``, ``final_layer``) and the blocks of
``invokeai/backend/flux/modules/layers.py`` (``MLPEmbedder`` L52-60 ``in_layer``/``out_layer``,
``RMSNorm`` L63-69 with a bare ``scale`` parameter, ``QKNorm`` L72-81 ``query_norm``/``key_norm``,
``SelfAttention`` L84-100 ``qkv`` (q|k|v fused) / ``norm`` / ``proj``, ``Modulation`` L110-123
``lin``, ``DoubleStreamBlock`` L126-188 ``img_mod``/``img_attn``/``img_mlp.0``/``img_mlp.2`` and
the ``txt_`` twins, ``SingleStreamBlock`` L191-236 ``linear1`` (q|k|v|mlp) / ``linear2`` /
``norm`` / ``modulation.lin``, ``LastLayer`` L239-251 ``linear`` and ``adaLN_modulation.1`` whose
output is (shift, scale)): the module names are the BFL ones, so lora-ext binds the model as
the original layout of Flux.1.

``forward`` takes InvokeAI's keyword arguments (model.py L94-108: ``img, img_ids, txt, txt_ids,
timesteps, y, guidance, timestep_index, total_num_timesteps, controlnet_*_residuals,
ip_adapter_extensions, regional_prompting_extension``) and runs every module as the real
blocks do, with one simplification: attention is plain scaled-dot-product attention without
the rotary position embedding (``img_ids``/``txt_ids`` are accepted and unused). lora-ext only
needs each Linear to be called on what the real model feeds it."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass
class FluxParams:
    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    out_channels: Optional[int] = None


def timestep_embedding(t: Tensor, dim: int, max_period=10000, time_factor: float = 1000.0) -> Tensor:
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(float(max_period))) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype if t.is_floating_point() else torch.float32)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.rms_norm(x, self.scale.shape, self.scale, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def _heads(qkv: Tensor, n: int):
    b, seq, width = qkv.shape
    return qkv.view(b, seq, 3, n, width // (3 * n)).permute(2, 0, 3, 1, 4)  # K B H L D


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    x = nn.functional.scaled_dot_product_attention(q, k, v)
    b, h, seq, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, seq, h * d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor):
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _mlp(hidden: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, int(hidden * ratio), bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(int(hidden * ratio), hidden, bias=True))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        norm = lambda: nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)  # noqa: E731
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = norm()
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = norm()
        self.img_mlp = _mlp(hidden_size, mlp_ratio)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = norm()
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = norm()
        self.txt_mlp = _mlp(hidden_size, mlp_ratio)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe=None):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = _heads(self.img_attn.qkv((1 + i_scale1) * self.img_norm1(img) + i_shift1), self.num_heads)
        iq, ik = self.img_attn.norm(iq, ik, iv)
        tq, tk, tv = _heads(self.txt_attn.qkv((1 + t_scale1) * self.txt_norm1(txt) + t_shift1), self.num_heads)
        tq, tk = self.txt_attn.norm(tq, tk, tv)
        attn = _attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2))
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(i_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * self.img_norm2(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(t_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * self.txt_norm2(txt) + t_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe=None) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        return x + gate * self.linear2(torch.cat((_attention(q, k, v), self.mlp_act(mlp)), 2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels or params.in_channels
        h = params.hidden_size
        self.img_in = nn.Linear(self.in_channels, h, bias=True)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(params.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, h)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(h, params.num_heads, params.mlp_ratio, params.qkv_bias)
                                            for _ in range(params.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(h, params.num_heads, params.mlp_ratio)
                                            for _ in range(params.depth_single_blocks)])
        self.final_layer = LastLayer(h, 1, self.out_channels)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, timestep_index, total_num_timesteps,
                controlnet_double_block_residuals=None, controlnet_single_block_residuals=None,
                ip_adapter_extensions=(), regional_prompting_extension=None) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec)
        return self.final_layer(img[:, txt.shape[1]:, ...], vec)
