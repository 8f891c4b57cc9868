//! `COHORT_INJECT_FAULT`: kill a worker at a chosen point, for tests and
//! users' recovery drills. Faults fire only in a job's first attempt
//! (`COHORT_RESTART_COUNT` unset or 0; see [`crate::WorkerEnv::fault`]), so
//! the restarted job gets past them.

use std::fmt;

use crate::ContractError;

/// Where an injected fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// `rank=R,step=S`: the trainer aborts when rank R reaches step S.
    Step,
    /// `rank=R,step=S,at=commit`: rank R's checkpoint saver aborts after
    /// writing its shard of step S, before the step is committed.
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
    /// Parses `rank=R,step=S` or `rank=R,step=S,at=commit` (keys in any order).
    pub fn parse(spec: &str) -> Result<FaultSpec, ContractError> {
        let bad = |detail: String| ContractError::FaultSpec {
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

    /// The step at which rank `rank` must abort at `at`, if this fault is
    /// that one.
    pub fn step_for(&self, rank: usize, at: FaultPoint) -> Option<u64> {
        (self.rank == rank && self.at == at).then_some(self.step)
    }
}

/// The spec as [`FaultSpec::parse`] reads it.
impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank={},step={}", self.rank, self.step)?;
        match self.at {
            FaultPoint::Step => Ok(()),
            FaultPoint::Commit => f.write_str(",at=commit"),
        }
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

    #[test]
    fn display_parses_back_and_step_for_picks_the_rank_and_point() {
        for spec in ["rank=1,step=25", "rank=0,step=30,at=commit"] {
            let fault = FaultSpec::parse(spec).unwrap();
            assert_eq!(fault.to_string(), spec);
            assert_eq!(FaultSpec::parse(&fault.to_string()).unwrap(), fault);
        }
        let fault = FaultSpec::parse("rank=1,step=25").unwrap();
        assert_eq!(fault.step_for(1, FaultPoint::Step), Some(25));
        assert_eq!(fault.step_for(0, FaultPoint::Step), None);
        assert_eq!(fault.step_for(1, FaultPoint::Commit), None);
    }
}
