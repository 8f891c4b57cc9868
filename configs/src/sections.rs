//! The sections of a job config. Every field has a default, so a config file
//! names only what it changes; `deny_unknown_fields` makes typos errors.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::choice::{
    AlgorithmChoice, BackendChoice, DeviceChoice, NodeRange, Precision, RecoveryMode,
    TransportChoice, ZeroStage,
};

/// `[launch]`: defaults for `cohort launch` flags. A flag given on the command
/// line wins over the value here; `None` leaves the launcher's own default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchConfig {
    /// `N` or `"MIN:MAX"` nodes (as `--nnodes`).
    pub nnodes: Option<NodeRange>,
    /// Workers per node (as `--nproc-per-node`).
    pub nproc_per_node: Option<usize>,
    /// Restarts after a failure before giving up (as `--max-restarts`).
    pub max_restarts: Option<u32>,
    /// Seconds without step progress before a worker counts as hung.
    pub hang_timeout_s: Option<u64>,
    /// Root of the per-job log directories (as `--log-dir`).
    pub log_dir: Option<PathBuf>,
}

/// `[train]`: the training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps to run.
    pub max_steps: u64,
    /// Seed for parameters, dropout and data order (the same on every rank).
    pub seed: u64,
    /// Sequences (or samples) per micro-batch, per rank.
    pub batch_size: usize,
    /// Micro-batches per optimizer step; gradients are reduced on the last only.
    pub grad_accum_steps: usize,
    /// Evaluate on the held-out split every this many steps (0 = never).
    pub eval_every: u64,
    /// Micro-batches per evaluation.
    pub eval_batches: usize,
    /// Print a progress line every this many steps on rank 0.
    pub log_every: u64,
    /// `cpu`, `cuda`, or `auto` (cuda when available). With cuda each worker
    /// takes the GPU `LOCAL_RANK` (modulo the visible devices).
    pub device: DeviceChoice,
    /// `fp32`, or `bf16`: matrix multiplies and attention in bfloat16 (as
    /// `torch.autocast(dtype=torch.bfloat16)`), with fp32 master weights,
    /// LayerNorm, residual stream, loss and optimizer.
    pub precision: Precision,
    /// libtorch intra-op threads per worker (0 = leave libtorch's default).
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 100,
            seed: 1337,
            batch_size: 8,
            grad_accum_steps: 1,
            eval_every: 0,
            eval_batches: 4,
            log_every: 10,
            device: DeviceChoice::Cpu,
            precision: Precision::Fp32,
            threads: 0,
        }
    }
}

/// Which model to train: a built-in one, or the user's own TorchScript module.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A multi-layer perceptron (`n_embd` wide, `n_layer` hidden layers).
    #[default]
    Mlp,
    /// A decoder-only transformer shaped like nanoGPT.
    Gpt,
    /// A module scripted in Python (`torch.jit.script(m).save(FILE)`) at
    /// `model.path`, whose `forward(inputs, targets)` returns the mean loss.
    Torchscript,
}

impl ModelKind {
    /// The name PyTorch gives parameter `name` of this model in the
    /// `state_dict` of an `nn.Module` of the same structure (what `cohort
    /// ckpt export` writes). The GPT holds its token and position tables as
    /// bare tensors (`transformer.wte`), which PyTorch holds in
    /// `nn.Embedding`s (`transformer.wte.weight`); every other parameter of
    /// the built-in models is already named as PyTorch names it, and a
    /// TorchScript module's parameters keep the module's own names
    /// (`blocks.0.attn.weight`).
    pub fn state_dict_name(self, name: &str) -> String {
        match (self, name) {
            (ModelKind::Gpt, "transformer.wte" | "transformer.wpe") => format!("{name}.weight"),
            _ => name.to_owned(),
        }
    }

    /// `model.kind` of a resolved job config as a checkpoint records it (a
    /// missing key is the default, as when the job was parsed). Only that key
    /// is read, so a config of another cohort version still answers.
    pub fn of_saved_config(config_toml: &str) -> Result<ModelKind, String> {
        let table: toml::Table = config_toml.parse().map_err(|e: toml::de::Error| {
            format!("the recorded config is not TOML: {}", e.message())
        })?;
        match table.get("model").and_then(|m| m.get("kind")) {
            None => Ok(ModelKind::default()),
            Some(kind) => kind
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| format!("model.kind: {}", e.message())),
        }
    }
}

