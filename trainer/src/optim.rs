//! Optimizers on flat f32 shards, and the learning-rate schedule.
//!
//! The state of an optimizer is a few vectors as long as the part of the flat
//! parameter space this rank owns (all of it under DDP, its 1/N shard under
//! ZeRO). Two implementations of the same updates:
//! - [`Optimizer`] (the host path): plain loops over slices zipped together,
//!   which the compiler vectorizes: one pass over memory per step;
//! - [`TensorOptimizer`] (the device path): the same arithmetic as tensor ops
//!   on flat tensors of any device, a few elementwise kernels per step over
//!   one flat buffer (no per-parameter launches), state kept on the device.

use std::ops::Range;

use cohort_configs::{OptimConfig, OptimKind};
use tch::{Device, Kind, Tensor};

/// Per-step inputs shared by every slice of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepParams {
    /// Optimizer steps completed before this one (0 on the first step).
    pub step: u64,
    pub lr: f32,
    /// Factor every gradient is multiplied by first (clipping).
    pub grad_scale: f32,
}

/// AdamW (decoupled weight decay, bias correction) or SGD with momentum.
pub struct Optimizer {
    cfg: OptimConfig,
    /// AdamW: `[exp_avg, exp_avg_sq]`; SGD: `[momentum]` (empty when
    /// `optim.momentum` is 0).
    states: Vec<Vec<f32>>,
}

impl Optimizer {
    /// An optimizer over `len` elements, state zeroed.
    pub fn new(cfg: &OptimConfig, len: usize) -> Self {
        let n = Self::names_for(cfg).len();
        Optimizer {
            cfg: cfg.clone(),
            states: vec![vec![0.0; len]; n],
        }
    }

    pub(crate) fn names_for(cfg: &OptimConfig) -> &'static [&'static str] {
        match cfg.kind {
            OptimKind::Adamw => &["exp_avg", "exp_avg_sq"],
            OptimKind::Sgd if cfg.momentum != 0.0 => &["momentum"],
            OptimKind::Sgd => &[],
        }
    }

    /// Names of the per-element state vectors, in [`Optimizer::states`] order.
    pub fn state_names(&self) -> &'static [&'static str] {
        Self::names_for(&self.cfg)
    }

    pub fn states(&self) -> &[Vec<f32>] {
        &self.states
    }

    /// Replaces the state (from a checkpoint). Each vector must be as long as
    /// the current ones.
    pub fn set_states(&mut self, states: Vec<Vec<f32>>) -> Result<(), String> {
        check_state_lengths(
            self.cfg.kind,
            &self.states.iter().map(Vec::len).collect::<Vec<_>>(),
            &states.iter().map(Vec::len).collect::<Vec<_>>(),
        )?;
        self.states = states;
        Ok(())
    }

    /// Bytes of optimizer state held by this rank.
    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(|s| s.len() * 4).sum()
    }

    /// Updates `params` (the elements `at` of this optimizer's range) from
    /// `grads`; `decay` says whether weight decay applies to them.
    pub fn update(
        &mut self,
        at: Range<usize>,
        params: &mut [f32],
        grads: &[f32],
        decay: bool,
        p: StepParams,
    ) {
        debug_assert_eq!(params.len(), at.len());
        debug_assert_eq!(grads.len(), at.len());
        let c = &self.cfg;
        let wd = if decay { c.weight_decay as f32 } else { 0.0 };
        match c.kind {
            OptimKind::Adamw => {
                let (m, v) = self.states.split_at_mut(1);
                let t = (p.step + 1) as i32;
                let (b1, b2) = (c.beta1, c.beta2);
                adamw(
                    params,
                    grads,
                    &mut m[0][at.clone()],
                    &mut v[0][at],
                    AdamCoeffs {
                        decay: 1.0 - p.lr * wd,
                        b1: b1 as f32,
                        b2: b2 as f32,
                        step_size: (f64::from(p.lr) / (1.0 - b1.powi(t))) as f32,
                        inv_bc2_sqrt: (1.0 / (1.0 - b2.powi(t)).sqrt()) as f32,
                        eps: c.eps as f32,
                        scale: p.grad_scale,
                    },
                );
            }
            OptimKind::Sgd => {
                let momentum = c.momentum as f32;
                let buf = self.states.first_mut().map(|b| &mut b[at]);
                sgd(params, grads, buf, momentum, c.nesterov, wd, p);
            }
        }
    }
}

