"""The nanoGPT-shaped model in PyTorch that cohort's built-in `gpt` matches.

Tied embeddings, pre-LayerNorm blocks, exact GELU, causal scaled-dot-product
attention, biases on every Linear and LayerNorm, no dropout; the logits go to
the cross-entropy in fp32 (as under autocast). The benchmarks that compare
cohort with PyTorch (ddp_vs_torch.py, gpu_vs_torch.py) train this, and
torchscript_vs_builtin.py trains it scripted (torch.jit.script) under cohort.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)

    def forward(self, x):
        b, t, c = x.size(0), x.size(1), x.size(2)
        q, k, v = self.c_attn(x).split(c, dim=2)
        y = F.scaled_dot_product_attention(self.heads(q), self.heads(k), self.heads(v), is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def heads(self, z):
        b, t, c = z.size(0), z.size(1), z.size(2)
        return z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2, self.mlp = nn.LayerNorm(n_embd), MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Parameter names are cohort's export names (`transformer.wte.weight`,
    `transformer.h.0.attn.c_attn.weight`, ...), so a `cohort ckpt export` of
    the built-in gpt loads with `load_state_dict(..., strict=True)`."""

    def __init__(self, n_layer, n_head, n_embd, block_size, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd),
        ))
        for table in (self.transformer.wte, self.transformer.wpe):
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, idx, targets):
        tr = self.transformer
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = tr.wte(idx) + tr.wpe(pos)
        for block in tr.h:
            x = block(x)
        logits = tr.ln_f(x) @ tr.wte.weight.t()  # the output projection is tied to wte
        return F.cross_entropy(logits.float().view(-1, self.vocab_size), targets.reshape(-1))


def adamw(model, lr, weight_decay=0.1, betas=(0.9, 0.95), **kw):
    """AdamW with weight decay on the >= 2-D tensors only, as cohort's."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=1e-8, **kw,
    )
