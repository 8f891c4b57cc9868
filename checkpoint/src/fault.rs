//! `COHORT_INJECT_FAULT`: kill a worker at a chosen point, for tests and
//! users' recovery drills. Faults fire only in a job's first attempt
//! (`COHORT_RESTART_COUNT` unset or 0), so the restarted job gets past them.

use crate::CkptError;

pub const FAULT_ENV: &str = "COHORT_INJECT_FAULT";
pub const RESTART_COUNT_ENV: &str = "COHORT_RESTART_COUNT";

/// Where an injected fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// `rank=R,step=S`: the trainer aborts when rank R reaches step S.
    Step,
    /// `rank=R,step=S,at=commit`: rank R's saver aborts after writing its
    /// shard of step S, before the step is committed.
    Commit,
}

/// A parsed `COHORT_INJECT_FAULT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSpec {
    pub rank: usize,
    pub step: u64,
    pub at: FaultPoint,
}

impl FaultSpec {
    /// The fault for this attempt: `None` when `COHORT_INJECT_FAULT` is unset
    /// or empty, or when this is a restart (`COHORT_RESTART_COUNT` > 0).
    pub fn from_env() -> Result<Option<FaultSpec>, CkptError> {
        let Ok(spec) = std::env::var(FAULT_ENV) else {
            return Ok(None);
        };
        if spec.trim().is_empty() {
            return Ok(None);
        }
        let fault = FaultSpec::parse(&spec)?;
        let restarts = std::env::var(RESTART_COUNT_ENV).unwrap_or_default();
        let first_attempt = matches!(restarts.trim(), "" | "0");
        Ok(first_attempt.then_some(fault))
    }

    /// Parses `rank=R,step=S` or `rank=R,step=S,at=commit` (keys in any order).
    pub fn parse(spec: &str) -> Result<FaultSpec, CkptError> {
        let bad = |detail: String| CkptError::FaultSpec {
            spec: spec.to_string(),
            detail,
        };
        let (mut rank, mut step, mut at) = (None, None, FaultPoint::Step);
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match key.trim() {
                "rank" => {
                    rank = Some(value.trim().parse().map_err(|_| {
                        bad(format!("rank {value:?} is not a non-negative integer"))
                    })?)
                }
                "step" => {
                    step = Some(value.trim().parse().map_err(|_| {
                        bad(format!("step {value:?} is not a non-negative integer"))
                    })?)
                }
                "at" => {
                    at = match value.trim() {
                        "commit" => FaultPoint::Commit,
                        "step" => FaultPoint::Step,
                        other => return Err(bad(format!("at={other:?}: expected commit or step"))),
                    }
                }
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        Ok(FaultSpec {
            rank: rank.ok_or_else(|| bad("rank is missing".into()))?,
            step: step.ok_or_else(|| bad("step is missing".into()))?,
            at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            FaultSpec::parse("rank=1,step=25").unwrap(),
            FaultSpec {
                rank: 1,
                step: 25,
                at: FaultPoint::Step
            }
        );
        assert_eq!(
            FaultSpec::parse(" step=30 , rank=0, at=commit").unwrap(),
            FaultSpec {
                rank: 0,
                step: 30,
                at: FaultPoint::Commit
            }
        );
    }

    #[test]
    fn rejects_bad_specs_with_the_reason() {
        for (spec, want) in [
            ("rank=1", "step is missing"),
            ("step=3", "rank is missing"),
            ("rank=x,step=3", "rank \"x\""),
            ("rank=1,step=3,at=save", "at=\"save\""),
            ("rank=1,step=3,when=now", "unknown key"),
            ("rank1,step=3", "not key=value"),
        ] {
            let err = FaultSpec::parse(spec).unwrap_err().to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }
}
