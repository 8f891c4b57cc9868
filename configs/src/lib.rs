//! cohort job configs: one TOML file per job, one section per component.
//!
//! Precedence is CLI > file > defaults: a file is read into a TOML table, every
//! `--set section.key=value` override is applied to that table, and only then is
//! the table turned into a [`JobConfig`]. Unknown keys are rejected with their
//! full path (`train.max_step: unknown field ...`), so a typo never silently
//! falls back to a default. Each component receives only its own section
//! (`job.train`, `job.model`, ...), as in torchtitan.

mod choice;
mod sections;

use std::path::{Path, PathBuf};

pub use choice::*;
pub use sections::*;

/// A config that could not be read, parsed or validated. The message names
/// the file and the key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: invalid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: {key}: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
    #[error(
        "invalid override {arg:?}: {message} (expected --set section.key=value, e.g. --set train.max_steps=100)"
    )]
    Override { arg: String, message: String },
}

/// A whole job: what `cohort launch CONFIG.toml` runs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// Defaults for `cohort launch` flags (the flags win).
    pub launch: LaunchConfig,
    pub train: TrainConfig,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub parallel: ParallelConfig,
    pub checkpoint: CheckpointConfig,
    pub recovery: RecoveryConfig,
}

impl JobConfig {
    /// Reads `path`, applies `overrides` (`section.key=value`), checks every
    /// key and value.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string(), overrides)
    }

    /// Parses `text` (named `origin` in errors), applies `overrides`, validates.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    origin: origin.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?;
        for arg in overrides {
            apply_override(&mut table, arg)?;
        }
        let origin = if overrides.is_empty() {
            origin.to_owned()
        } else {
            format!("{origin} (with --set overrides)")
        };
        let job: JobConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Key {
                    origin: origin.clone(),
                    key: e.path().to_string(),
                    message: e.inner().to_string(),
                }
            })?;
        job.validate().map_err(|(key, message)| ConfigError::Key {
            origin,
            key,
            message,
        })?;
        Ok(job)
    }

    /// The resolved config as TOML: what a worker reads, and what a checkpoint
    /// records.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a JobConfig always serializes to TOML")
    }

    /// Cross-field checks that serde can't express. Returns the key path and
    /// what is wrong with it.
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |key: &str, message: String| Err((key.to_owned(), message));
        if let Some(n) = self.launch.nproc_per_node
            && n == 0
        {
            return err("launch.nproc_per_node", "must be at least 1".into());
        }
        if self.train.max_steps == 0 {
            return err("train.max_steps", "must be at least 1".into());
        }
        if self.train.batch_size == 0 {
            return err("train.batch_size", "must be at least 1".into());
        }
        if self.train.grad_accum_steps == 0 {
            return err("train.grad_accum_steps", "must be at least 1".into());
        }
        if self.parallel.backend == BackendChoice::Nccl && self.train.device == DeviceChoice::Cpu {
            return err(
                "parallel.backend",
                "nccl reduces CUDA tensors, but train.device = \"cpu\": set train.device = \"cuda\" \
                 (or \"auto\"), or use backend auto or tcp"
                    .into(),
            );
        }
        if self.parallel.bucket_mb.is_nan() || self.parallel.bucket_mb <= 0.0 {
            return err("parallel.bucket_mb", "must be greater than 0".into());
        }
        let m = &self.model;
        if m.kind == ModelKind::Gpt {
            if m.n_head == 0 || m.n_embd % m.n_head != 0 {
                return err(
                    "model.n_embd",
                    format!(
                        "{} must be a multiple of model.n_head ({})",
                        m.n_embd, m.n_head
                    ),
                );
            }
            if m.block_size == 0 {
                return err("model.block_size", "must be at least 1".into());
            }
        }
        if m.kind == ModelKind::Torchscript {
            if m.path.is_none() {
                return err(
                    "model.path",
                    "model.kind = \"torchscript\" trains the module in a file, but model.path is not set: \
                     name the file torch.jit.script(model).save(FILE) wrote (--set model.path=FILE)"
                        .into(),
                );
            }
            if m.block_size == 0 {
                return err("model.block_size", "must be at least 1".into());
            }
            if self.train.precision != Precision::Fp32 {
                return err(
                    "train.precision",
                    "a TorchScript module computes in the precision its own code chooses: \
                     train.precision must be \"fp32\" with model.kind = \"torchscript\""
                        .into(),
                );
            }
        } else if m.path.is_some() {
            return err(
                "model.path",
                format!(
                    "is read only with model.kind = \"torchscript\", and model.kind is \"{}\": \
                     set model.kind = \"torchscript\" or remove model.path",
                    match m.kind {
                        ModelKind::Gpt => "gpt",
                        _ => "mlp",
                    }
                ),
            );
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return err("model.dropout", format!("{} is not in [0, 1)", m.dropout));
        }
        if self.optim.lr.is_nan() || self.optim.lr <= 0.0 {
            return err("optim.lr", "must be greater than 0".into());
        }
        if self.data.kind != DataKind::Synthetic && self.data.path.is_none() {
            return err(
                "data.path",
                format!(
                    "data.kind = \"{}\" reads a file, but data.path is not set: name it (--set data.path=FILE)",
                    match self.data.kind {
                        DataKind::Bin => "bin",
                        _ => "text",
                    }
                ),
            );
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return err(
                "data.val_fraction",
                format!("{} is not in [0, 1)", self.data.val_fraction),
            );
        }
        if self.checkpoint.every > 0 && self.checkpoint.dir.is_none() {
            return err(
                "checkpoint.dir",
                format!(
                    "checkpoint.every = {} saves checkpoints, but there is no directory to save them in: \
                     set checkpoint.dir to a directory every rank can write (--set checkpoint.dir=DIR), \
                     or checkpoint.every = 0",
                    self.checkpoint.every
                ),
            );
        }
        if self.checkpoint.every > 0 && self.checkpoint.keep_last == 0 {
            return err("checkpoint.keep_last", "must be at least 1".into());
        }
        if self.recovery.mirror_every == 0 {
            return err(
                "recovery.mirror_every",
                "must be at least 1 (the mirror is refreshed every N steps)".into(),
            );
        }
        if self.recovery.rejoin_timeout_s == 0 {
            return err("recovery.rejoin_timeout_s", "must be at least 1".into());
        }
        Ok(())
    }
}

