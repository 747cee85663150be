"""Transformer building blocks shared by the CoordTok encoder and decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# LayerNorm epsilon inside the blocks (timm's default, which the public implementation uses).
BLOCK_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head attention with a packed q/k/v projection `qkv.weight [3D, D]`.

    Self-attention when `context` is None; otherwise queries come from `x` and keys and values
    from `context` (the same packed weight, split). `key_mask` [B, Lk] is either boolean
    (True = attend) or float (added to the logits of every query for that key).
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool, proj_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, d = x.shape  # [B, Lq, D]
        if context is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            bias_q, bias_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([d, 2 * d])
            weight_q, weight_kv = self.qkv.weight.split([d, 2 * d])
            q = F.linear(x, weight_q, bias_q)
            k, v = F.linear(context, weight_kv, bias_kv).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, h, L, d]
        mask = None if key_mask is None else key_mask[:, None, None, :].to(
            torch.bool if key_mask.dtype == torch.bool else q.dtype
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, proj_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=key_mask)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Cross-attention to a memory, then self-attention, then MLP, each pre-norm and residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.cross_attn = Attention(dim, heads, qkv_bias=False, proj_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.self_attn = Attention(dim, heads, qkv_bias=False, proj_bias=False)
        self.norm3 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x), context=memory, key_mask=memory_mask)
        x = x + self.self_attn(self.norm2(x))
        return x + self.mlp(self.norm3(x))
