//! cohort checkpoints, without libtorch.
//!
//! The trainer sees its model and optimizer as one flat f32 space of `total`
//! elements (parameters in model order) plus per-element optimizer states
//! over the same space (AdamW's `exp_avg`, `exp_avg_sq`; SGD's `momentum`).
//! Rank `r` of `world` owns `shard_range(total, world, r)` of it, under DDP
//! and ZeRO alike, so each rank writes only its slice: parameters are stored
//! once, split across ranks.
//!
//! - [`Saver`] (one per rank) writes a step: every rank writes its shard into
//!   `ROOT/.partial-step-N/` and fsyncs it, then a small done-record; rank 0
//!   waits for all records, writes `manifest.json`, renames the directory to
//!   `step-N` and replaces `ROOT/latest`. A crash at any moment leaves the
//!   previous step loadable. Saves can run on a background thread.
//! - [`load`] returns any rank's slice for any world size, re-sliced from the
//!   old shards that overlap it; [`find_resumable`] picks the newest step that
//!   verifies.
//! - [`verify`] and [`export`] back `cohort ckpt verify|export`.
//!
//! The commit protocol coordinates ranks through the filesystem: ROOT must be
//! storage every rank sees (one host, or a shared filesystem such as NFS or
//! Lustre), as with PyTorch's distributed checkpoint.

mod error;
pub mod format;
pub mod lease;
mod load;
mod save;

use std::ops::Range;

use serde::{Deserialize, Serialize};

pub use error::CkptError;
pub use format::Manifest;
pub use load::{
    ExportSummary, VerifyReport, export, find_resumable, latest_needs_repair, load, read_manifest,
    resolve, step_dirs, verify,
};
pub use save::{Saver, SaverOptions};

/// One parameter of the model in the flat f32 space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    /// The name the model's VarStore gives it.
    pub name: String,
    pub shape: Vec<usize>,
    /// First element in the flat space.
    pub offset: usize,
}

impl ParamLayout {
    /// Elements of the parameter (product of `shape`; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Everything about a step except the numbers themselves.
///
/// Every rank passes one to [`Saver::save`]; rank 0's is written to the
/// manifest (its `train_state` and `config_toml` included), the others' are
/// checked for agreement on step, world and size only.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// Optimizer steps completed.
    pub step: u64,
    pub world: usize,
    pub zero_stage: u8,
    /// Elements of the flat parameter space.
    pub total: usize,
    /// Every parameter, in model order.
    pub layout: Vec<ParamLayout>,
    /// Per-element state vectors saved beside the params, in `Shard::states` order.
    pub state_names: Vec<String>,
    /// Data-loader position, RNG states, LR schedule: opaque to this crate.
    pub train_state: serde_json::Value,
    /// The resolved job config.
    pub config_toml: String,
}

impl Meta {
    /// Whether a model with `layout` can load this checkpoint: same
    /// parameters in the same order, shapes and offsets. The error names the
    /// first parameter that differs.
    pub fn check_compatible(&self, layout: &[ParamLayout]) -> Result<(), CkptError> {
        let describe =
            |p: &ParamLayout| format!("{:?} shape {:?} at offset {}", p.name, p.shape, p.offset);
        for (i, (ours, theirs)) in self.layout.iter().zip(layout).enumerate() {
            if ours != theirs {
                return Err(CkptError::Incompatible {
                    detail: format!(
                        "parameter #{i}: the checkpoint has {}, the model has {}",
                        describe(ours),
                        describe(theirs)
                    ),
                });
            }
        }
        if self.layout.len() != layout.len() {
            let (more, extra) = if self.layout.len() > layout.len() {
                ("checkpoint", &self.layout[layout.len()])
            } else {
                ("model", &layout[self.layout.len()])
            };
            return Err(CkptError::Incompatible {
                detail: format!(
                    "the checkpoint has {} parameters, the model {}; first extra one (in the {more}): {}",
                    self.layout.len(),
                    layout.len(),
                    describe(extra)
                ),
            });
        }
        Ok(())
    }
}

/// One rank's slice of the flat space: params and each state over `range`.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    pub range: Range<usize>,
    pub params: Vec<f32>,
    /// In `Meta::state_names` order.
    pub states: Vec<Vec<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, shape: &[usize], offset: usize) -> ParamLayout {
        ParamLayout {
            name: name.into(),
            shape: shape.to_vec(),
            offset,
        }
    }

    fn meta(layout: Vec<ParamLayout>) -> Meta {
        Meta {
            step: 1,
            world: 1,
            zero_stage: 0,
            total: 10,
            layout,
            state_names: vec![],
            train_state: serde_json::Value::Null,
            config_toml: String::new(),
        }
    }

    #[test]
    fn compatible_layout_passes() {
        let layout = vec![p("w", &[2, 3], 0), p("b", &[3], 6)];
        meta(layout.clone()).check_compatible(&layout).unwrap();
    }

    #[test]
    fn incompatible_layout_names_the_first_mismatch() {
        let m = meta(vec![p("w", &[2, 3], 0), p("b", &[3], 6)]);
        let err = m
            .check_compatible(&[p("w", &[2, 3], 0), p("b", &[4], 6)])
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("parameter #1") && msg.contains("[3]") && msg.contains("[4]"),
            "{msg}"
        );
        let err = m.check_compatible(&[p("w", &[2, 3], 0)]).unwrap_err();
        assert!(err.to_string().contains("\"b\""), "{err}");
        let err = m
            .check_compatible(&[p("w", &[2, 3], 0), p("b", &[3], 6), p("c", &[1], 9)])
            .unwrap_err();
        assert!(err.to_string().contains("\"c\""), "{err}");
    }
}
