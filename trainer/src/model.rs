//! Built-in models: `mlp` and `gpt` (decoder-only transformer shaped like
//! nanoGPT). Both map `[batch, time]` token ids to `[batch, time, vocab]`
//! logits. Parameters are created in a fixed order from the global torch seed
//! (set from `train.seed` before building), so every rank builds the same model.

use cohort_configs::{ModelConfig, ModelKind};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// A next-token model.
pub trait LanguageModel: Send {
    /// Logits `[batch, time, vocab]` for `tokens` `[batch, time]`; `train`
    /// enables dropout.
    fn forward(&self, tokens: &Tensor, train: bool) -> Tensor;

    /// Mean cross-entropy of predicting `targets` from `tokens`.
    fn loss(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        let logits = self.forward(tokens, train);
        let vocab = *logits.size().last().expect("logits have a vocab dimension");
        logits
            .reshape([-1, vocab])
            .cross_entropy_for_logits(&targets.reshape([-1]))
    }
}

/// Builds the model `cfg` describes under `vs` with `vocab_size` tokens.
pub fn build(vs: &nn::Path, cfg: &ModelConfig, vocab_size: usize) -> Box<dyn LanguageModel> {
    match cfg.kind {
        ModelKind::Mlp => Box::new(Mlp::new(vs, cfg, vocab_size)),
        ModelKind::Gpt => Box::new(Gpt::new(vs, cfg, vocab_size)),
    }
}

fn normal(stdev: f64) -> Init {
    Init::Randn { mean: 0.0, stdev }
}

fn linear(vs: nn::Path, i: usize, o: usize, stdev: f64) -> nn::Linear {
    nn::linear(
        vs,
        i as i64,
        o as i64,
        nn::LinearConfig {
            ws_init: normal(stdev),
            bs_init: Some(Init::Const(0.0)),
            bias: true,
        },
    )
}

/// Token embedding, `n_layer` hidden layers of width `n_embd` with GELU, and
/// a vocabulary projection: a per-position (bigram-style) predictor.
pub struct Mlp {
    wte: nn::Embedding,
    hidden: Vec<nn::Linear>,
    head: nn::Linear,
}

impl Mlp {
    pub fn new(vs: &nn::Path, cfg: &ModelConfig, vocab: usize) -> Self {
        let e = cfg.n_embd;
        let wte = nn::embedding(
            vs / "wte",
            vocab as i64,
            e as i64,
            nn::EmbeddingConfig {
                ws_init: normal(0.02),
                ..Default::default()
            },
        );
        let hidden = (0..cfg.n_layer)
            .map(|i| linear(vs / "h" / i, e, e, 0.02))
            .collect();
        let head = linear(vs / "head", e, vocab, 0.02);
        Mlp { wte, hidden, head }
    }
}

impl LanguageModel for Mlp {
    fn forward(&self, tokens: &Tensor, _train: bool) -> Tensor {
        let mut x = tokens.apply(&self.wte);
        for layer in &self.hidden {
            x = x.apply(layer).gelu("none");
        }
        x.apply(&self.head)
    }
}

struct Block {
    ln_1: nn::LayerNorm,
    c_attn: nn::Linear,
    attn_proj: nn::Linear,
    ln_2: nn::LayerNorm,
    c_fc: nn::Linear,
    mlp_proj: nn::Linear,
    n_head: i64,
    dropout: f64,
}

impl Block {
    fn new(vs: nn::Path, cfg: &ModelConfig) -> Self {
        let e = cfg.n_embd;
        // nanoGPT: residual projections get std 0.02 / sqrt(2 * n_layer).
        let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let attn = &vs / "attn";
        let mlp = &vs / "mlp";
        Block {
            ln_1: nn::layer_norm(&vs / "ln_1", vec![e as i64], Default::default()),
            c_attn: linear(&attn / "c_attn", e, 3 * e, 0.02),
            attn_proj: linear(&attn / "c_proj", e, e, proj_std),
            ln_2: nn::layer_norm(&vs / "ln_2", vec![e as i64], Default::default()),
            c_fc: linear(&mlp / "c_fc", e, 4 * e, 0.02),
            mlp_proj: linear(&mlp / "c_proj", 4 * e, e, proj_std),
            n_head: cfg.n_head as i64,
            dropout: cfg.dropout,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (b, t, c) = x.size3().expect("block input is [batch, time, channels]");
        let p = if train { self.dropout } else { 0.0 };
        let qkv = x.apply(&self.ln_1).apply(&self.c_attn);
        let heads = |part: &Tensor| {
            part.view([b, t, self.n_head, c / self.n_head])
                .transpose(1, 2)
        };
        let parts = qkv.split(c, 2);
        let (q, k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
        let y =
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, p, true, None, false)
                .transpose(1, 2)
                .contiguous()
                .view([b, t, c])
                .apply(&self.attn_proj)
                .dropout(p, train);
        let x = x + y;
        let m = x
            .apply(&self.ln_2)
            .apply(&self.c_fc)
            .gelu("none")
            .apply(&self.mlp_proj)
            .dropout(p, train);
        x + m
    }
}

/// nanoGPT: token + position embeddings, pre-LayerNorm blocks of causal
/// self-attention and a 4× MLP, a final LayerNorm, and an output projection
/// tied to the token embedding.
pub struct Gpt {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    dropout: f64,
}

impl Gpt {
    pub fn new(vs: &nn::Path, cfg: &ModelConfig, vocab: usize) -> Self {
        let t = vs / "transformer";
        let e = cfg.n_embd as i64;
        let wte = t.var("wte", &[vocab as i64, e], normal(0.02));
        let wpe = t.var("wpe", &[cfg.block_size as i64, e], normal(0.02));
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(&t / "h" / i, cfg))
            .collect();
        let ln_f = nn::layer_norm(&t / "ln_f", vec![e], Default::default());
        Gpt {
            wte,
            wpe,
            blocks,
            ln_f,
            dropout: cfg.dropout,
        }
    }
}

impl LanguageModel for Gpt {
    fn forward(&self, tokens: &Tensor, train: bool) -> Tensor {
        let t = tokens.size()[1];
        let pos = Tensor::arange(t, (Kind::Int64, tokens.device()));
        let tok = Tensor::embedding(&self.wte, tokens, -1, false, false);
        let mut x = (tok + Tensor::embedding(&self.wpe, &pos, -1, false, false))
            .dropout(if train { self.dropout } else { 0.0 }, train);
        for block in &self.blocks {
            x = block.forward(&x, train);
        }
        x.apply(&self.ln_f).matmul(&self.wte.tr())
    }
}
