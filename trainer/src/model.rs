//! The models: the built-in `mlp` and `gpt` (decoder-only transformer shaped
//! like nanoGPT), which map `[batch, time]` token ids to `[batch, time, vocab]`
//! logits, and the user's own `torchscript` module (`torchscript.rs`). Parameters are created in a fixed order from the global torch seed
//! (set from `train.seed` before building), so every rank builds the same model.
//!
//! [`Precision::Bf16`] does what `torch.autocast(dtype=torch.bfloat16)` does
//! to these models, explicitly: linear layers, attention and the output
//! projection compute in bfloat16 on bfloat16 copies of the fp32 weights;
//! embeddings, LayerNorm, the residual stream (fp32 + bf16 adds in fp32)
//! and the cross-entropy stay fp32, and the parameters and their gradients
//! are fp32 (the optimizer's master weights).

pub use cohort_configs::Precision;
use cohort_configs::{ModelConfig, ModelKind};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::TrainError;

mod torchscript;
pub use torchscript::TorchScript;

/// `x` in the kind matrix multiplies take under `p` (`train.precision`).
fn cast(p: Precision, x: &Tensor) -> Tensor {
    match p {
        Precision::Fp32 => x.shallow_clone(),
        Precision::Bf16 => x.to_kind(Kind::BFloat16),
    }
}

/// `x·Wᵀ + b` in precision `p`.
fn matmul_linear(p: Precision, l: &nn::Linear, x: &Tensor) -> Tensor {
    match p {
        Precision::Fp32 => x.apply(l),
        Precision::Bf16 => {
            let bias = l.bs.as_ref().map(|b| cast(p, b));
            cast(p, x).linear(&cast(p, &l.ws), bias.as_ref())
        }
    }
}

/// A next-token model.
pub trait LanguageModel: Send {
    /// Mean loss (in fp32) of predicting `targets` from `tokens` (both int64
    /// `[batch, time]`); `train` enables dropout.
    fn loss(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor, TrainError>;
}

/// Mean cross-entropy (in fp32) of `logits` `[batch, time, vocab]` for
/// `targets` `[batch, time]`.
fn logits_loss(logits: Tensor, targets: &Tensor) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    let vocab = *logits.size().last().expect("logits have a vocab dimension");
    logits
        .reshape([-1, vocab])
        .cross_entropy_for_logits(&targets.reshape([-1]))
}

/// Builds the model `cfg` describes under `vs` with `vocab_size` tokens,
/// computing in `precision`. Only a `torchscript` model can fail: its file
/// is checked here ([`TorchScript::load`]), before training starts.
pub fn build(
    vs: &nn::Path,
    cfg: &ModelConfig,
    vocab_size: usize,
    precision: Precision,
) -> Result<Box<dyn LanguageModel>, TrainError> {
    Ok(match cfg.kind {
        ModelKind::Mlp => Box::new(Mlp::new(vs, cfg, vocab_size, precision)),
        ModelKind::Gpt => Box::new(Gpt::new(vs, cfg, vocab_size, precision)),
        ModelKind::Torchscript => {
            let path = cfg.path.as_deref().ok_or_else(|| {
                TrainError::Config(
                    "model.kind = \"torchscript\" needs model.path (the module's file)".into(),
                )
            })?;
            Box::new(TorchScript::load(vs, path, vocab_size, cfg.block_size)?)
        }
    })
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
    precision: Precision,
}

impl Mlp {
    pub fn new(vs: &nn::Path, cfg: &ModelConfig, vocab: usize, precision: Precision) -> Self {
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
        Mlp {
            wte,
            hidden,
            head,
            precision,
        }
    }
}

