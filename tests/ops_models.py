"""Tiny modules, one per op-table row, used by the analysis/slim tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Residual(nn.Module):
    """conv-bn-relu twice with an identity residual add."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return self.head(F.relu(x + y))


class CatSplit(nn.Module):
    """cat of two branches, split back with explicit sizes and chunk."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.d, self.e = nn.Conv2d(6, 4, 1), nn.Conv2d(10, 4, 1)
        self.f = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        p, q = torch.split(y, [6, 10], dim=1)
        u, v = self.c(y).chunk(2, dim=1)
        return self.f(self.d(p) + self.e(q) + u * v)


class Grouped(nn.Module):
    """grouped conv (ResNeXt) and depthwise conv with channel multiplier 2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.o = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        return self.o(F.relu(self.dw(F.relu(self.g(self.a(x))))))


class Shuffle(nn.Module):
    """ShuffleNetV2-style chunk + channel shuffle via view/transpose/view."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.o = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        x = self.a(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x1, F.relu(self.b(x2))], dim=1)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.o(x)


class SE(nn.Module):
    """squeeze-excitation scale, global pool, flatten, linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.s1, self.s2 = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        x = self.a(x)
        s = torch.sigmoid(self.s2(F.relu(self.s1(F.adaptive_avg_pool2d(x, 1)))))
        x = F.max_pool2d(x * s, 2)
        return self.fc(torch.flatten(x, 1))


class ConvNeXtBlock(nn.Module):
    """depthwise 7x7, channels-last LayerNorm, MLP, layer scale, manual channels-first LN."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.ln0_w, self.ln0_b = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        x = self.ln0_w[:, None, None] * x + self.ln0_b[:, None, None]
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.ln(y))))
        x = x + (self.gamma * y).permute(0, 3, 1, 2)
        return self.head(x.mean([-2, -1]))


class Attention(nn.Module):
    """ViT block: cls token, pos embed, qkv linear + head reshape, softmax, proj, MLP."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d))
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        B, N, C = x.shape
        qkv = self.qkv(self.n1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5 if False else (q @ k.transpose(-2, -1)) * 0.25
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(y)
        x = x + self.fc2(F.gelu(self.fc1(self.n2(x))))
        return self.head(self.n3(x)[:, 0])


class SDPAttention(nn.Module):
    """separate q/k/v projections, view heads, F.scaled_dot_product_attention."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.h = heads
        self.emb = nn.Embedding(20, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.out = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.emb(ids)
        B, L, D = x.shape
        q = self.q(x).view(B, L, self.h, D // self.h).transpose(1, 2)
        k = self.k(x).view(B, L, self.h, D // self.h).transpose(1, 2)
        v = self.v(x).view(B, L, self.h, D // self.h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        return self.out(x + self.o(y))


class MHA(nn.Module):
    """nn.MultiheadAttention (batch_first) with a residual and GroupNorm-free MLP."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        x = self.inp(x)
        y, _ = self.attn(x, x, x)
        return self.out(self.ln(x + y))


class GroupNormNet(nn.Module):
    """GroupNorm (4 groups), PReLU per channel, InstanceNorm and AvgPool."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.act = nn.PReLU(16)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.o = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.act(self.gn(self.a(x)))
        return self.o(F.avg_pool2d(self.inorm(self.b(x)), 2))


class DictOut(nn.Module):
    """several inputs, dict output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 12), nn.Linear(7, 12)
        self.c = nn.Linear(12, 3)

    def forward(self, x, y):
        h = F.relu(self.a(x) + self.b(y))
        return {"logits": self.c(h), "aux": self.c(h).sum(-1)}


class Unknown(nn.Module):
    """an LSTM (no rule) between two linears."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        y, _ = self.lstm(self.a(x))
        return self.c(F.relu(self.b(y)))


class ConvTUNet(nn.Module):
    """encoder/decoder with ConvTranspose2d, interpolate and skip concat."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.d = nn.Conv2d(16, 8, 3, padding=1)
        self.up2 = nn.Conv2d(16, 4, 1)
        self.o = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(a))
        y = F.relu(self.d(torch.cat([a, self.up(b)], 1)))
        z = F.interpolate(self.up2(b), scale_factor=2.0, mode="nearest")
        return self.o(torch.cat([y, z], 1))


MODELS = {
    "residual": (Residual, lambda: (torch.randn(2, 3, 8, 8),)),
    "catsplit": (CatSplit, lambda: (torch.randn(2, 3, 8, 8),)),
    "grouped": (Grouped, lambda: (torch.randn(2, 3, 8, 8),)),
    "shuffle": (Shuffle, lambda: (torch.randn(2, 3, 8, 8),)),
    "se": (SE, lambda: (torch.randn(2, 3, 8, 8),)),
    "convnext_block": (ConvNeXtBlock, lambda: (torch.randn(2, 3, 8, 8),)),
    "attention": (Attention, lambda: (torch.randn(2, 3, 8, 8),)),
    "sdpa": (SDPAttention, lambda: (torch.randint(0, 20, (2, 6)),)),
    "mha": (MHA, lambda: (torch.randn(2, 5, 6),)),
    "groupnorm": (GroupNormNet, lambda: (torch.randn(2, 3, 8, 8),)),
    "dictout": (DictOut, lambda: (torch.randn(3, 5), torch.randn(3, 7))),
    "unet": (ConvTUNet, lambda: (torch.randn(2, 3, 8, 8),)),
}
