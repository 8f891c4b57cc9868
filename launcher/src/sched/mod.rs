//! A node's place in a job started by a batch scheduler, from the
//! environment the scheduler gives every node: how many nodes, which one
//! this is, where the coordinator runs, the job's id. With it, the same
//! `cohort launch` command line runs on every node.
//!
//! - [`slurm`]: a task of `srun` (`SLURM_*`).
//! - [`kubernetes`]: a pod of an Indexed Job or a JobSet (`JOB_COMPLETION_INDEX`).
//! - [`hostlist`]: Slurm's node-list syntax.
//!
//! Everything here is a pure function of the variables it is handed (and,
//! for Kubernetes, the pod's hosts file), so each case is unit-tested
//! without a scheduler; `cohort launch` hands [`detect`] the real ones.

pub mod hostlist;
pub mod kubernetes;
pub mod slurm;

use std::fmt;

use crate::decision::NodeRange;
use crate::launch::CoordinatorMode;

/// Which scheduler the placement came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduler {
    Slurm,
    Kubernetes,
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Slurm => "Slurm",
            Self::Kubernetes => "Kubernetes",
        })
    }
}

/// What the scheduler's environment says about this node's place in the job.
#[derive(Clone, Debug)]
pub struct Placement {
    pub scheduler: Scheduler,
    /// Nodes in the job: `--nnodes` if given (it must agree with Slurm's
    /// count), else Slurm's count, else (Kubernetes, which doesn't say)
    /// the config's.
    pub nnodes: NodeRange,
    /// This node's rank among them, from 0.
    pub node_rank: u32,
    /// Hosted by this launcher (the first node) or joined (the others).
    pub coordinator: CoordinatorMode,
    pub job_id: String,
    /// One line for the launcher to print: what was derived, from what.
    pub summary: String,
}

/// What `cohort launch` was told besides the scheduler's environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Asked {
    /// `--nnodes`.
    pub nnodes: Option<NodeRange>,
    /// The config's `launch.nnodes`.
    pub config_nnodes: Option<NodeRange>,
    /// A job token was given, or the coordinator was chosen by flag (then
    /// `cohort launch` checks the token itself).
    pub token_given: bool,
}

/// A scheduler environment that doesn't describe a job cohort can run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    /// A variable has a value that can't be right.
    #[error("{scheduler}: {var}={value:?}: {why}")]
    Invalid {
        scheduler: Scheduler,
        var: &'static str,
        value: String,
        why: String,
    },
    /// The job is not set up the way cohort needs (a variable missing,
    /// one launcher per task instead of per node, no token).
    #[error("{scheduler}: {why}")]
    Setup { scheduler: Scheduler, why: String },
}

/// The placement the scheduler variables in `env` describe, checked
/// against what `cohort launch` was `asked`; `None` when not started by a
/// scheduler cohort knows, or as a Kubernetes pod of a single-node job (an
/// Indexed Job of independent runs shares nothing). `etc_hosts` reads the
/// pod's hosts file (Kubernetes writes its DNS name there).
pub fn detect(
    env: &dyn Fn(&str) -> Option<String>,
    etc_hosts: &dyn Fn() -> Option<String>,
    asked: &Asked,
) -> Result<Option<Placement>, SchedError> {
    let found = match slurm::placement(env)? {
        Some(placement) => Some(placement),
        None => kubernetes::placement(env, etc_hosts, asked.nnodes.or(asked.config_nnodes))?,
    };
    found.map(|placement| placement.checked(asked)).transpose()
}

impl Placement {
    /// The placement with `--nnodes` applied, if it agrees with the
    /// scheduler's, and a token where several nodes need one.
    fn checked(mut self, asked: &Asked) -> Result<Self, SchedError> {
        let setup = |why: String| SchedError::Setup {
            scheduler: self.scheduler,
            why,
        };
        let scheduled = self.nnodes;
        let nnodes = asked.nnodes.unwrap_or(scheduled);
        if self.scheduler == Scheduler::Slurm
            && (scheduled.min < nnodes.min || scheduled.max > nnodes.max)
        {
            return Err(setup(format!(
                "the job has {scheduled} node(s), but --nnodes is {nnodes}: leave --nnodes out, or ask Slurm for {nnodes} nodes"
            )));
        }
        if self.node_rank >= nnodes.max {
            return Err(setup(format!(
                "this is node {} (from 0), but --nnodes is {nnodes}: {}",
                self.node_rank,
                match self.scheduler {
                    Scheduler::Kubernetes => "give --nnodes the Job's completions",
                    Scheduler::Slurm => "leave --nnodes out under Slurm",
                }
            )));
        }
        if nnodes.max > 1 && !asked.token_given {
            return Err(setup(format!(
                "the {} nodes of this job must share a job token: {}",
                nnodes.max,
                match self.scheduler {
                    Scheduler::Slurm => {
                        "export COHORT_TOKEN in the batch script before srun, e.g. \
                         export COHORT_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n') \
                         (examples/slurm/cohort.sbatch does)"
                    }
                    Scheduler::Kubernetes => {
                        "set COHORT_TOKEN in every pod from one Secret (examples/kubernetes/ does)"
                    }
                }
            )));
        }
        self.nnodes = nnodes;
        Ok(self)
    }
}