impl LanguageModel for Mlp {
    fn loss(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor, TrainError> {
        Ok(logits_loss(self.forward(tokens, train), targets))
    }
}

impl Mlp {
    /// Logits `[batch, time, vocab]` for `tokens` `[batch, time]`.
    pub fn forward(&self, tokens: &Tensor, _train: bool) -> Tensor {
        let p = self.precision;
        let mut x = tokens.apply(&self.wte);
        for layer in &self.hidden {
            x = matmul_linear(p, layer, &x).gelu("none");
        }
        matmul_linear(p, &self.head, &x)
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
    precision: Precision,
}

impl Block {
    fn new(vs: nn::Path, cfg: &ModelConfig, precision: Precision) -> Self {
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
            precision,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (b, t, c) = x.size3().expect("block input is [batch, time, channels]");
        let p = if train { self.dropout } else { 0.0 };
        let pr = self.precision;
        let qkv = matmul_linear(pr, &self.c_attn, &x.apply(&self.ln_1));
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
                .view([b, t, c]);
        let y = matmul_linear(pr, &self.attn_proj, &y).dropout(p, train);
        let x = x + y;
        let h = matmul_linear(pr, &self.c_fc, &x.apply(&self.ln_2)).gelu("none");
        let m = matmul_linear(pr, &self.mlp_proj, &h).dropout(p, train);
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
    precision: Precision,
}

impl Gpt {
    pub fn new(vs: &nn::Path, cfg: &ModelConfig, vocab: usize, precision: Precision) -> Self {
        let t = vs / "transformer";
        let e = cfg.n_embd as i64;
        let wte = t.var("wte", &[vocab as i64, e], normal(0.02));
        let wpe = t.var("wpe", &[cfg.block_size as i64, e], normal(0.02));
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(&t / "h" / i, cfg, precision))
            .collect();
        let ln_f = nn::layer_norm(&t / "ln_f", vec![e], Default::default());
        Gpt {
            wte,
            wpe,
            blocks,
            ln_f,
            dropout: cfg.dropout,
            precision,
        }
    }
}

impl LanguageModel for Gpt {
    fn loss(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor, TrainError> {
        Ok(logits_loss(self.forward(tokens, train), targets))
    }
}

impl Gpt {
    /// Logits `[batch, time, vocab]` for `tokens` `[batch, time]`; `train`
    /// enables dropout.
    pub fn forward(&self, tokens: &Tensor, train: bool) -> Tensor {
        let t = tokens.size()[1];
        let pos = Tensor::arange(t, (Kind::Int64, tokens.device()));
        let tok = Tensor::embedding(&self.wte, tokens, -1, false, false);
        let mut x = (tok + Tensor::embedding(&self.wpe, &pos, -1, false, false))
            .dropout(if train { self.dropout } else { 0.0 }, train);
        for block in &self.blocks {
            x = block.forward(&x, train);
        }
        let p = self.precision;
        cast(p, &x.apply(&self.ln_f)).matmul(&cast(p, &self.wte).tr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_configs::ModelKind;
    use tch::{Device, nn::VarStore};

    fn gpt(precision: Precision) -> (VarStore, Gpt) {
        let cfg = ModelConfig {
            kind: ModelKind::Gpt,
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            block_size: 16,
            vocab_size: 0,
            dropout: 0.0,
            path: None,
        };
        // The torch RNG is global: tests build their models one at a time,
        // so two builds from the same seed are the same model.
        static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let net = Gpt::new(&vs.root(), &cfg, 50, precision);
        (vs, net)
    }

    /// Every parameter of the built-in models, exported under
    /// `ModelKind::state_dict_name`, is an `nn.Module` attribute's weight or
    /// bias, as `load_state_dict(strict=True)` of a PyTorch module of the
    /// same structure wants them.
    #[test]
    fn exported_names_are_those_of_pytorch_modules() {
        let (vs, _) = gpt(Precision::Fp32);
        let mut names: Vec<String> = vs
            .variables()
            .keys()
            .map(|n| ModelKind::Gpt.state_dict_name(n))
            .collect();
        names.sort();
        assert!(
            names.contains(&"transformer.wte.weight".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"transformer.h.1.mlp.c_proj.bias".to_string()),
            "{names:?}"
        );
        for name in &names {
            assert!(
                name.ends_with(".weight") || name.ends_with(".bias"),
                "{name}"
            );
        }
    }

    /// bf16 computes the fp32 model's function to bf16 accuracy, returns
    /// bf16 logits, an fp32 loss, and fp32 gradients for the fp32 weights.
    #[test]
    fn bf16_is_the_fp32_model_in_bf16_arithmetic() {
        let (_, exact) = gpt(Precision::Fp32);
        let (vs, mixed) = gpt(Precision::Bf16);
        let tokens = Tensor::arange(32, (Kind::Int64, Device::Cpu))
            .remainder(50)
            .view([2, 16]);
        let a = exact.forward(&tokens, false);
        let b = mixed.forward(&tokens, false);
        assert_eq!(a.kind(), Kind::Float);
        assert_eq!(b.kind(), Kind::BFloat16);
        let diff = (a - b.to_kind(Kind::Float)).abs().max().double_value(&[]);
        assert!(diff < 0.05, "bf16 logits differ by {diff}");
        let loss = mixed.loss(&tokens, &tokens, true).unwrap();
        assert_eq!(loss.kind(), Kind::Float);
        loss.backward();
        for (name, t) in vs.variables() {
            let g = t.grad();
            assert_eq!((t.kind(), g.kind()), (Kind::Float, Kind::Float), "{name}");
            assert!(
                g.abs().sum(Kind::Double).double_value(&[]) > 0.0,
                "{name} has no gradient"
            );
        }
    }
}