/// Whether restored optimizer state (vectors of lengths `got`) fits an
/// optimizer whose state vectors have lengths `have`.
fn check_state_lengths(kind: OptimKind, have: &[usize], got: &[usize]) -> Result<(), String> {
    if got == have {
        return Ok(());
    }
    Err(format!(
        "optimizer state has {} vectors of lengths {got:?}; this {kind:?} optimizer needs {} of length {}",
        got.len(),
        have.len(),
        have.first().copied().unwrap_or(0)
    ))
}

struct AdamCoeffs {
    decay: f32,
    b1: f32,
    b2: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    scale: f32,
}

/// As `torch.optim.AdamW`: `p *= 1 - lr·wd`, then the bias-corrected Adam step.
fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamCoeffs) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * k.scale;
        let mi = k.b1 * *m + (1.0 - k.b1) * g;
        let vi = k.b2 * *v + (1.0 - k.b2) * g * g;
        *m = mi;
        *v = vi;
        let denom = vi.sqrt() * k.inv_bc2_sqrt + k.eps;
        *p = *p * k.decay - k.step_size * mi / denom;
    }
}

/// As `torch.optim.SGD` (dampening 0): L2 weight decay added to the gradient,
/// `buf = momentum·buf + g`, nesterov `g + momentum·buf`.
fn sgd(
    p: &mut [f32],
    g: &[f32],
    buf: Option<&mut [f32]>,
    momentum: f32,
    nesterov: bool,
    wd: f32,
    s: StepParams,
) {
    let lr = s.lr;
    match buf {
        None => {
            for (p, &g) in p.iter_mut().zip(g) {
                *p -= lr * (g * s.grad_scale + wd * *p);
            }
        }
        Some(buf) => {
            // On the first step torch initializes the buffer to the gradient,
            // which momentum·0 + g also gives.
            for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
                let g = g * s.grad_scale + wd * *p;
                *b = momentum * *b + g;
                let d = if nesterov { g + momentum * *b } else { *b };
                *p -= lr * d;
            }
        }
    }
}

/// Which elements of a tensor optimizer's range take weight decay.
enum DecayMask {
    None,
    All,
    /// `true` where decay applies.
    Some(Tensor),
}

/// [`Optimizer`]'s updates as tensor ops on flat tensors of any device.
pub struct TensorOptimizer {
    cfg: OptimConfig,
    /// As [`Optimizer`]'s states, one tensor each.
    states: Vec<Tensor>,
    decay: DecayMask,
}

impl TensorOptimizer {
    /// An optimizer over `len` elements on `device`, state zeroed; `decay`
    /// gives the weight-decay runs of the range (relative offsets, as
    /// `FlatParams::decay_runs`).
    pub fn new(
        cfg: &OptimConfig,
        len: usize,
        device: Device,
        decay: &[(Range<usize>, bool)],
    ) -> Self {
        let n = Optimizer::names_for(cfg).len();
        let decay = if decay.iter().all(|(_, d)| *d) {
            DecayMask::All
        } else if decay.iter().all(|(_, d)| !*d) {
            DecayMask::None
        } else {
            let mut mask = vec![0u8; len];
            for (run, d) in decay {
                mask[run.clone()].fill(u8::from(*d));
            }
            DecayMask::Some(
                Tensor::from_slice(&mask)
                    .to_kind(Kind::Bool)
                    .to_device(device),
            )
        };
        TensorOptimizer {
            cfg: cfg.clone(),
            states: (0..n)
                .map(|_| Tensor::zeros([len as i64], (Kind::Float, device)))
                .collect(),
            decay,
        }
    }