/// The coordinator of a multi-node job, hosted by this launcher on every
/// interface (`hosts`) or joined at `host:port`, and the words for the
/// summary line.
fn hosted_or_joined(hosts: bool, host: &str, port: u16) -> (CoordinatorMode, String) {
    if hosts {
        (
            CoordinatorMode::Bind(format!("0.0.0.0:{port}")),
            format!("hosting the coordinator on {host}:{port}"),
        )
    } else {
        (
            CoordinatorMode::Remote(format!("{host}:{port}")),
            format!("joining the coordinator on {host}:{port}"),
        )
    }
}

/// A variable that must be a number.
fn number<T: std::str::FromStr>(
    scheduler: Scheduler,
    var: &'static str,
    value: &str,
) -> Result<T, SchedError> {
    value.parse().map_err(|_| SchedError::Invalid {
        scheduler,
        var,
        value: value.to_owned(),
        why: "not a number".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(scheduler: Scheduler, nnodes: u32, node_rank: u32) -> Placement {
        Placement {
            scheduler,
            nnodes: NodeRange::exactly(nnodes),
            node_rank,
            coordinator: CoordinatorMode::Remote("first:1".into()),
            job_id: "j".into(),
            summary: String::new(),
        }
    }

    fn asked(nnodes: Option<NodeRange>, token_given: bool) -> Asked {
        Asked {
            nnodes,
            config_nnodes: None,
            token_given,
        }
    }

    #[test]
    fn nnodes_and_the_token_are_checked_against_slurms_job() {
        let slurm = |n, rank| placement(Scheduler::Slurm, n, rank);
        let two = NodeRange::exactly(2);
        assert_eq!(slurm(2, 1).checked(&asked(None, true)).unwrap().nnodes, two);
        assert_eq!(
            slurm(2, 1).checked(&asked(Some(two), true)).unwrap().nnodes,
            two
        );
        let elastic = NodeRange { min: 1, max: 4 };
        assert_eq!(
            slurm(2, 1)
                .checked(&asked(Some(elastic), true))
                .unwrap()
                .nnodes,
            elastic
        );
        let err = slurm(2, 1)
            .checked(&asked(Some(NodeRange::exactly(3)), true))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Slurm: the job has 2 node(s), but --nnodes is 3: leave --nnodes out, or ask Slurm for 3 nodes"
        );
        let err = slurm(2, 1).checked(&asked(None, false)).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "Slurm: the 2 nodes of this job must share a job token: export COHORT_TOKEN in the batch script"
            ),
            "{err}"
        );
        // One node needs no token.
        assert!(slurm(1, 0).checked(&asked(None, false)).is_ok());
    }

    #[test]
    fn a_kubernetes_pod_is_checked_against_nnodes() {
        let pod = |rank| placement(Scheduler::Kubernetes, 2, rank);
        let err = pod(3)
            .checked(&asked(Some(NodeRange::exactly(2)), true))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Kubernetes: this is node 3 (from 0), but --nnodes is 2: give --nnodes the Job's completions"
        );
        let err = pod(1)
            .checked(&asked(Some(NodeRange::exactly(2)), false))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("set COHORT_TOKEN in every pod from one Secret"),
            "{err}"
        );
    }

    #[test]
    fn a_kubernetes_pod_of_a_single_node_job_keeps_to_itself() {
        // Not even a hostname to check: nothing is derived.
        let env = |name: &str| (name == "JOB_COMPLETION_INDEX").then(|| "3".to_owned());
        for nnodes in [None, Some(NodeRange::exactly(1))] {
            assert!(
                detect(&env, &|| None, &asked(nnodes, false))
                    .unwrap()
                    .is_none()
            );
        }
        let config = Asked {
            config_nnodes: Some(NodeRange::exactly(4)),
            ..asked(None, true)
        };
        let err = detect(&env, &|| None, &config).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Kubernetes: HOSTNAME is not set"),
            "{err}"
        );
    }

    #[test]
    fn no_scheduler_no_placement() {
        let none = detect(&|_| None, &|| None, &Asked::default()).unwrap();
        assert!(none.is_none());
    }
}
