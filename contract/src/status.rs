//! The worker status file: how a worker tells its agent how far it got.
//!
//! The agent sets `COHORT_STATUS_FILE=<log-dir>/<job-id>/attempt_<g>/rank_<r>.status`.
//! A worker that reports progress replaces that file atomically (write a
//! temporary file next to it, then rename it over) with one JSON object:
//!
//! ```json
//! {"step": 120, "max_steps": 1000, "loss": 2.31, "tokens_per_s": 51200.0, "time": 1763781393.5}
//! ```
//!
//! `loss` and `tokens_per_s` may be `null`; `time` is unix seconds; a worker
//! that resumed from a checkpoint adds `"resumed": {"checkpoint": PATH,
//! "step": N}`. The agent
//! reads it every heartbeat, sends it to the coordinator (the progress view)
//! and watches `step`: once a worker has written the file, a step that does
//! not change for `--hang-timeout` means the worker is hung. A worker that
//! never writes the file is never considered hung.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ContractError;

/// One worker's progress, as written to its status file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerProgress {
    /// Optimizer steps done.
    pub step: u64,
    /// Steps the job will run (0 if unknown).
    pub max_steps: u64,
    /// The latest training loss.
    pub loss: Option<f64>,
    /// The job's throughput (all ranks' tokens per second) as this worker
    /// measured it; the progress view shows rank 0's.
    pub tokens_per_s: Option<f64>,
    /// When the worker wrote this, in unix seconds.
    pub time: f64,
    /// The checkpoint this attempt resumed from, if it did (the launcher
    /// says so once); absent in the file when it started fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Resumed>,
}

/// Where a worker's attempt resumed from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// The checkpoint's step directory.
    pub checkpoint: String,
    /// The step it holds: the first step of this attempt is the next one.
    pub step: u64,
}

impl WorkerProgress {
    /// Reads a status file; `Ok(None)` if the worker has not written it yet.
    pub fn read(path: &Path) -> Result<Option<Self>, ContractError> {
        let io = |error| ContractError::Io {
            path: path.to_owned(),
            error,
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// Replaces the status file at `path` atomically (`PATH.tmp`, then a
    /// rename over `PATH`), so a reader sees the old or the new progress,
    /// never a torn one.
    pub fn write(&self, path: &Path) -> Result<(), ContractError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let json = serde_json::to_vec(self).map_err(|e| ContractError::Io {
            path: path.to_owned(),
            error: std::io::Error::other(e),
        })?;
        std::fs::write(&tmp, json).map_err(|error| ContractError::Io {
            path: tmp.clone(),
            error,
        })?;
        std::fs::rename(&tmp, path).map_err(|error| ContractError::Io {
            path: path.to_owned(),
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rank_0.status");
        assert_eq!(WorkerProgress::read(&path).unwrap(), None);
        let p = WorkerProgress {
            step: 3,
            max_steps: 10,
            loss: Some(1.5),
            tokens_per_s: None,
            time: 1.0,
            resumed: Some(Resumed {
                checkpoint: "ckpt/step-00000002".into(),
                step: 2,
            }),
        };
        p.write(&path).unwrap();
        assert_eq!(WorkerProgress::read(&path).unwrap(), Some(p));
        std::fs::write(&path, b"{\"step\": 1}").unwrap();
        let err = WorkerProgress::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("rank_0.status") && err.contains("max_steps"),
            "{err}"
        );
    }

    #[test]
    fn reads_the_documented_shape_with_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(
            &path,
            br#"{"step": 2, "max_steps": 0, "loss": null, "tokens_per_s": null, "time": 5.5}"#,
        )
        .unwrap();
        let p = WorkerProgress::read(&path).unwrap().unwrap();
        assert_eq!((p.step, p.loss, p.time), (2, None, 5.5));
    }

    #[test]
    fn a_write_into_a_missing_directory_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone/rank_1.status");
        let p = WorkerProgress {
            step: 0,
            max_steps: 0,
            loss: None,
            tokens_per_s: None,
            time: 0.0,
            resumed: None,
        };
        let err = p.write(&path).unwrap_err().to_string();
        assert!(err.contains("rank_1.status.tmp"), "{err}");
    }
}