/// `[model]`: the model's shape. `mlp` uses `n_layer` and `n_embd`; `gpt` uses
/// all of them; `torchscript` uses `path`, and `block_size` and `vocab_size`
/// for the data (the module's own shape is in the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub kind: ModelKind,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Context length (tokens) of a training sequence.
    pub block_size: usize,
    /// Vocabulary size; 0 = take it from the data (256 for byte-level text).
    pub vocab_size: usize,
    pub dropout: f64,
    /// The TorchScript file of `kind = "torchscript"` (relative paths are
    /// relative to the directory `cohort launch` runs in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Mlp,
            n_layer: 2,
            n_head: 4,
            n_embd: 64,
            block_size: 64,
            vocab_size: 0,
            dropout: 0.0,
            path: None,
        }
    }
}

/// Where training data comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// A learnable task generated from the seed; nothing to read.
    #[default]
    Synthetic,
    /// Any UTF-8 text file, as bytes (vocabulary 256).
    Text,
    /// nanoGPT-format token file: little-endian u16 tokens, memory-mapped.
    Bin,
}

/// `[data]`: the data set. Each rank reads a disjoint, deterministic part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub kind: DataKind,
    /// The file for `text` and `bin` (relative paths are relative to the
    /// directory `cohort launch` runs in).
    pub path: Option<PathBuf>,
    /// Share of the data held out for evaluation (the end of the file).
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DataKind::Synthetic,
            path: None,
            val_fraction: 0.1,
        }
    }
}

/// Which optimizer runs on the (sharded) flat parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    #[default]
    Adamw,
    Sgd,
}

/// `[optim]`: optimizer and learning-rate schedule (linear warmup, then
/// cosine decay to `min_lr` at `decay_steps`, or at `train.max_steps` when 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// SGD momentum (0 = plain SGD).
    pub momentum: f64,
    pub nesterov: bool,
    /// Clip gradients to this global norm across all ranks (0 = no clipping).
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            kind: OptimKind::Adamw,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            decay_steps: 0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            momentum: 0.9,
            nesterov: false,
            grad_clip: 1.0,
        }
    }
}

/// `[parallel]`: how gradients and optimizer state are spread over ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// 0 = DDP (all-reduce), 1 = ZeRO-1 (sharded optimizer state),
    /// 2 = ZeRO-2 (also sharded gradients).
    pub zero_stage: ZeroStage,
    /// Gradient bucket size in MiB (25, as PyTorch DDP).
    pub bucket_mb: f64,
    /// `auto` (nccl for CUDA tensors when NCCL is usable, else tcp), `tcp`
    /// (host memory; CUDA tensors are staged through it), or `nccl` (CUDA
    /// tensors only; an error where NCCL can't run). `cohort doctor` shows
    /// what `auto` picks here and why.
    pub backend: BackendChoice,
    /// Collective algorithm: `auto`, `ring`, `tree`, `doubling` or
    /// `hierarchical` (node-aware).
    pub algorithm: AlgorithmChoice,
    /// How workers of the host-memory backend reach each other: `auto`
    /// (shared memory on one host, TCP between hosts), `tcp`, or `shm`
    /// (every worker on one host).
    pub transport: TransportChoice,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            zero_stage: ZeroStage::Ddp,
            bucket_mb: 25.0,
            backend: BackendChoice::Auto,
            algorithm: AlgorithmChoice::Auto,
            transport: TransportChoice::Auto,
        }
    }
}

/// `[checkpoint]`: sharded checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoint root (step directories and `latest` go here).
    pub dir: Option<PathBuf>,
    /// Save every this many steps (0 = never).
    pub every: u64,
    /// Committed checkpoints to keep; older ones are pruned after a commit.
    pub keep_last: usize,
    /// Write in the background after copying state to host memory.
    #[serde(rename = "async")]
    pub async_save: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            dir: None,
            every: 0,
            keep_last: 3,
            async_save: true,
        }
    }
}

/// `[recovery]`: what a failed worker of the built-in trainer costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// `peer` (in place: only the failed rank restarts and takes its state
    /// from a survivor) or `restart` (every worker restarts from the newest
    /// checkpoint on disk). Programs run with `cohort launch -- PROGRAM`
    /// always restart.
    pub mode: RecoveryMode,
    /// ZeRO: refresh the host-memory mirror of the buddy rank's shard every
    /// this many steps.
    pub mirror_every: u64,
    /// How long the survivors of a failure wait for the replacement to
    /// rejoin before the job falls back to a restart from disk (seconds).
    pub rejoin_timeout_s: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            mode: RecoveryMode::Peer,
            mirror_every: 1,
            rejoin_timeout_s: 120,
        }
    }
}
