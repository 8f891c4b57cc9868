//! Optimizers on flat f32 shards, and the learning-rate schedule.
//!
//! The state of an optimizer is a few vectors as long as the part of the flat
//! parameter space this rank owns (all of it under DDP, its 1/N shard under
//! ZeRO). Each optimizer's arithmetic is written once ([`adamw`], [`sgd`]),
//! in a few elementwise operations ([`Elems`]) that exist for one `f32` and
//! for a flat tensor:
//! - [`Optimizer`] (the host path) runs it element by element over slices
//!   zipped together, one pass over memory per step that the compiler
//!   vectorizes;
//! - [`TensorOptimizer`] (the device path) runs it on whole flat tensors of
//!   any device, one kernel per operation over one flat buffer (no
//!   per-parameter launches), state kept on the device.

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

/// The elementwise operations the optimizers are written in, in place as
/// torch's `mul_`, `lerp_`, `addcmul_`, `addcdiv_`: for one `f32` (the host
/// loop) and for a flat tensor (every element at once).
pub trait Elems: Sized {
    /// `self · k`, new.
    fn scaled(&self, k: f32) -> Self;
    /// `self *= k`.
    fn scale_(&mut self, k: f32);
    /// `self *= 1 + (k - 1)·mask` (`mask` is 1 or 0 per element).
    fn scale_masked_(&mut self, mask: &Self, k: f32);
    /// `self += k · x`.
    fn axpy_(&mut self, k: f32, x: &Self);
    /// `self += w · (x - self)`.
    fn lerp_(&mut self, x: &Self, w: f32);
    /// `self += k · a · b`.
    fn addcmul_(&mut self, a: &Self, b: &Self, k: f32);
    /// `self += k · a / b`.
    fn addcdiv_(&mut self, a: &Self, b: &Self, k: f32);
    /// `sqrt(self) · k + eps`, new.
    fn sqrt_scaled_add(&self, k: f32, eps: f32) -> Self;
}

impl Elems for f32 {
    fn scaled(&self, k: f32) -> Self {
        self * k
    }
    fn scale_(&mut self, k: f32) {
        *self *= k;
    }
    fn scale_masked_(&mut self, mask: &Self, k: f32) {
        *self *= 1.0 + (k - 1.0) * mask;
    }
    fn axpy_(&mut self, k: f32, x: &Self) {
        *self += k * x;
    }
    fn lerp_(&mut self, x: &Self, w: f32) {
        *self += w * (x - *self);
    }
    fn addcmul_(&mut self, a: &Self, b: &Self, k: f32) {
        *self += k * a * b;
    }
    fn addcdiv_(&mut self, a: &Self, b: &Self, k: f32) {
        *self += k * a / b;
    }
    fn sqrt_scaled_add(&self, k: f32, eps: f32) -> Self {
        self.sqrt() * k + eps
    }
}

/// The tensor operations run without autograd: they update leaf buffers.
impl Elems for Tensor {
    fn scaled(&self, k: f32) -> Self {
        if k == 1.0 {
            self.shallow_clone()
        } else {
            self * f64::from(k)
        }
    }
    fn scale_(&mut self, k: f32) {
        let _ = self.g_mul_scalar_(f64::from(k));
    }
    fn scale_masked_(&mut self, mask: &Self, k: f32) {
        let _ = self.g_mul_(&(mask * (f64::from(k) - 1.0) + 1.0));
    }
    fn axpy_(&mut self, k: f32, x: &Self) {
        let _ = self.g_add_(&(x * f64::from(k)));
    }
    fn lerp_(&mut self, x: &Self, w: f32) {
        let _ = Tensor::lerp_(self, x, f64::from(w));
    }
    fn addcmul_(&mut self, a: &Self, b: &Self, k: f32) {
        let _ = Tensor::addcmul_(self, &(a * f64::from(k)), b);
    }
    fn addcdiv_(&mut self, a: &Self, b: &Self, k: f32) {
        let _ = Tensor::addcdiv_(self, &(a * f64::from(k)), b);
    }
    fn sqrt_scaled_add(&self, k: f32, eps: f32) -> Self {
        let mut d = self.sqrt();
        let _ = d.g_mul_scalar_(f64::from(k));
        let _ = d.g_add_scalar_(f64::from(eps));
        d
    }
}