/// Applies one `section.key=value` override to `table`. The value is read as
/// a TOML value (`100`, `0.5`, `true`, `"text"`, `[1, 2]`); anything that is
/// not valid TOML is taken as a plain string, so `--set data.path=input.txt`
/// works without quotes.
pub fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let bad = |message: &str| ConfigError::Override {
        arg: arg.to_owned(),
        message: message.to_owned(),
    };
    let (path, raw) = arg.split_once('=').ok_or_else(|| bad("missing '='"))?;
    let parts: Vec<&str> = path.trim().split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad("the key must be section.key"));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let (last, sections) = parts.split_last().expect("at least two parts");
    let mut cur = table;
    for (i, part) in sections.iter().enumerate() {
        let entry = cur
            .entry((*part).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| {
            bad(&format!(
                "{} is a value, not a section",
                parts[..=i].join(".")
            ))
        })?;
    }
    cur.insert((*last).to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, overrides: &[&str]) -> Result<JobConfig, ConfigError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        JobConfig::from_toml_str(text, "test.toml", &overrides)
    }

    #[test]
    fn a_saved_config_names_its_model_kind_and_the_gpt_tables_get_torch_names() {
        let gpt = parse("[model]\nkind = \"gpt\"\n", &[]).unwrap();
        let kind = ModelKind::of_saved_config(&gpt.to_toml_string()).unwrap();
        assert_eq!(kind, ModelKind::Gpt);
        assert_eq!(ModelKind::of_saved_config(""), Ok(ModelKind::Mlp));
        // Other keys of another version do not matter; a bad kind does.
        let other = "[model]\nkind = \"gpt\"\nfuture_key = 1\n[future]\nx = 2\n";
        assert_eq!(ModelKind::of_saved_config(other), Ok(ModelKind::Gpt));
        let err = ModelKind::of_saved_config("[model]\nkind = \"rnn\"\n").unwrap_err();
        assert!(err.starts_with("model.kind: "), "{err}");
        assert!(ModelKind::of_saved_config("[model").is_err());

        assert_eq!(
            kind.state_dict_name("transformer.wte"),
            "transformer.wte.weight"
        );
        assert_eq!(
            kind.state_dict_name("transformer.wpe"),
            "transformer.wpe.weight"
        );
        let same = "transformer.h.0.attn.c_attn.weight";
        assert_eq!(kind.state_dict_name(same), same);
        assert_eq!(ModelKind::Mlp.state_dict_name("wte.weight"), "wte.weight");
    }

    #[test]
    fn a_torchscript_model_needs_its_file_fp32_and_keeps_its_names() {
        let err = parse("[model]\nkind = \"torchscript\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("model.path"), "{err}");
        let job = parse(
            "[model]\nkind = \"torchscript\"\npath = \"m.pt\"\n",
            &["train.precision=bf16"],
        )
        .unwrap_err();
        assert!(job.to_string().contains("train.precision"), "{job}");
        let err = parse("[model]\npath = \"m.pt\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("model.kind"), "{err}");
        let job = parse("[model]\nkind = \"torchscript\"\npath = \"m.pt\"\n", &[]).unwrap();
        assert_eq!(job.model.path.as_deref(), Some(Path::new("m.pt")));
        let kind = ModelKind::of_saved_config(&job.to_toml_string()).unwrap();
        assert_eq!(kind, ModelKind::Torchscript);
        let name = "blocks.0.attn.weight";
        assert_eq!(kind.state_dict_name(name), name);
        // The recorded config reads back as the same job.
        let again = JobConfig::from_toml_str(&job.to_toml_string(), "saved", &[]).unwrap();
        assert_eq!(again, job);
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("", &[]).unwrap(), JobConfig::default());
    }

    #[test]
    fn overrides_win_over_the_file() {
        let job = parse(
            "[train]\nmax_steps = 10\n",
            &["train.max_steps=20", "data.path=input.txt", "optim.lr=3e-4"],
        )
        .unwrap();
        assert_eq!(job.train.max_steps, 20);
        assert_eq!(job.data.path.as_deref(), Some(Path::new("input.txt")));
        assert_eq!(job.optim.lr, 3e-4);
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let err = parse("[train]\nmax_step = 10\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml: train.max_step: unknown field `max_step`"),
            "{err}"
        );
        let err = parse("", &["optim.betas=1"]).unwrap_err().to_string();
        assert!(err.contains("optim.betas"), "{err}");
        let err = parse("[trian]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("trian"), "{err}");
    }

    #[test]
    fn wrong_types_and_values_name_their_path() {
        let err = parse("[train]\nmax_steps = \"ten\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.max_steps"), "{err}");
        let err = parse("[parallel]\nzero_stage = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parallel.zero_stage: 3 is not supported"),
            "{err}"
        );
        let err = parse("[model]\nkind = \"gpt\"\nn_embd = 30\nn_head = 4\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.n_embd"), "{err}");
        let err = parse("", &["parallel.backend=nccl"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parallel.backend: nccl reduces CUDA tensors, but train.device = \"cpu\""),
            "{err}"
        );
        let ok = parse("", &["parallel.backend=nccl", "train.device=cuda"]).unwrap();
        assert_eq!(ok.parallel.backend, "nccl");
        let err = parse("", &["parallel.backend=gloo"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("use auto, tcp or nccl"), "{err}");
        let err = parse("", &["train.precision=fp8"]).unwrap_err().to_string();
        assert!(
            err.contains("train.precision: unknown precision \"fp8\""),
            "{err}"
        );
        let err = parse("", &["train.device=tpu"]).unwrap_err().to_string();
        assert!(err.contains("train.device"), "{err}");
        let err = parse("", &["parallel.algorithm=bcube"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("parallel.algorithm"), "{err}");
        let err = parse("", &["parallel.transport=rdma"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parallel.transport") && err.contains("auto, tcp or shm"),
            "{err}"
        );
        let err = parse("[model]\nkind = \"resnet\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.kind"), "{err}");
    }

    #[test]
    fn recovery_is_peer_by_default_and_checked() {
        let job = parse("", &[]).unwrap();
        assert_eq!(job.recovery.mode, RecoveryMode::Peer);
        assert_eq!(job.recovery.mirror_every, 1);
        let job = parse("[recovery]\nmode = \"restart\"\n", &[]).unwrap();
        assert_eq!(job.recovery.mode, RecoveryMode::Restart);
        let err = parse("", &["recovery.mode=pray"]).unwrap_err().to_string();
        assert!(
            err.contains("recovery.mode") && err.contains("use peer or restart"),
            "{err}"
        );
        let err = parse("", &["recovery.mirror_every=0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("recovery.mirror_every"), "{err}");
    }

    #[test]
    fn checkpoints_need_a_directory() {
        let err = parse("", &["checkpoint.every=10"]).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "test.toml (with --set overrides): checkpoint.dir: checkpoint.every = 10"
            ),
            "{err}"
        );
        assert!(parse("", &["checkpoint.every=10", "checkpoint.dir=ck"]).is_ok());
    }

    #[test]
    fn node_counts_are_numbers_or_ranges() {
        let job = parse("[launch]\nnnodes = 2\n", &[]).unwrap();
        assert_eq!(job.launch.nnodes, Some(NodeRange::exactly(2)));
        let job = parse("[launch]\nnnodes = \"1:4\"\n", &[]).unwrap();
        assert_eq!(job.launch.nnodes, Some(NodeRange { min: 1, max: 4 }));
        assert_eq!(parse(&job.to_toml_string(), &[]).unwrap(), job);
        let err = parse("", &["launch.nnodes=0"]).unwrap_err().to_string();
        assert!(
            err.contains("launch.nnodes") && err.contains("at least 1"),
            "{err}"
        );
        let err = parse("", &["parallel.zero_stage=-1"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parallel.zero_stage: -1 is not supported"),
            "{err}"
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(matches!(
            parse("[train", &[]),
            Err(ConfigError::Syntax { .. })
        ));
        for bad in ["train.max_steps", "max_steps=1", "train..x=1", "=1"] {
            assert!(
                matches!(parse("", &[bad]), Err(ConfigError::Override { .. })),
                "{bad}"
            );
        }
        let err = parse("", &["train.max_steps=5", "train.max_steps.x=1"]).unwrap_err();
        assert!(err.to_string().contains("not a section"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let job = parse(
            "[model]\nkind = \"gpt\"\n[launch]\nnproc_per_node = 2\n",
            &["train.seed=7"],
        )
        .unwrap();
        let again = parse(&job.to_toml_string(), &[]).unwrap();
        assert_eq!(job, again);
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml")
                && path.file_name() != Some("Cargo.toml".as_ref())
            {
                JobConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 1, "no configs found in {}", dir.display());
    }
}
