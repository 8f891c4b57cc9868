"""The nanoGPT-shaped model in PyTorch that cohort's built-in `gpt` matches.

Tied embeddings, pre-LayerNorm blocks, exact GELU, causal scaled-dot-product
attention, biases on every Linear and LayerNorm, no dropout; the logits go to
the cross-entropy in fp32 (as under autocast). The benchmarks that compare
cohort with PyTorch (ddp_vs_torch.py, gpu_vs_torch.py) train this.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        heads = lambda z: z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, block_size, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.wte = nn.Parameter(torch.randn(vocab_size, n_embd) * 0.02)
        self.wpe = nn.Parameter(torch.randn(block_size, n_embd) * 0.02)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = F.embedding(idx, self.wte) + F.embedding(pos, self.wpe)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.t()
        return F.cross_entropy(logits.float().view(-1, self.vocab_size), targets.reshape(-1))


def adamw(model, lr, weight_decay=0.1, betas=(0.9, 0.95), **kw):
    """AdamW with weight decay on the >= 2-D tensors only, as cohort's."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=1e-8, **kw,
    )