/// Which elements of a range take weight decay.
pub enum Decay<'a, T> {
    /// None of them.
    Off,
    /// All of them.
    On,
    /// Those where the mask is 1 (0 elsewhere).
    Masked(&'a T),
}

/// One step's AdamW coefficients, from the config and [`StepParams`].
pub struct AdamStep {
    /// `1 - lr·weight_decay`.
    decay: f32,
    b1: f32,
    b2: f32,
    /// `lr / (1 - beta1^t)`.
    step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    inv_bc2_sqrt: f32,
    eps: f32,
    grad_scale: f32,
}

impl AdamStep {
    fn new(c: &OptimConfig, p: StepParams) -> Self {
        let t = (p.step + 1) as i32;
        AdamStep {
            decay: 1.0 - p.lr * c.weight_decay as f32,
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            step_size: (f64::from(p.lr) / (1.0 - c.beta1.powi(t))) as f32,
            inv_bc2_sqrt: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
            eps: c.eps as f32,
            grad_scale: p.grad_scale,
        }
    }
}

/// As `torch.optim.AdamW`: `p *= 1 - lr·wd` where decay applies, then the
/// bias-corrected Adam step: `m = lerp(m, g, 1-b1)`, `v = b2·v + (1-b2)·g²`,
/// `p -= lr/(1-b1^t) · m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
pub fn adamw<T: Elems>(p: &mut T, g: &T, m: &mut T, v: &mut T, decay: &Decay<T>, k: &AdamStep) {
    let g = g.scaled(k.grad_scale);
    match decay {
        Decay::Off => {}
        Decay::On => p.scale_(k.decay),
        Decay::Masked(mask) => p.scale_masked_(mask, k.decay),
    }
    m.lerp_(&g, 1.0 - k.b1);
    v.scale_(k.b2);
    v.addcmul_(&g, &g, 1.0 - k.b2);
    let denom = v.sqrt_scaled_add(k.inv_bc2_sqrt, k.eps);
    p.addcdiv_(m, &denom, -k.step_size);
}

/// One step's SGD coefficients.
pub struct SgdStep {
    lr: f32,
    weight_decay: f32,
    momentum: f32,
    nesterov: bool,
    grad_scale: f32,
}

impl SgdStep {
    fn new(c: &OptimConfig, p: StepParams) -> Self {
        SgdStep {
            lr: p.lr,
            weight_decay: c.weight_decay as f32,
            momentum: c.momentum as f32,
            nesterov: c.nesterov,
            grad_scale: p.grad_scale,
        }
    }
}

/// As `torch.optim.SGD` (dampening 0): L2 weight decay added to the
/// gradient where it applies, `buf = momentum·buf + g` (on the first step
/// torch sets the buffer to the gradient, which momentum·0 + g also gives),
/// then `p -= lr·(g + momentum·buf)` (nesterov) or `p -= lr·buf`.
pub fn sgd<T: Elems>(p: &mut T, g: &T, buf: Option<&mut T>, decay: &Decay<T>, k: &SgdStep) {
    let mut d = g.scaled(k.grad_scale);
    if k.weight_decay != 0.0 {
        match decay {
            Decay::Off => {}
            Decay::On => d.axpy_(k.weight_decay, p),
            Decay::Masked(mask) => d.addcmul_(p, mask, k.weight_decay),
        }
    }
    let dir = match buf {
        None => &d,
        Some(b) => {
            b.scale_(k.momentum);
            b.axpy_(1.0, &d);
            if k.nesterov {
                d.axpy_(k.momentum, b);
                &d
            } else {
                &*b
            }
        }
    };
    p.axpy_(-k.lr, dir);
}

/// A state vector: host memory or a flat tensor.
pub trait StateVec: Sized {
    fn numel(&self) -> usize;
}

impl StateVec for Vec<f32> {
    fn numel(&self) -> usize {
        self.len()
    }
}

