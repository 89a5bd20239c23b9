"""PyTorch reference of the original IDGBR guidance block (`DformerBlock` in its
`src/models/SuperModel.py`), written from its description: res = Conv1x1(3C -> C), a
cross-attention branch with queries from res and keys/values from the condition (learned
positional embedding shared by q and k, key-stream residual, QuickGELU MLP, post-norm, output
projection), plus res. Used by the parity tests (`tests/test_guidance.py`,
`tests/test_convert_idgbr.py`: pytest puts tests/ on sys.path, so `import torch_reference`) and
by the PyTorch side of bench/bench_stage2.py, which adds tests/ to sys.path itself. It is test
code, not part of the package. torch is passed in, so importing this module does not need torch
installed.
"""


def dformer_block_cls(torch):
  """The torch `DformerBlock` class (built lazily so torch stays optional)."""
  tnn, F = torch.nn, torch.nn.functional

  class QuickGELU(tnn.Module):
    def forward(self, x):
      return x * torch.sigmoid(1.702 * x)

  class ResBlock(tnn.Module):
    def __init__(self, d, heads):
      super().__init__()
      self.attn = tnn.MultiheadAttention(d, heads)
      self.ln_1q, self.ln_1k, self.ln_1v = tnn.LayerNorm(d), tnn.LayerNorm(d), tnn.LayerNorm(d)
      self.mlp = tnn.Sequential()
      self.mlp.add_module("c_fc", tnn.Linear(d, 4 * d))
      self.mlp.add_module("gelu", QuickGELU())
      self.mlp.add_module("c_proj", tnn.Linear(4 * d, d))
      self.ln_2 = tnn.LayerNorm(d)

    def forward(self, q, v):  # L, N, D
      v = v + self.attn(self.ln_1q(q), self.ln_1k(v), self.ln_1v(v), need_weights=False)[0]
      return v + self.mlp(self.ln_2(v))

  class Transformer(tnn.Module):
    def __init__(self, d, layers, heads):
      super().__init__()
      self.resblocks = tnn.ModuleList([ResBlock(d, heads) for _ in range(layers)])

    def forward(self, q, k):
      for blk in self.resblocks:
        k = blk(q, k)
      return k

  class CrossAttentionLayer(tnn.Module):
    def __init__(self, c, width, layers, heads, resolution):
      super().__init__()
      self.conv1_q = tnn.Conv2d(c, width, 1, bias=False)
      self.conv1_k = tnn.Conv2d(2 * c, width, 1, bias=False)
      self.ln_pre_q, self.ln_pre_k = tnn.LayerNorm(width), tnn.LayerNorm(width)
      self.transformer = Transformer(width, layers, heads)
      self.ln_post = tnn.LayerNorm(width)
      self.base = resolution
      self.positional_embedding = tnn.Parameter(torch.randn(resolution * resolution, width))
      self.proj = tnn.Conv2d(width, c, 1, bias=False)

    def pos(self, gh, gw):
      p = self.positional_embedding
      if (gh, gw) != (self.base, self.base):
        p = p.reshape(self.base, self.base, -1).permute(2, 0, 1).unsqueeze(0)
        p = F.interpolate(p.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        p = p.squeeze(0).permute(1, 2, 0).reshape(gh * gw, -1)
      return p

    def x_pre(self, x, conv, ln):
      x = conv(x)
      gh, gw = x.shape[-2:]
      x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1) + self.pos(gh, gw)
      return ln(x.permute(1, 0, 2)), gh, gw

    def forward(self, q, k):
      n, res = q.shape[0], q
      q, gh, gw = self.x_pre(q, self.conv1_q, self.ln_pre_q)
      k, _, _ = self.x_pre(k, self.conv1_k, self.ln_pre_k)
      x = self.ln_post(self.transformer(q, k).permute(1, 0, 2))
      x = x.permute(0, 2, 1).reshape(n, x.shape[2], gh, gw)
      return self.proj(x) + res

  class DformerBlock(tnn.Module):
    def __init__(self, c, width, layers, heads, resolution):
      super().__init__()
      self.conv = tnn.Conv2d(3 * c, c, 1)
      self.attn = CrossAttentionLayer(c, width, layers, heads, resolution)

    def forward(self, x, cond):
      return self.attn(self.conv(torch.cat([x, cond], 1)), cond)

  return DformerBlock
