//! The flat fp32 parameter space: every trainable variable of a `VarStore`,
//! in the order the model created them, laid end to end. Element `i` of the
//! space is one scalar of one parameter; gradient buckets, optimizer shards
//! and checkpoint shards are all ranges of it.

use std::ops::Range;

use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::TrainError;

/// One trainable variable and where it sits in the flat space.
pub struct Slot {
    /// The name the `VarStore` gives it (`transformer/h/0/attn/c_attn/weight`).
    pub name: String,
    pub shape: Vec<usize>,
    /// First element in the flat space.
    pub offset: usize,
    pub numel: usize,
    /// Weight decay applies (as nanoGPT: tensors of 2 or more dimensions;
    /// not biases or LayerNorm gains).
    pub decay: bool,
    tensor: Tensor,
}

impl Slot {
    /// This variable's place in a flat `[total]` tensor, shaped like it.
    fn view_in(&self, flat: &Tensor) -> Tensor {
        flat.narrow(0, self.offset as i64, self.numel as i64)
            .view(self.tensor.size().as_slice())
    }
}

/// The flat view of a `VarStore`'s trainable variables.
pub struct FlatParams {
    slots: Vec<Slot>,
    total: usize,
}

impl FlatParams {
    /// Lays out `vs`'s trainable variables in creation order. Every one must
    /// be f32.
    pub fn new(vs: &VarStore) -> Result<Self, TrainError> {
        let named = vs.variables();
        let mut slots = Vec::new();
        let mut offset = 0;
        for tensor in vs.trainable_variables() {
            let name = named
                .iter()
                .find(|(_, t)| t.data_ptr() == tensor.data_ptr())
                .map(|(n, _)| n.clone())
                .unwrap_or_else(|| format!("param{}", slots.len()));
            if tensor.kind() != Kind::Float {
                return Err(TrainError::Config(format!(
                    "parameter {name} is {:?}: cohort trains f32 parameters (convert the model with vs.float())",
                    tensor.kind()
                )));
            }
            let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
            let numel = shape.iter().product();
            slots.push(Slot {
                name,
                decay: shape.len() >= 2,
                shape,
                offset,
                numel,
                tensor,
            });
            offset += numel;
        }
        if slots.is_empty() {
            return Err(TrainError::Config(
                "the VarStore has no trainable variables: build the model before wrapping it"
                    .into(),
            ));
        }
        Ok(FlatParams {
            slots,
            total: offset,
        })
    }

