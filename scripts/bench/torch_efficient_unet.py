"""PyTorch reference of the paper's CFM upsampler network, `EfficientUNet`.

"Boosting Latent Diffusion with Flow Matching" (Schusterbauer et al., ECCV 2024); the public
reference is CompVis/fm-boosting, fmboost/models/unet/. This file re-states that network
block for block so that a benchmark of it is a benchmark of the reference: same modules,
same ops, same `state_dict()` names (the names the Rust loader in
models/src/cfm/checkpoint.rs expects, e.g. `time_embed.0.weight`,
`input_blocks.1.0.in_layers.0.weight`, `middle_block.1.qkv.weight`, `out.2.weight`).

It is checked against the shared golden vectors by check_torch_unet.py (rel. error ≤ 1e-4).

Math worth knowing (all pinned by the golden vectors):
  * timestep embedding of t ∈ [0, 1] as it is (no ×1000), cos half first, then sin, in f32;
  * ResBlock scale-shift: GN(h)·(1 + scale) + shift, (scale, shift) = chunk(emb_layers(emb), 2);
  * attention reshapes qkv (B, 3·heads·dh, L) straight to (B, heads, L, 3·dh) — no
    transpose — and splits q, k, v on the last axis; the output (B, heads, L, dh) goes
    straight back to (B, heads·dh, L). Softmax scale 1/√dh. With torch ≥ 2.0 the softmax
    attention runs through F.scaled_dot_product_attention, as the reference does
    (`use_efficient_attn=True`); older torch takes the reference's explicit fallback;
  * linear ("efficient", Shen et al.) attention: softmax of q over features (× 1/√dh),
    softmax of k over positions, q · (kᵀ v);
  * the middle block always uses softmax attention; GroupNorm has 32 groups, eps 1e-5;
  * Downsample: 3×3 stride-2 conv (`op`) or AvgPool2d(2); Upsample: nearest ×2 then an
    optional 3×3 conv (`conv`).

Works with torch 1.13 (Debian's CPU build) and torch 2.x (CPU or CUDA).
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_GROUPS = 32
NORM_EPS = 1e-5

# The config keys of `UNetConfig` (models/src/cfm/config.rs); unknown keys are an error.
CONFIG_KEYS = {
    "in_channels",
    "model_channels",
    "out_channels",
    "num_res_blocks",
    "attention_resolutions",
    "channel_mult",
    "dim_head",
    "num_heads",
    "use_linear_attn",
    "use_scale_shift_norm",
    "conv_resample",
    "dropout",
    "pool_factor",
}

# `UNetConfig::paper()`: the paper's SD-latent upsampler (~306 M parameters).
PAPER_CONFIG: Dict[str, Any] = {
    "in_channels": 8,
    "model_channels": 128,
    "out_channels": 4,
    "num_res_blocks": 3,
    "attention_resolutions": [8, 16],
    "channel_mult": [1, 2, 4, 8],
    "dim_head": 64,
    "num_heads": 4,
    "use_linear_attn": False,
    "use_scale_shift_norm": True,
    "conv_resample": True,
    "dropout": 0.0,
}

# `config::tiny(false)`: the Rust unit tests' small config.
TINY_CONFIG: Dict[str, Any] = {
    "in_channels": 8,
    "model_channels": 32,
    "out_channels": 4,
    "num_res_blocks": 1,
    "attention_resolutions": [2],
    "channel_mult": [1, 2],
    "dim_head": 16,
    "num_heads": 2,
    "use_linear_attn": False,
    "use_scale_shift_norm": True,
    "conv_resample": True,
    "dropout": 0.0,
}


def has_sdpa() -> bool:
    return hasattr(F, "scaled_dot_product_attention")


def zero_module(module: nn.Module) -> nn.Module:
    """Zeroes a module's parameters (the reference's init of every last conv of a branch)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t [B] (used as it is), cos half then sin half, f32 [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """nn.Sequential that hands `emb` to the children that take it (keeps the `N.M.` names)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """GN–SiLU–conv3×3, timestep modulation, GN–SiLU–Dropout–conv3×3, plus a 1×1-conv skip."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, out_channels, eps=NORM_EPS),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        # Identity has no parameters, so no `skip_connection.*` keys when channels match.
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Softmax attention over (..., L, dh): SDPA where torch has it (as the reference), else
    the reference's explicit fallback."""

    def __init__(self, use_sdpa: Optional[bool] = None):
        super().__init__()
        self.use_sdpa = has_sdpa() if use_sdpa is None else (use_sdpa and has_sdpa())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v)
        scale = 1.0 / math.sqrt(q.shape[-1])
        weight = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
        return torch.matmul(weight, v)


