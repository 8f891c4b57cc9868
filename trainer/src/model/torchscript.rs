//! `model.kind = "torchscript"`: the user's own module, scripted in Python
//! (`torch.jit.script(model).save("model.pt")`), whose
//! `forward(inputs, targets)` takes int64 token tensors `[batch, block]` and
//! returns the scalar mean loss.
//!
//! Its parameters are the `VarStore`'s variables, registered under the
//! module's own names (`blocks.0.attn.weight`) in the module's order: the
//! variables *are* the module's parameter tensors (the same tensor, not a
//! copy), so the trainer's flat space, gradient hooks, optimizer,
//! checkpoints and export work on them as on a built-in model's, and the
//! module computes with what the optimizer wrote.
//!
//! Everything that would make training fail or go wrong is checked here,
//! before the first step, as a config error (the worker exits with
//! `PERMANENT_FAILURE` and the job is not restarted): a missing file, a
//! file that is not a TorchScript module, parameters that are not float32
//! or do not require grad (cohort trains every parameter), none at all,
//! buffers (refused: they would not be kept equal across ranks,
//! checkpointed or exported; csrc/module_buffers.cpp lists them), and a
//! `forward` that does not take `(inputs, targets)` or does not return a
//! scalar loss that depends on the parameters (one forward on a batch of
//! two sequences).

use std::cell::{Cell, RefCell};
use std::ffi::{CStr, CString, c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, Tensor, nn};

use super::LanguageModel;
use crate::TrainError;

/// A TorchScript module trained in place.
pub struct TorchScript {
    module: RefCell<CModule>,
    /// The module's mode (`train()` / `eval()`), switched when it changes.
    training: Cell<bool>,
    path: PathBuf,
}

impl TorchScript {
    /// Loads `path` onto `vs`'s device, registers its parameters under `vs`
    /// and checks it on a batch of tokens below `vocab` of `block` tokens.
    pub fn load(
        vs: &nn::Path,
        path: &Path,
        vocab: usize,
        block: usize,
    ) -> Result<Self, TrainError> {
        let shown = path.display();
        let bad = |what: String| TrainError::Config(format!("model.path {shown}: {what}"));
        if !path.is_file() {
            return Err(bad(format!(
                "{} (relative paths are relative to the directory the job runs in; \
                 write the file with torch.jit.script(model).save(FILE))",
                if path.exists() {
                    "is not a file"
                } else {
                    "no such file"
                }
            )));
        }
        let mut module = CModule::load_on_device(path, vs.device()).map_err(|e| {
            bad(format!(
                "not a TorchScript module ({}): write it with torch.jit.script(model).save(FILE)",
                first_lines(&e.to_string(), 3)
            ))
        })?;
        let buffers = module_buffers(path).map_err(|e| {
            bad(format!(
                "cannot list the module's buffers: {}",
                first_lines(&e, 3)
            ))
        })?;
        if !buffers.is_empty() {
            return Err(bad(format!(
                "the module has buffers ({}), which cohort refuses: it trains parameters only, \
                 so buffers would not be kept equal across ranks (running statistics drift \
                 apart), checkpointed, or exported. Compute constants in forward instead \
                 (F.scaled_dot_product_attention(..., is_causal=True) needs no mask buffer), \
                 and use LayerNorm or GroupNorm instead of BatchNorm",
                buffers.join(", ")
            )));
        }
        let params = module
            .named_parameters()
            .map_err(|e| bad(format!("cannot list the module's parameters: {e}")))?;
        let frozen: Vec<&str> = params
            .iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(n, _)| n.as_str())
            .collect();
        if params.is_empty() || frozen.len() == params.len() {
            return Err(bad(
                "the module has no parameter that requires grad, so there is nothing to train"
                    .into(),
            ));
        }
        if !frozen.is_empty() {
            return Err(bad(format!(
                "parameters {} do not require grad: cohort trains every parameter of the module \
                 (and exports them all); set requires_grad on them, or make them constants or \
                 arguments instead of parameters",
                frozen.join(", ")
            )));
        }
        if let Some((name, t)) = params.iter().find(|(_, t)| t.kind() != Kind::Float) {
            return Err(bad(format!(
                "parameter {name} is {:?}: cohort trains float32 parameters \
                 (call model.float() before torch.jit.script)",
                t.kind()
            )));
        }
        for (name, tensor) in params {
            register(vs, &name, tensor);
        }
        module
            .f_set_train()
            .map_err(|e| bad(format!("cannot set the module to training mode: {e}")))?;
        let net = TorchScript {
            module: RefCell::new(module),
            training: Cell::new(true),
            path: path.to_owned(),
        };
        net.check_forward(vs.device(), vocab, block)?;
        Ok(net)
    }

    /// One forward pass on two sequences of `block` tokens: it must return
    /// a floating-point scalar that depends on the parameters. No backward
    /// pass, so no gradient is left in the parameters.
    fn check_forward(&self, device: Device, vocab: usize, block: usize) -> Result<(), TrainError> {
        let shown = self.path.display();
        let n = 2 * block as i64;
        let tokens = Tensor::arange(n, (Kind::Int64, device))
            .remainder(vocab.max(1) as i64)
            .view([2, block as i64]);
        let targets = tokens.roll([-1], [1]);
        let wanted = format!(
            "cohort calls forward(inputs, targets) with two int64 tensors of shape [batch, block] \
             ([2, {block}] here, tokens below {vocab}) and wants the scalar mean loss"
        );
        let out = self
            .module
            .borrow()
            .forward_is(&[IValue::Tensor(tokens), IValue::Tensor(targets)])
            .map_err(|e| {
                TrainError::Config(format!(
                    "model.path {shown}: forward(inputs, targets) failed: {}\n{wanted}",
                    first_lines(&e.to_string(), 12)
                ))
            })?;
        let loss = match out {
            IValue::Tensor(t) => t,
            other => {
                return Err(TrainError::Config(format!(
                    "model.path {shown}: forward returned {}, not a tensor: {wanted}",
                    ivalue_kind(&other)
                )));
            }
        };
        if loss.dim() != 0 {
            return Err(TrainError::Config(format!(
                "model.path {shown}: forward returned a tensor of shape {:?}, not a scalar: {wanted} \
                 (e.g. F.cross_entropy(logits.view(-1, vocab), targets.view(-1)))",
                loss.size()
            )));
        }
        if !loss.is_floating_point() {
            return Err(TrainError::Config(format!(
                "model.path {shown}: forward returned a {:?} scalar: {wanted}",
                loss.kind()
            )));
        }
        if !loss.requires_grad() {
            return Err(TrainError::Config(format!(
                "model.path {shown}: the loss forward returns does not depend on the module's \
                 parameters (it does not require grad), so training cannot change it"
            )));
        }
        Ok(())
    }
}