    /// Elements in the flat space.
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The same layout over handles to the same variables (shallow
    /// clones: reads and writes reach the model's tensors).
    pub(crate) fn shallow_clone(&self) -> FlatParams {
        FlatParams {
            slots: self
                .slots
                .iter()
                .map(|s| Slot {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                    offset: s.offset,
                    numel: s.numel,
                    decay: s.decay,
                    tensor: s.tensor.shallow_clone(),
                })
                .collect(),
            total: self.total,
        }
    }

    /// The variable of every slot, in slot order.
    pub(crate) fn tensors(&self) -> Vec<&Tensor> {
        self.slots.iter().map(|s| &s.tensor).collect()
    }

    /// The indices of the slots holding elements of `range`.
    pub(crate) fn slots_in(&self, range: &Range<usize>) -> Vec<usize> {
        let mut out = Vec::new();
        let first = self
            .slots
            .partition_point(|s| s.offset + s.numel <= range.start);
        for (i, slot) in self.slots.iter().enumerate().skip(first) {
            if slot.offset >= range.end {
                break;
            }
            if slot.numel > 0 && slot.offset + slot.numel > range.start {
                out.push(i);
            }
        }
        out
    }

    /// Calls `f(slot, part_of_slot, part_of_range)` for every slot overlapping
    /// `range`, in order.
    fn overlapping(
        &self,
        range: &Range<usize>,
        mut f: impl FnMut(&Slot, Range<usize>, Range<usize>),
    ) {
        let first = self
            .slots
            .partition_point(|s| s.offset + s.numel <= range.start);
        for slot in &self.slots[first..] {
            if slot.offset >= range.end {
                break;
            }
            let lo = range.start.max(slot.offset);
            let hi = range.end.min(slot.offset + slot.numel);
            if lo < hi {
                f(
                    slot,
                    lo - slot.offset..hi - slot.offset,
                    lo - range.start..hi - range.start,
                );
            }
        }
    }

    /// Copies the parameter values of `range` into `dst` (`range.len()` long).
    pub fn read_params(&self, range: Range<usize>, dst: &mut [f32]) {
        self.overlapping(&range, |slot, part, at| {
            copy_out(&slot.tensor, part, &mut dst[at]);
        });
    }

    /// Copies the gradients of `range` into `dst`; a parameter without a
    /// gradient (unused in the forward pass) reads as zeros.
    pub fn read_grads(&self, range: Range<usize>, dst: &mut [f32]) {
        self.overlapping(&range, |slot, part, at| {
            let grad = slot.tensor.grad();
            if grad.defined() {
                copy_out(&grad, part, &mut dst[at]);
            } else {
                dst[at].fill(0.0);
            }
        });
    }

    /// Writes `src` into the parameters of `range`.
    pub fn write_params(&self, range: Range<usize>, src: &[f32]) {
        tch::no_grad(|| {
            self.overlapping(&range, |slot, part, at| {
                let src = &src[at];
                // SAFETY: `src` outlives the blob tensor, which is only read by
                // the copy below and dropped at the end of this closure.
                let blob = unsafe {
                    Tensor::from_blob(
                        src.as_ptr().cast(),
                        &[src.len() as i64],
                        &[],
                        Kind::Float,
                        Device::Cpu,
                    )
                };
                let mut dst =
                    slot.tensor
                        .view([-1])
                        .narrow(0, part.start as i64, part.len() as i64);
                dst.copy_(&blob);
            });
        });
    }

    /// Zeroes every gradient (before the next step's backward passes).
    pub fn zero_grads(&self) {
        for slot in &self.slots {
            let mut grad = slot.tensor.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// Makes every parameter a view of `params` (`[total]`, the parameters'
    /// device and dtype) at its flat offset, after copying its values there:
    /// from then on the model reads and autograd differentiates the flat
    /// buffer (as `param.data = flat[offset:offset+numel].view(shape)`).
    pub fn alias_params(&self, params: &mut Tensor) {
        tch::no_grad(|| {
            for slot in &self.slots {
                let mut view = slot.view_in(params);
                view.copy_(&slot.tensor);
                let mut handle = slot.tensor.shallow_clone();
                handle.set_data(&view);
            }
        });
    }

    /// Makes every parameter's `.grad` a view of `grads` (`[total]`) at its
    /// flat offset, so backward passes accumulate straight into the flat
    /// buffer (autograd adds into an existing `.grad` in place), as PyTorch
    /// DDP's `gradient_as_bucket_view`. Gradients already accumulated are
    /// kept (copied in); those that don't exist yet are created, as zeros,
    /// by one backward pass of `Σ 0·param`.
    pub fn alias_grads(&self, grads: &Tensor) {
        let missing: Vec<Tensor> = self
            .slots
            .iter()
            .filter(|s| !s.tensor.grad().defined())
            .map(|s| s.tensor.sum(s.tensor.kind()) * 0.0)
            .collect();
        if !missing.is_empty() {
            Tensor::stack(&missing, 0).sum(Kind::Float).backward();
        }
        tch::no_grad(|| {
            for slot in &self.slots {
                let mut view = slot.view_in(grads);
                let mut grad = slot.tensor.grad();
                view.copy_(&grad);
                grad.set_data(&view);
            }
        });
    }

    /// The slots whose `.grad` is not (any longer) the view of `grads` at
    /// their offset: undefined, or a tensor of its own. That happens when a
    /// program sets gradients to none (`tch::nn::Optimizer::zero_grad`, as
    /// libtorch's `set_to_none`): the next backward then allocates fresh
    /// gradients and the flat buffer would be stepped on stale zeros.
    /// Reads host metadata only.
    pub fn unaliased_grads(&self, grads: &Tensor) -> Vec<&str> {
        let base = grads.data_ptr() as usize;
        let size = grads.kind().elt_size_in_bytes();
        self.slots
            .iter()
            .filter(|s| {
                let g = s.tensor.grad();
                !g.defined() || g.data_ptr() as usize != base + s.offset * size
            })
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The weight-decay runs of `range`: `(sub-range relative to range.start, decay)`.
    pub fn decay_runs(&self, range: Range<usize>) -> Vec<(Range<usize>, bool)> {
        let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
        self.overlapping(&range, |slot, _, at| match runs.last_mut() {
            Some((r, d)) if *d == slot.decay && r.end == at.start => r.end = at.end,
            _ => runs.push((at, slot.decay)),
        });
        runs
    }
}

fn copy_out(t: &Tensor, part: Range<usize>, dst: &mut [f32]) {
    let src = t
        .reshape([-1])
        .narrow(0, part.start as i64, part.len() as i64);
    src.copy_data(dst, part.len());
}