impl StateVec for Tensor {
    fn numel(&self) -> usize {
        Tensor::numel(self)
    }
}

/// AdamW (decoupled weight decay, bias correction) or SGD with momentum,
/// over state vectors `S` and a weight-decay description `M`:
/// [`Optimizer`] on the host, [`TensorOptimizer`] on a device. Both step
/// any sub-range `at` of the range they were made for, with the same
/// arithmetic ([`adamw`], [`sgd`]).
pub struct Optim<S, M> {
    cfg: OptimConfig,
    /// AdamW: `[exp_avg, exp_avg_sq]`; SGD: `[momentum]` (empty when
    /// `optim.momentum` is 0).
    states: Vec<S>,
    /// Which elements take weight decay.
    decay: M,
}

/// The host path's optimizer: state in host memory, stepped run by run of
/// the weight-decay runs (relative offsets, as `FlatParams::decay_runs`).
pub type Optimizer = Optim<Vec<f32>, Vec<(Range<usize>, bool)>>;

/// The device path's optimizer: state as flat tensors, stepped all at once.
pub type TensorOptimizer = Optim<Tensor, DecayMask>;

/// Which elements of a tensor optimizer's range take weight decay.
pub enum DecayMask {
    None,
    All,
    /// 1.0 where decay applies, 0.0 elsewhere.
    Some(Tensor),
}

fn names_for(cfg: &OptimConfig) -> &'static [&'static str] {
    match cfg.kind {
        OptimKind::Adamw => &["exp_avg", "exp_avg_sq"],
        OptimKind::Sgd if cfg.momentum != 0.0 => &["momentum"],
        OptimKind::Sgd => &[],
    }
}

impl<S: StateVec, M> Optim<S, M> {
    /// Names of the per-element state vectors, in [`Optim::states`] order.
    pub fn state_names(&self) -> &'static [&'static str] {
        names_for(&self.cfg)
    }

    pub fn states(&self) -> &[S] {
        &self.states
    }

    /// Replaces the state (from a checkpoint): as many vectors as now, each
    /// as long.
    pub fn set_states(&mut self, states: Vec<S>) -> Result<(), String> {
        let have: Vec<usize> = self.states.iter().map(S::numel).collect();
        let got: Vec<usize> = states.iter().map(S::numel).collect();
        if got != have {
            return Err(format!(
                "optimizer state has {} vectors of lengths {got:?}; this {:?} optimizer needs {} of length {}",
                got.len(),
                self.cfg.kind,
                have.len(),
                have.first().copied().unwrap_or(0)
            ));
        }
        self.states = states;
        Ok(())
    }

    /// Bytes of optimizer state held by this rank.
    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(|s| s.numel() * 4).sum()
    }
}

impl Optimizer {
    /// An optimizer over `len` elements, state zeroed; `decay` gives the
    /// weight-decay runs of the range (relative offsets, as
    /// `FlatParams::decay_runs`).
    pub fn new(cfg: &OptimConfig, len: usize, decay: &[(Range<usize>, bool)]) -> Self {
        Optim {
            cfg: cfg.clone(),
            states: vec![vec![0.0; len]; names_for(cfg).len()],
            decay: decay.to_vec(),
        }
    }