impl LanguageModel for TorchScript {
    fn loss(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor, TrainError> {
        let mut module = self.module.borrow_mut();
        let torch = |context: &str| {
            let context = format!(
                "{context} of the TorchScript module {}",
                self.path.display()
            );
            move |source| TrainError::Torch { context, source }
        };
        if self.training.get() != train {
            if train {
                module.f_set_train().map_err(torch("train()"))?;
            } else {
                module.f_set_eval().map_err(torch("eval()"))?;
            }
            self.training.set(train);
        }
        module
            .forward_ts(&[tokens, targets])
            .map_err(torch("forward"))
    }
}

type BufferNameFn = extern "C" fn(ctx: *mut c_void, name: *const c_char);

unsafe extern "C" {
    fn cohort_module_buffers(
        path: *const c_char,
        ctx: *mut c_void,
        name: BufferNameFn,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Appends `name` to the `Vec<String>` `ctx`.
extern "C" fn push_buffer_name(ctx: *mut c_void, name: *const c_char) {
    // SAFETY: `ctx` is `module_buffers`'s `&mut Vec<String>`, alive and not
    // otherwise borrowed during the call that passes it; `name` is a
    // NUL-terminated string valid for this call.
    let (names, name) = unsafe { (&mut *ctx.cast::<Vec<String>>(), CStr::from_ptr(name)) };
    names.push(name.to_string_lossy().into_owned());
}

/// The names of the buffers of the TorchScript module at `path`
/// (csrc/module_buffers.cpp: tch lists only parameters), or libtorch's
/// error.
fn module_buffers(path: &Path) -> Result<Vec<String>, String> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "the path contains a NUL byte".to_owned())?;
    let mut names: Vec<String> = Vec::new();
    let mut err = vec![0 as c_char; 4096];
    // SAFETY: every pointer is valid for the call; `push_buffer_name` gets
    // `names` back as its context, and the shim catches its exceptions.
    let rc = unsafe {
        cohort_module_buffers(
            c_path.as_ptr(),
            (&mut names as *mut Vec<String>).cast(),
            push_buffer_name,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        Ok(names)
    } else {
        // SAFETY: the shim NUL-terminates what it writes within `err`.
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }
}

/// Registers `tensor` under `vs` as the trainable variable `name` (dots
/// are `VarStore` path separators, so `blocks.0.attn.weight` is the path
/// `blocks` / `0` / `attn` and the variable `weight`).
fn register(vs: &nn::Path, name: &str, tensor: Tensor) {
    let mut parts: Vec<&str> = name.split('.').collect();
    let leaf = parts.pop().unwrap_or(name);
    let path = parts.iter().fold(vs.clone(), |p, part| p.sub(*part));
    let _ = path.add(leaf, tensor, true);
}

/// The first `n` lines of libtorch's message `text`, without the C++
/// stack it ends with (from "Exception raised from" on). A TorchScript
/// error's lines name the module's source line that failed.
fn first_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .trim()
        .lines()
        .take_while(|l| !l.starts_with("Exception raised from"))
        .collect();
    let mut out = lines[..lines.len().min(n)].join("\n");
    if lines.len() > n {
        out.push_str("\n...");
    }
    out
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tuple(_) => "a tuple",
        IValue::GenericList(_) | IValue::TensorList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        IValue::Double(_) | IValue::Int(_) | IValue::Bool(_) => "a Python number",
        IValue::String(_) => "a string",
        _ => "a value of another type",
    }
}