class LinearQKVAttention(nn.Module):
    """Efficient attention (Shen et al., arXiv:1812.01243): O(L·dh²) instead of O(L²·dh)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        q = q.softmax(dim=-1) * scale
        k = k.softmax(dim=-2)
        context = torch.matmul(k.transpose(-1, -2), v)  # (..., dh, dh)
        return torch.matmul(q, context)


class SpatialSelfAttention(nn.Module):
    """GN, 1×1 Conv1d qkv, multi-head (softmax or linear) attention, 1×1 Conv1d out, residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, use_linear: bool, use_sdpa: Optional[bool] = None):
        super().__init__()
        self.heads = heads
        self.inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(NORM_GROUPS, dim, eps=NORM_EPS)
        self.qkv = nn.Conv1d(dim, 3 * self.inner_dim, 1)
        self.attention = LinearQKVAttention() if use_linear else QKVAttention(use_sdpa)
        self.proj_out = zero_module(nn.Conv1d(self.inner_dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))                           # (b, 3·heads·dh, L)
        qkv = qkv.reshape(b, self.heads, qkv.shape[-1], -1)     # (b, heads, L, 3·dh): no transpose
        q, k, v = qkv.chunk(3, dim=-1)
        h = self.attention(q, k, v).reshape(b, self.inner_dim, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def parse_config(config: Any) -> Dict[str, Any]:
    """A config dict (or JSON string) with `UNetConfig`'s keys, validated like config.rs."""
    if isinstance(config, str):
        config = json.loads(config)
    config = dict(config)
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"UNet config: unknown keys {sorted(unknown)}")
    config.setdefault("dropout", 0.0)
    config.setdefault("pool_factor", -1)
    if config["pool_factor"] is None:
        config["pool_factor"] = -1
    if config["pool_factor"] > 1:
        raise ValueError("UNet config `pool_factor` > 1: the Pool2d stem is not implemented (as in the Rust port)")
    if config["model_channels"] % NORM_GROUPS:
        raise ValueError(f"UNet config `model_channels` must be a multiple of {NORM_GROUPS}")
    if config["channel_mult"][0] != 1:
        raise ValueError("UNet config `channel_mult`: the first multiplier must be 1")
    return config