    pub fn state_names(&self) -> &'static [&'static str] {
        Optimizer::names_for(&self.cfg)
    }

    pub fn states(&self) -> &[Tensor] {
        &self.states
    }

    /// Replaces the state (from a checkpoint): as many tensors as now, each
    /// as long.
    pub fn set_states(&mut self, states: Vec<Tensor>) -> Result<(), String> {
        check_state_lengths(
            self.cfg.kind,
            &self.states.iter().map(Tensor::numel).collect::<Vec<_>>(),
            &states.iter().map(Tensor::numel).collect::<Vec<_>>(),
        )?;
        self.states = states;
        Ok(())
    }

    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(|s| s.numel() * 4).sum()
    }

    /// `p *= 1 - f` on the elements that take weight decay.
    fn decay(&self, p: &mut Tensor, f: f64) {
        match &self.decay {
            DecayMask::None => {}
            DecayMask::All => {
                let _ = p.g_mul_scalar_(1.0 - f);
            }
            DecayMask::Some(mask) => {
                let _ = p.g_mul_(&Tensor::where_scalar(mask, 1.0 - f, 1.0));
            }
        }
    }

    /// `p·wd` on the elements that take weight decay, 0 elsewhere.
    fn l2(&self, p: &Tensor, wd: f64) -> Option<Tensor> {
        match &self.decay {
            DecayMask::None => None,
            DecayMask::All => Some(p * wd),
            DecayMask::Some(mask) => Some(p * Tensor::where_scalar(mask, wd, 0.0)),
        }
    }

    /// Updates `p` (this optimizer's whole range) from `g`.
    pub fn update(&mut self, p: &mut Tensor, g: &Tensor, sp: StepParams) {
        tch::no_grad(|| self.update_inner(p, g, sp));
    }

    fn update_inner(&mut self, p: &mut Tensor, g: &Tensor, sp: StepParams) {
        let c = self.cfg.clone();
        let lr = f64::from(sp.lr);
        let scaled;
        let g = if sp.grad_scale == 1.0 {
            g
        } else {
            scaled = g * f64::from(sp.grad_scale);
            &scaled
        };
        match c.kind {
            OptimKind::Adamw => {
                let t = (sp.step + 1) as i32;
                let step_size = lr / (1.0 - c.beta1.powi(t));
                let inv_bc2_sqrt = 1.0 / (1.0 - c.beta2.powi(t)).sqrt();
                let (m, v) = self.states.split_at_mut(1);
                let (m, v) = (&mut m[0], &mut v[0]);
                // m = b1·m + (1-b1)·g, v = b2·v + (1-b2)·g²
                let _ = m.lerp_(g, 1.0 - c.beta1);
                let _ = v.lerp_(&g.square(), 1.0 - c.beta2);
                // denom = sqrt(v)/sqrt(1-b2^t) + eps, scaled so that
                // p += m / denom is p -= step_size · m / (sqrt(v̂) + eps).
                let mut denom = v.sqrt();
                let _ = denom.g_mul_scalar_(inv_bc2_sqrt);
                let _ = denom.g_add_scalar_(c.eps);
                let _ = denom.g_mul_scalar_(-1.0 / step_size);
                self.decay(p, lr * c.weight_decay);
                let _ = p.addcdiv_(&self.states[0], &denom);
            }
            OptimKind::Sgd => {
                let l2 = if c.weight_decay == 0.0 {
                    None
                } else {
                    self.l2(p, c.weight_decay)
                };
                match self.states.first_mut() {
                    None => {
                        // p -= lr·(g + wd·p)
                        let mut d = g * -lr;
                        if let Some(l2) = l2 {
                            let _ = d.g_add_(&(l2 * -lr));
                        }
                        let _ = p.g_add_(&d);
                    }
                    Some(buf) => {
                        let g = match l2 {
                            Some(l2) => g + l2,
                            None => g.shallow_clone(),
                        };
                        // buf = momentum·buf + g; d = g + momentum·buf (nesterov) or buf
                        let _ = buf.g_mul_scalar_(c.momentum);
                        let _ = buf.g_add_(&g);
                        let d = if c.nesterov {
                            &g + &*buf * c.momentum
                        } else {
                            buf.shallow_clone()
                        };
                        let _ = p.g_add_(&(d * -lr));
                    }
                }
            }
        }
    }
}

/// Linear warmup to `optim.lr` over `warmup_steps`, then cosine decay to
/// `min_lr` at `decay_steps` (or `max_steps` when 0), as nanoGPT's `get_lr`.
/// A pure function of the step, so resuming needs only the step.
#[derive(Debug, Clone)]
pub struct LrSchedule {
    lr: f64,
    min_lr: f64,
    warmup: u64,
    decay: u64,
}

impl LrSchedule {
    pub fn new(cfg: &OptimConfig, max_steps: u64) -> Self {
        LrSchedule {
            lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup: cfg.warmup_steps,
            decay: if cfg.decay_steps == 0 {
                max_steps
            } else {
                cfg.decay_steps
            },
        }
    }