    /// Updates `params` (the elements `at` of this optimizer's range) from
    /// `grads` (as long), one weight-decay run at a time.
    pub fn update(&mut self, at: Range<usize>, params: &mut [f32], grads: &[f32], p: StepParams) {
        debug_assert_eq!(params.len(), at.len());
        debug_assert_eq!(grads.len(), at.len());
        for (run, decay) in &self.decay {
            let (lo, hi) = (run.start.max(at.start), run.end.min(at.end));
            if lo >= hi {
                continue;
            }
            let decay = if *decay { Decay::On } else { Decay::Off };
            let (ps, gs) = (
                &mut params[lo - at.start..hi - at.start],
                &grads[lo - at.start..hi - at.start],
            );
            match self.cfg.kind {
                OptimKind::Adamw => {
                    let k = AdamStep::new(&self.cfg, p);
                    let (m, v) = self.states.split_at_mut(1);
                    let (m, v) = (&mut m[0][lo..hi], &mut v[0][lo..hi]);
                    for (((p, g), m), v) in ps.iter_mut().zip(gs).zip(m).zip(v) {
                        adamw(p, g, m, v, &decay, &k);
                    }
                }
                OptimKind::Sgd => {
                    let k = SgdStep::new(&self.cfg, p);
                    match self.states.first_mut() {
                        Some(buf) => {
                            for ((p, g), b) in ps.iter_mut().zip(gs).zip(&mut buf[lo..hi]) {
                                sgd(p, g, Some(b), &decay, &k);
                            }
                        }
                        None => {
                            for (p, g) in ps.iter_mut().zip(gs) {
                                sgd(p, g, None, &decay, &k);
                            }
                        }
                    }
                }
            }
        }
    }
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
        let decay = if decay.iter().all(|(_, d)| *d) {
            DecayMask::All
        } else if decay.iter().all(|(_, d)| !*d) {
            DecayMask::None
        } else {
            let mut mask = vec![0f32; len];
            for (run, d) in decay {
                mask[run.clone()].fill(if *d { 1.0 } else { 0.0 });
            }
            DecayMask::Some(Tensor::from_slice(&mask).to_device(device))
        };
        Optim {
            cfg: cfg.clone(),
            states: (0..names_for(cfg).len())
                .map(|_| Tensor::zeros([len as i64], (Kind::Float, device)))
                .collect(),
            decay,
        }
    }

    /// Updates `p` (the elements `at` of this optimizer's range) from `g`
    /// (as long), every element at once.
    pub fn update(&mut self, at: Range<usize>, p: &mut Tensor, g: &Tensor, sp: StepParams) {
        if at.is_empty() {
            return;
        }
        let part = |t: &Tensor| t.narrow(0, at.start as i64, at.len() as i64);
        let mask;
        let decay = match &self.decay {
            DecayMask::None => Decay::Off,
            DecayMask::All => Decay::On,
            DecayMask::Some(m) => {
                mask = part(m);
                Decay::Masked(&mask)
            }
        };
        let mut states: Vec<Tensor> = self.states.iter().map(part).collect();
        tch::no_grad(|| match self.cfg.kind {
            OptimKind::Adamw => {
                let (m, v) = states.split_at_mut(1);
                adamw(
                    p,
                    g,
                    &mut m[0],
                    &mut v[0],
                    &decay,
                    &AdamStep::new(&self.cfg, sp),
                );
            }
            OptimKind::Sgd => {
                let k = SgdStep::new(&self.cfg, sp);
                sgd(p, g, states.first_mut(), &decay, &k);
            }
        });
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
        let mut opt = Optimizer::new(&cfg, 3, &[(0..3, true)]);
        let mut p = vec![1.0f32, -2.0, 0.5];
        let grads = [[0.1f32, -0.3, 2.0], [0.2, 0.1, -1.0]];
        let (mut rp, mut rm, mut rv) = (vec![1.0f64, -2.0, 0.5], [0.0f64; 3], [0.0f64; 3]);
        for (t, g) in grads.iter().enumerate() {
            opt.update(0..3, &mut p, g, params(t as u64));
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
        let mut opt = Optimizer::new(&cfg, 1, &[(0..1, true)]);
        let mut p = [1.0f32];
        opt.update(0..1, &mut p, &[1.0], params(0));
        // buf = 1, d = 1 + 0.9 = 1.9
        assert!((p[0] - (1.0 - 0.19)).abs() < 1e-6);
        opt.update(0..1, &mut p, &[1.0], params(1));
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
            let mut host = Optimizer::new(&cfg, n, &runs);
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
                // The host one run by run of a split that cuts the decay
                // runs, the device one at once.
                for at in [0..7, 7..30, 30..n] {
                    host.update(at.clone(), &mut p[at.clone()], &g[at], sp);
                }
                dev.update(0..n, &mut pt, &Tensor::from_slice(&g), sp);
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
