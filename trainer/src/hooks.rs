//! Gradient hooks: a Rust callback told, during a backward pass, that
//! autograd has just accumulated a parameter's gradient into its `.grad`.
//!
//! tch has no autograd hooks; `csrc/grad_hooks.cpp` (compiled by
//! `build.rs` against the venv's libtorch headers) installs on each tensor
//! the hook PyTorch's `Tensor.register_post_accumulate_grad_hook` installs,
//! calling back here with the tensor's index. It fires once per tensor per
//! backward pass (autograd sums every use of a leaf before accumulating
//! it), after the accumulation, so the `.grad` read in the callback is the
//! one the backward leaves; under gradient accumulation it fires once per
//! pass. On the CPU the callback runs on the thread that called backward;
//! on a GPU on one of autograd's device threads.
//!
//! A panic in the callback never unwinds into libtorch: it is caught and
//! kept ([`GradHooks::take_panic`]). Dropping the [`GradHooks`] removes the
//! hooks; no callback runs after it (drop it when no backward pass over
//! these tensors is running on another thread).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tch::Tensor;

type FiredFn = extern "C" fn(ctx: *mut c_void, index: i64);
type ReleaseFn = extern "C" fn(ctx: *mut c_void);

unsafe extern "C" {
    fn cohort_grad_hook_set(
        tensor: *const c_void,
        ctx: *mut c_void,
        index: i64,
        fired: FiredFn,
        release: ReleaseFn,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn cohort_grad_hook_clear(
        tensor: *const c_void,
        ctx: *const c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// What every hook shares: the callback, whether it may still run, and the
/// first panic it raised. Each C++ hook holds one strong reference.
struct Inner {
    callback: Box<dyn Fn(usize) + Send + Sync>,
    live: AtomicBool,
    panic: Mutex<Option<String>>,
}

/// Why a hook could not be installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    /// The tensor's index in the slice given to [`GradHooks::install`].
    pub index: usize,
    pub reason: String,
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gradient hook on tensor {}: {}", self.index, self.reason)
    }
}

impl std::error::Error for HookError {}

/// Post-accumulate-grad hooks on a set of tensors, calling one callback
/// with the tensor's index; removed on drop.
pub struct GradHooks {
    inner: Arc<Inner>,
    /// Handles to the hooked tensors (shallow clones), for the removal.
    tensors: Vec<Tensor>,
}

impl GradHooks {
    /// Hooks every tensor of `tensors` (leaves that require grad, without a
    /// post-accumulate-grad hook of their own): after autograd accumulates
    /// the gradient of `tensors[i]`, `callback(i)` runs.
    pub fn install(
        tensors: &[&Tensor],
        callback: impl Fn(usize) + Send + Sync + 'static,
    ) -> Result<Self, HookError> {
        let mut hooks = GradHooks {
            inner: Arc::new(Inner {
                callback: Box::new(callback),
                live: AtomicBool::new(true),
                panic: Mutex::new(None),
            }),
            tensors: Vec::with_capacity(tensors.len()),
        };
        for (index, t) in tensors.iter().enumerate() {
            let ctx = Arc::into_raw(hooks.inner.clone())
                .cast_mut()
                .cast::<c_void>();
            let mut err = [0 as c_char; 512];
            // SAFETY: `t.as_ptr()` is the `at::Tensor*` tch holds, alive for
            // this call; `ctx` is a strong reference the shim owns from here
            // on (it releases it through `release`, on failure too); `err`
            // outlives the call and its length is passed.
            let rc = unsafe {
                cohort_grad_hook_set(
                    t.as_ptr().cast(),
                    ctx,
                    index as i64,
                    fired,
                    release,
                    err.as_mut_ptr(),
                    err.len(),
                )
            };
            if rc != 0 {
                // Dropping `hooks` removes those installed so far.
                return Err(HookError {
                    index,
                    reason: message(&err),
                });
            }
            hooks.tensors.push(t.shallow_clone());
        }
        Ok(hooks)
    }

    /// The message of the first panic a callback raised since the last
    /// call, if any.
    pub fn take_panic(&self) -> Option<String> {
        self.inner
            .panic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Drop for GradHooks {
    fn drop(&mut self) {
        self.inner.live.store(false, Ordering::Release);
        let ctx = Arc::as_ptr(&self.inner).cast::<c_void>();
        for t in &self.tensors {
            let mut err = [0 as c_char; 512];
            // SAFETY: `t` is alive; `ctx` only identifies our hooks (the
            // shim compares it, never dereferences it).
            let rc = unsafe {
                cohort_grad_hook_clear(t.as_ptr().cast(), ctx, err.as_mut_ptr(), err.len())
            };
            if rc < 0 {
                // The hook stays, but `live` is false: it calls nothing.
                eprintln!(
                    "warning: removing a gradient hook failed: {}",
                    message(&err)
                );
            }
        }
    }
}

fn message(err: &[c_char]) -> String {
    // SAFETY: the shim NUL-terminates what it writes; the buffer starts
    // zeroed, so it is NUL-terminated either way.
    unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Called by a hook after its tensor's gradient was accumulated.
extern "C" fn fired(ctx: *mut c_void, index: i64) {
    // SAFETY: `ctx` is the hook's strong reference to an `Inner`, released
    // only when the hook is destroyed, so it is alive for this call.
    let inner = unsafe { &*ctx.cast_const().cast::<Inner>() };
    if !inner.live.load(Ordering::Acquire) {
        return;
    }
    let result = catch_unwind(AssertUnwindSafe(|| (inner.callback)(index as usize)));
    if let Err(payload) = result {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let mut first = inner.panic.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(what);
    }
}

/// Called by a hook's destructor: gives back its reference.
extern "C" fn release(ctx: *mut c_void) {
    // SAFETY: `ctx` came from `Arc::into_raw` and each hook releases it
    // exactly once. The last reference drops the callback, whose panic
    // must not unwind into libtorch either.
    let _ = catch_unwind(|| unsafe { drop(Arc::from_raw(ctx.cast_const().cast::<Inner>())) });
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;

    use cohort_configs::{ModelConfig, ModelKind};
    use tch::nn::{self, Module, VarStore};
    use tch::{Device, Kind};

    use crate::model;

    /// Building a model reads the global torch RNG: one at a time.
    static BUILD: Mutex<()> = Mutex::new(());

    fn mlp() -> (VarStore, nn::Sequential) {
        let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let p = vs.root();
        let net = nn::seq()
            .add(nn::linear(&p / "l0", 6, 8, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&p / "l1", 8, 8, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&p / "l2", 8, 1, Default::default()));
        (vs, net)
    }

    fn loss_of(net: &impl Module, seed: i64) -> Tensor {
        let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let x = Tensor::randn([5, 6], (Kind::Float, Device::Cpu));
        net.forward(&x).square().mean(Kind::Float)
    }

    /// The names of `vs`'s trainable variables, in creation order, and handles.
    fn params(vs: &VarStore) -> (Vec<String>, Vec<Tensor>) {
        let named = vs.variables();
        vs.trainable_variables()
            .into_iter()
            .map(|t| {
                let name = named
                    .iter()
                    .find(|(_, v)| v.data_ptr() == t.data_ptr())
                    .map(|(n, _)| n.clone())
                    .expect("a trainable variable has a name");
                (name, t)
            })
            .unzip()
    }

    /// Installs hooks recording the order they fire in.
    fn recording(tensors: &[Tensor]) -> (GradHooks, Arc<Mutex<Vec<usize>>>) {
        let order = Arc::new(Mutex::new(Vec::new()));
        let o = order.clone();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let hooks = GradHooks::install(&refs, move |i| o.lock().unwrap().push(i)).unwrap();
        (hooks, order)
    }

    /// The layer a variable name belongs to (`l1.weight` -> `l1`).
    fn layer(name: &str) -> &str {
        name.rsplit_once('.').map_or(name, |(l, _)| l)
    }

    #[test]
    fn each_parameter_fires_once_per_backward_last_layer_first() {
        let (vs, net) = mlp();
        let (names, tensors) = params(&vs);
        let (_hooks, order) = recording(&tensors);
        loss_of(&net, 1).backward();
        let fired = order.lock().unwrap().clone();
        let mut sorted = fired.clone();
        sorted.sort();
        assert_eq!(sorted, (0..tensors.len()).collect::<Vec<_>>(), "{fired:?}");
        let layers: Vec<&str> = fired.iter().map(|&i| layer(&names[i])).collect();
        let mut reversed = layers.clone();
        reversed.dedup();
        assert_eq!(reversed, ["l2", "l1", "l0"], "fired as {layers:?}");
    }

    #[test]
    fn a_gpt_fires_once_per_parameter_with_later_blocks_first() {
        let cfg = ModelConfig {
            kind: ModelKind::Gpt,
            n_layer: 3,
            n_head: 2,
            n_embd: 8,
            block_size: 4,
            vocab_size: 0,
            dropout: 0.0,
            path: None,
        };
        let (vs, net) = {
            let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(5);
            let vs = VarStore::new(Device::Cpu);
            let net = model::build(&vs.root(), &cfg, 11, model::Precision::Fp32).unwrap();
            (vs, net)
        };
        let (names, tensors) = params(&vs);
        let (_hooks, order) = recording(&tensors);
        let tokens = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).view([2, 4]);
        net.loss(&tokens, &tokens.remainder(11), true)
            .unwrap()
            .backward();
        let fired = order.lock().unwrap().clone();
        let mut sorted = fired.clone();
        sorted.sort();
        assert_eq!(sorted, (0..tensors.len()).collect::<Vec<_>>(), "{fired:?}");
        // Every parameter of block h.2 before any of h.1, of h.1 before h.0.
        let last_of = |block: &str| {
            fired
                .iter()
                .rposition(|&i| names[i].contains(&format!(".h.{block}.")))
                .unwrap_or_else(|| panic!("no parameter of block {block} in {names:?}"))
        };
        let first_of = |block: &str| {
            fired
                .iter()
                .position(|&i| names[i].contains(&format!(".h.{block}.")))
                .unwrap()
        };
        assert!(last_of("2") < first_of("1"), "fired {fired:?} of {names:?}");
        assert!(last_of("1") < first_of("0"), "fired {fired:?} of {names:?}");
    }

    #[test]
    fn accumulation_fires_once_per_pass_and_the_grad_seen_is_the_final_one() {
        let (vs, net) = mlp();
        let (_, tensors) = params(&vs);
        let handles = Mutex::new(
            tensors
                .iter()
                .map(Tensor::shallow_clone)
                .collect::<Vec<_>>(),
        );
        let seen: Arc<Mutex<Vec<Vec<Tensor>>>> =
            Arc::new(Mutex::new((0..tensors.len()).map(|_| Vec::new()).collect()));
        let s = seen.clone();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let _hooks = GradHooks::install(&refs, move |i| {
            let g = handles.lock().unwrap()[i].grad().copy();
            s.lock().unwrap()[i].push(g);
        })
        .unwrap();
        let mut after_first = Vec::new();
        for pass in 0..3 {
            loss_of(&net, 10 + pass).backward();
            if pass == 0 {
                after_first = tensors.iter().map(|t| t.grad().copy()).collect();
            }
        }
        let seen = seen.lock().unwrap();
        for (i, t) in tensors.iter().enumerate() {
            assert_eq!(seen[i].len(), 3, "tensor {i} fired {} times", seen[i].len());
            // The first pass's value, then the sum the last pass leaves.
            assert!(seen[i][0].equal(&after_first[i]), "tensor {i}, pass 0");
            assert!(seen[i][2].equal(&t.grad()), "tensor {i}, last pass");
            assert!(
                !seen[i][2].equal(&seen[i][0]),
                "tensor {i}: passes must differ"
            );
        }
    }

    #[test]
    fn no_callback_after_drop_and_the_tensors_can_be_hooked_again() {
        let (vs, net) = mlp();
        let (_, tensors) = params(&vs);
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let hooks = GradHooks::install(&refs, move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        loss_of(&net, 1).backward();
        assert_eq!(count.load(Ordering::SeqCst), tensors.len());
        // A second owner is refused while the first holds the tensors.
        let err = GradHooks::install(&refs, |_| {}).err().expect("refused");
        assert_eq!(err.index, 0);
        assert!(err.reason.contains("already has"), "{err}");
        drop(hooks);
        loss_of(&net, 2).backward();
        assert_eq!(count.load(Ordering::SeqCst), tensors.len());
        // The callback (and what it holds) is gone with the hooks.
        assert_eq!(Arc::strong_count(&count), 1);
        let (_again, order) = recording(&tensors);
        loss_of(&net, 3).backward();
        assert_eq!(order.lock().unwrap().len(), tensors.len());
    }

    #[test]
    fn a_panicking_callback_is_caught_and_reported() {
        let (vs, net) = mlp();
        let (_, tensors) = params(&vs);
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let hooks = GradHooks::install(&refs, |i| {
            if i == 1 {
                panic!("callback failed on tensor {i}");
            }
        })
        .unwrap();
        loss_of(&net, 1).backward();
        assert_eq!(
            hooks.take_panic().as_deref(),
            Some("callback failed on tensor 1")
        );
        assert_eq!(hooks.take_panic(), None);
        // The backward itself completed: every gradient is there.
        assert!(tensors.iter().all(|t| t.grad().defined()));
    }

    #[test]
    fn a_tensor_that_is_not_a_trainable_leaf_is_refused() {
        let leaf = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let derived = &leaf * 2.0;
        let frozen = Tensor::ones([3], (Kind::Float, Device::Cpu));
        for (what, t) in [("derived", &derived), ("frozen", &frozen)] {
            let err = GradHooks::install(&[&leaf, t], |_| {}).err().expect(what);
            assert_eq!(err.index, 1, "{what}");
            assert!(err.reason.contains("not a leaf"), "{what}: {err}");
        }
        // The refusal removed the hook installed on `leaf` before it.
        let _ok = GradHooks::install(&[&leaf], |_| {}).unwrap();
    }
}