    /// Learning rate of step `it` (0-based).
    pub fn at(&self, it: u64) -> f64 {
        if it < self.warmup {
            return self.lr * (it + 1) as f64 / (self.warmup + 1) as f64;
        }
        if it >= self.decay || self.decay <= self.warmup {
            return self.min_lr.min(self.lr);
        }
        let ratio = (it - self.warmup) as f64 / (self.decay - self.warmup) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(step: u64) -> StepParams {
        StepParams {
            step,
            lr: 0.1,
            grad_scale: 1.0,
        }
    }

    /// Reference AdamW in f64, written from the torch docs.
    #[test]
    fn adamw_matches_the_reference() {
        let cfg = OptimConfig::default();
        let mut opt = Optimizer::new(&cfg, 3);
        let mut p = vec![1.0f32, -2.0, 0.5];
        let grads = [[0.1f32, -0.3, 2.0], [0.2, 0.1, -1.0]];
        let (mut rp, mut rm, mut rv) = (vec![1.0f64, -2.0, 0.5], [0.0f64; 3], [0.0f64; 3]);
        for (t, g) in grads.iter().enumerate() {
            opt.update(0..3, &mut p, g, true, params(t as u64));
            let t = t as i32 + 1;
            for i in 0..3 {
                let gi = f64::from(g[i]);
                rp[i] *= 1.0 - 0.1 * cfg.weight_decay;
                rm[i] = cfg.beta1 * rm[i] + (1.0 - cfg.beta1) * gi;
                rv[i] = cfg.beta2 * rv[i] + (1.0 - cfg.beta2) * gi * gi;
                let mh = rm[i] / (1.0 - cfg.beta1.powi(t));
                let vh = rv[i] / (1.0 - cfg.beta2.powi(t));
                rp[i] -= 0.1 * mh / (vh.sqrt() + cfg.eps);
            }
        }
        for i in 0..3 {
            assert!((f64::from(p[i]) - rp[i]).abs() < 1e-5, "{p:?} vs {rp:?}");
        }
    }

    #[test]
    fn sgd_nesterov_matches_the_reference() {
        let cfg = OptimConfig {
            kind: OptimKind::Sgd,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
            ..OptimConfig::default()
        };
        let mut opt = Optimizer::new(&cfg, 1);
        let mut p = [1.0f32];
        opt.update(0..1, &mut p, &[1.0], true, params(0));
        // buf = 1, d = 1 + 0.9 = 1.9
        assert!((p[0] - (1.0 - 0.19)).abs() < 1e-6);
        opt.update(0..1, &mut p, &[1.0], true, params(1));
        // buf = 1.9, d = 1 + 0.9 * 1.9 = 2.71
        assert!((p[0] - (0.81 - 0.271)).abs() < 1e-6);
        assert_eq!(opt.state_bytes(), 4);
    }

    /// The tensor optimizer is the host optimizer's arithmetic: same inputs,
    /// same outputs (up to float rounding), for every kind, with clipping,
    /// partial weight decay and several steps.
    #[test]
    fn tensor_optimizer_matches_the_host_one() {
        let n = 37;
        let runs = vec![(0..10, true), (10..25, false), (25..37, true)];
        let sgd = |momentum: f64, nesterov: bool| OptimConfig {
            kind: OptimKind::Sgd,
            momentum,
            nesterov,
            weight_decay: 0.05,
            ..OptimConfig::default()
        };
        for cfg in [
            OptimConfig::default(),
            sgd(0.0, false),
            sgd(0.9, false),
            sgd(0.9, true),
        ] {
            let mut host = Optimizer::new(&cfg, n);
            let mut dev = TensorOptimizer::new(&cfg, n, Device::Cpu, &runs);
            let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut pt = Tensor::from_slice(&p);
            for step in 0..4u64 {
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i + 3 * step as usize) as f32 * 0.91).cos())
                    .collect();
                let sp = StepParams {
                    step,
                    lr: 0.01,
                    grad_scale: if step == 2 { 0.5 } else { 1.0 },
                };
                for (run, decay) in &runs {
                    host.update(
                        run.clone(),
                        &mut p[run.clone()],
                        &g[run.clone()],
                        *decay,
                        sp,
                    );
                }
                dev.update(&mut pt, &Tensor::from_slice(&g), sp);
            }
            let mut got = vec![0f32; n];
            pt.copy_data(&mut got, n);
            for i in 0..n {
                assert!(
                    (got[i] - p[i]).abs() < 1e-6,
                    "{:?} element {i}: {} vs {}",
                    cfg.kind,
                    got[i],
                    p[i]
                );
            }
            assert_eq!(dev.state_bytes(), host.state_bytes());
            assert_eq!(dev.state_names(), host.state_names());
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = OptimConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 9,
            ..OptimConfig::default()
        };
        let s = LrSchedule::new(&cfg, 109);
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(9) - 1.0).abs() < 1e-12);
        assert!((s.at(59) - 0.55).abs() < 1e-12);
        assert!((s.at(109) - 0.1).abs() < 1e-12);
        assert!((s.at(500) - 0.1).abs() < 1e-12);
    }
}