class EfficientUNet(nn.Module):
    """The paper's velocity network v(x_t, t, context); input is cat[x_t, context] on channels."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: Iterable[int], channel_mult: Iterable[int] = (1, 2, 4, 8),
                 dim_head: int = 64, num_heads: int = 4, use_linear_attn: bool = False,
                 use_scale_shift_norm: bool = True, conv_resample: bool = True, dropout: float = 0.0,
                 pool_factor: int = -1, use_sdpa: Optional[bool] = None):
        super().__init__()
        if pool_factor is not None and pool_factor > 1:
            raise ValueError("pool_factor > 1 (the Pool2d stem) is not implemented")
        attention_resolutions = list(attention_resolutions)
        channel_mult = list(channel_mult)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.levels = len(channel_mult)
        emb_dim = 4 * model_channels

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, emb_dim, dropout, out_channels=c_out, use_scale_shift_norm=use_scale_shift_norm)

        def attn(ch: int, linear: bool) -> SpatialSelfAttention:
            return SpatialSelfAttention(ch, num_heads, dim_head, linear, use_sdpa)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch, use_linear_attn))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, False), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch, use_linear_attn))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, ch, eps=NORM_EPS),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    @classmethod
    def from_config(cls, config: Any, use_sdpa: Optional[bool] = None) -> "EfficientUNet":
        return cls(**parse_config(config), use_sdpa=use_sdpa)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] (or a scalar / [1], broadcast) in [0, 1], context [B, C', H, W]."""
        dtype = self.out[2].weight.dtype
        if t.dim() == 0 or (t.numel() == 1 and x.shape[0] != 1):
            t = t.reshape(1).expand(x.shape[0])
        # The embedding is computed in f32 (as the reference); cast to the weights' dtype so a
        # bf16 model runs without autocast.
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        if context is not None:
            x = torch.cat([x, context], dim=1)
        x = x.to(dtype)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"EfficientUNet: input has {x.shape[1]} channels, in_channels is {self.in_channels}")
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def flops_per_forward(config: Dict[str, Any], batch: int, h: int, w: int) -> int:
    """The same analytic FLOP count as models/src/cfm/cost.rs (2 per multiply-add of every
    convolution, linear layer and attention matmul), so `gflops_per_s` compares 1:1."""
    cfg = parse_config(config)
    mc, nrb, mults = cfg["model_channels"], cfg["num_res_blocks"], list(cfg["channel_mult"])
    attn_res = list(cfg["attention_resolutions"])
    heads, dh = cfg["num_heads"], cfg["dim_head"]
    inner = heads * dh
    emb = 4 * mc
    b = batch

    def pixels(rate: int) -> int:
        return (h // rate) * (w // rate)

    def conv(c_in: int, c_out: int, k: int, p: int) -> int:
        return 2 * b * c_in * c_out * k * k * p

    def res_block(c_in: int, c_out: int, rate: int) -> int:
        p = pixels(rate)
        emb_out = 2 * c_out if cfg["use_scale_shift_norm"] else c_out
        skip = 0 if c_in == c_out else conv(c_in, c_out, 1, p)
        return conv(c_in, c_out, 3, p) + conv(c_out, c_out, 3, p) + skip + 2 * b * emb * emb_out

    def attention(ch: int, rate: int, linear: bool) -> int:
        l = pixels(rate)
        proj = 2 * b * l * ch * 3 * inner + 2 * b * l * inner * ch
        mixing = 2 * (2 * b * heads * l * dh * dh) if linear else 2 * (2 * b * heads * l * l * dh)
        return proj + mixing

    total = 2 * b * (mc * emb + emb * emb) + conv(cfg["in_channels"], mc, 3, pixels(1))
    skips = [mc]
    ch, ds = mc, 1
    for level, mult in enumerate(mults):
        for _ in range(nrb):
            out = mult * mc
            total += res_block(ch, out, ds)
            if ds in attn_res:
                total += attention(out, ds, cfg["use_linear_attn"])
            ch = out
            skips.append(ch)
        if level + 1 != len(mults):
            if cfg["conv_resample"]:
                total += conv(ch, ch, 3, pixels(ds * 2))
            skips.append(ch)
            ds *= 2
    total += 2 * res_block(ch, ch, ds) + attention(ch, ds, False)
    for level, mult in list(enumerate(mults))[::-1]:
        for i in range(nrb + 1):
            out = mc * mult
            total += res_block(ch + skips.pop(), out, ds)
            if ds in attn_res:
                total += attention(out, ds, cfg["use_linear_attn"])
            ch = out
            if level and i == nrb:
                if cfg["conv_resample"]:
                    total += conv(ch, ch, 3, pixels(ds // 2))
                ds //= 2
    return total + conv(mc, cfg["out_channels"], 3, pixels(1))
