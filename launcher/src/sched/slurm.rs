//! Slurm: inside an allocation, `srun --ntasks-per-node=1 cohort launch
//! --nproc-per-node 8 CONFIG` needs nothing else.
//!
//! | what | from |
//! | --- | --- |
//! | nodes | `SLURM_STEP_NUM_NODES` (`SLURM_JOB_NUM_NODES` outside a step) |
//! | this node's rank | `SLURM_NODEID` |
//! | the coordinator | hosted by the first host of `SLURM_STEP_NODELIST` (`SLURM_JOB_NODELIST`), port 20000 + job id mod 10000 |
//! | the job id | `SLURM_JOB_ID` |
//! | the token | `COHORT_TOKEN` (the batch script makes one: examples/slurm/cohort.sbatch) |
//!
//! The step's values come first because `SLURM_NODEID` counts the nodes of
//! the step: for `srun -N1 -r1` in a 2-node job it is 0 on the job's second
//! node. For the usual step over the whole allocation both are the same.
//! The first host knows it is the one from `SLURMD_NODENAME` (`SLURM_NODEID`
//! 0 where that is not set). The port is derived from the job id so two
//! jobs sharing a node don't collide (unless their ids are 10,000 apart),
//! and stays below Linux's ephemeral ports (32768 and up), which outgoing
//! connections take; `--coordinator`/`--coordinator-bind` replace it.
//!
//! Two mistakes are caught before anything starts, on every node: running
//! `cohort launch` in the batch script itself (it runs on the first node
//! only), and srun starting more than one task per node (cohort launch
//! starts `--nproc-per-node` workers itself, as torchrun does).

use super::hostlist::Hostlist;
use super::{Placement, SchedError, Scheduler, hosted_or_joined, number};
use crate::decision::NodeRange;
use crate::launch::CoordinatorMode;

/// The lowest port a Slurm job's coordinator gets; job id mod 10000 is added.
pub const BASE_PORT: u16 = 20000;

/// The placement of this `srun` task, or `None` outside a Slurm job (no
/// `SLURM_JOB_ID` or `SLURM_NODEID`: e.g. a login shell of `salloc`).
pub fn placement(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Placement>, SchedError> {
    let (Some(job_id), Some(node_id)) = (env("SLURM_JOB_ID"), env("SLURM_NODEID")) else {
        return Ok(None);
    };
    let setup = |why: String| SchedError::Setup {
        scheduler: Scheduler::Slurm,
        why,
    };
    let invalid = |var: &'static str, value: &str, why: String| SchedError::Invalid {
        scheduler: Scheduler::Slurm,
        var,
        value: value.to_owned(),
        why,
    };
    let in_step = env("SLURM_STEP_ID")
        .or_else(|| env("SLURM_STEPID"))
        .is_some();
    // The step's variable inside a step, else the job's.
    let pick =
        |step: &'static str, job: &'static str| -> Result<(&'static str, String), SchedError> {
            let from_step = if in_step {
                env(step).map(|v| (step, v))
            } else {
                None
            };
            from_step
                .or_else(|| env(job).map(|v| (job, v)))
                .ok_or_else(|| {
                    setup(format!(
                        "{job} is not set; is this a task of srun inside a job?"
                    ))
                })
        };
    let job: u64 = number(Scheduler::Slurm, "SLURM_JOB_ID", &job_id)?;
    let (nodes_var, nodes) = pick("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES")?;
    let nnodes: u32 = number(Scheduler::Slurm, nodes_var, &nodes)?;
    if nnodes == 0 {
        return Err(invalid(
            nodes_var,
            &nodes,
            "a job has at least one node".to_owned(),
        ));
    }
    let (list_var, list) = pick("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")?;
    let hosts = Hostlist::parse(&list).map_err(|e| invalid(list_var, &list, e.why))?;
    if hosts.count() != u64::from(nnodes) {
        return Err(invalid(
            list_var,
            &list,
            format!(
                "it names {} host(s), but {nodes_var}={nnodes}",
                hosts.count()
            ),
        ));
    }
    let node_rank: u32 = number(Scheduler::Slurm, "SLURM_NODEID", &node_id)?;
    if node_rank >= nnodes {
        return Err(invalid(
            "SLURM_NODEID",
            &node_id,
            format!(
                "a node of {nnodes} ({nodes_var}) is numbered 0..{}",
                nnodes - 1
            ),
        ));
    }
    if nnodes > 1 && !in_step {
        return Err(setup(format!(
            "this is the batch script of job {job}, which runs on the first of its {nnodes} nodes only: \
             start cohort launch on every node with `srun --ntasks-per-node=1 cohort launch ...`"
        )));
    }
    if in_step
        && let Some(tasks) = env("SLURM_STEP_NUM_TASKS").or_else(|| env("SLURM_NTASKS"))
        && number::<u64>(Scheduler::Slurm, "SLURM_STEP_NUM_TASKS", &tasks)? > u64::from(nnodes)
    {
        return Err(setup(format!(
            "srun started {tasks} tasks on {nnodes} node(s), but cohort launch runs once per node \
             and starts --nproc-per-node workers itself: start one task per node, \
             `srun --ntasks={nnodes} --ntasks-per-node=1 cohort launch ...` \
             (srun can't start fewer tasks than the job was submitted with: submit it with --ntasks-per-node=1)"
        )));
    }
    let first = hosts.first();
    let port = BASE_PORT + (job % 10_000) as u16;
    let hosts_it = match env("SLURMD_NODENAME") {
        Some(here) => here == first,
        None => node_rank == 0,
    };
    let (coordinator, role) = if nnodes == 1 {
        (
            CoordinatorMode::Embedded,
            "the coordinator runs in this launcher".to_owned(),
        )
    } else {
        let (mode, role) = hosted_or_joined(hosts_it, &first, port);
        (
            mode,
            format!("{role} (the first host of {list_var}={list})"),
        )
    };
    Ok(Some(Placement {
        scheduler: Scheduler::Slurm,
        nnodes: NodeRange::exactly(nnodes),
        node_rank,
        coordinator,
        job_id: job_id.clone(),
        summary: format!("Slurm job {job_id}: node {node_rank} of {nnodes} (SLURM_NODEID); {role}"),
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    type Vars = HashMap<&'static str, String>;

    fn place(vars: &Vars) -> Result<Option<Placement>, SchedError> {
        placement(&|name| vars.get(name).cloned())
    }

    fn vars(pairs: &[(&'static str, &str)]) -> Vars {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    /// What srun gives node `id` of a step over all nodes of job 1234
    /// (as printed by Slurm 22.05).
    fn step(id: &str, nodename: &str) -> Vars {
        vars(&[
            ("SLURM_JOB_ID", "1234"),
            ("SLURM_JOB_NUM_NODES", "5"),
            ("SLURM_JOB_NODELIST", "gpu[01-04,07]"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NUM_NODES", "5"),
            ("SLURM_STEP_NODELIST", "gpu[01-04,07]"),
            ("SLURM_STEP_NUM_TASKS", "5"),
            ("SLURM_NODEID", id),
            ("SLURM_PROCID", id),
            ("SLURM_LOCALID", "0"),
            ("SLURMD_NODENAME", nodename),
        ])
    }

    /// `vars` with some set (`Some`) or removed (`None`).
    fn with(vars: &Vars, changes: &[(&'static str, Option<&str>)]) -> Vars {
        let mut vars = vars.clone();
        for (k, v) in changes {
            match v {
                Some(v) => vars.insert(k, v.to_string()),
                None => vars.remove(k),
            };
        }
        vars
    }

    #[test]
    fn the_first_host_hosts_the_coordinator_and_the_others_join_it() {
        let first = place(&step("0", "gpu01")).unwrap().unwrap();
        assert_eq!(first.scheduler, Scheduler::Slurm);
        assert_eq!((first.nnodes, first.node_rank), (NodeRange::exactly(5), 0));
        assert!(
            matches!(&first.coordinator, CoordinatorMode::Bind(a) if a == "0.0.0.0:21234"),
            "{first:?}"
        );
        assert_eq!(first.job_id, "1234");
        assert_eq!(
            first.summary,
            "Slurm job 1234: node 0 of 5 (SLURM_NODEID); hosting the coordinator on gpu01:21234 \
             (the first host of SLURM_STEP_NODELIST=gpu[01-04,07])"
        );
        let last = place(&step("4", "gpu07")).unwrap().unwrap();
        assert_eq!(last.node_rank, 4);
        assert!(
            matches!(&last.coordinator, CoordinatorMode::Remote(a) if a == "gpu01:21234"),
            "{last:?}"
        );
        assert_eq!(
            last.summary,
            "Slurm job 1234: node 4 of 5 (SLURM_NODEID); joining the coordinator on gpu01:21234 \
             (the first host of SLURM_STEP_NODELIST=gpu[01-04,07])"
        );
    }

    #[test]
    fn the_port_follows_the_job_id_below_the_ephemeral_range() {
        let vars = step("1", "gpu02");
        for (id, port) in [
            ("1", 20001),
            ("9999", 29999),
            ("10000", 20000),
            ("4294967296", 27296),
        ] {
            let p = place(&with(&vars, &[("SLURM_JOB_ID", Some(id))]))
                .unwrap()
                .unwrap();
            assert!(
                matches!(&p.coordinator, CoordinatorMode::Remote(a) if *a == format!("gpu01:{port}")),
                "{id}: {p:?}"
            );
        }
    }

    #[test]
    fn a_step_on_part_of_the_job_uses_the_steps_nodes() {
        // `srun -N1 -r1` in a 2-node job: the step runs on node02 alone,
        // where SLURM_NODEID is 0 (seen on Slurm 22.05).
        let pairs = [
            ("SLURM_JOB_ID", "7"),
            ("SLURM_JOB_NUM_NODES", "2"),
            ("SLURM_JOB_NODELIST", "node[01-02]"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NUM_NODES", "1"),
            ("SLURM_STEP_NODELIST", "node02"),
            ("SLURM_STEP_NUM_TASKS", "1"),
            ("SLURM_NODEID", "0"),
            ("SLURMD_NODENAME", "node02"),
        ];
        let p = place(&vars(&pairs)).unwrap().unwrap();
        assert_eq!((p.nnodes, p.node_rank), (NodeRange::exactly(1), 0));
        assert!(matches!(p.coordinator, CoordinatorMode::Embedded), "{p:?}");
        assert_eq!(
            p.summary,
            "Slurm job 7: node 0 of 1 (SLURM_NODEID); the coordinator runs in this launcher"
        );
    }

    #[test]
    fn without_slurmd_nodename_node_0_hosts() {
        let vars = step("0", "");
        let p = place(&with(&vars, &[("SLURMD_NODENAME", None)]))
            .unwrap()
            .unwrap();
        assert!(matches!(p.coordinator, CoordinatorMode::Bind(_)), "{p:?}");
        let p = place(&with(&step("2", ""), &[("SLURMD_NODENAME", None)]))
            .unwrap()
            .unwrap();
        assert!(matches!(p.coordinator, CoordinatorMode::Remote(_)), "{p:?}");
    }

    #[test]
    fn the_batch_script_of_a_one_node_job_runs_alone() {
        // sbatch -N1: the batch script has no SLURM_STEP_ID.
        let pairs = [
            ("SLURM_JOB_ID", "8"),
            ("SLURM_JOB_NUM_NODES", "1"),
            ("SLURM_JOB_NODELIST", "cpu3"),
            ("SLURM_NODEID", "0"),
        ];
        let p = place(&vars(&pairs)).unwrap().unwrap();
        assert!(matches!(p.coordinator, CoordinatorMode::Embedded), "{p:?}");
        assert_eq!(p.job_id, "8");
    }

    #[test]
    fn outside_a_job_there_is_no_placement() {
        assert!(place(&Vars::new()).unwrap().is_none());
        // salloc's shell on a login node: a job, but not a task on one of its nodes.
        let salloc = vars(&[("SLURM_JOB_ID", "9"), ("SLURM_JOB_NUM_NODES", "2")]);
        assert!(place(&salloc).unwrap().is_none());
    }

    #[test]
    fn mistakes_are_named_with_what_to_do() {
        let vars = step("1", "gpu02");
        let err = |changes: &[(&'static str, Option<&str>)]| {
            place(&with(&vars, changes)).unwrap_err().to_string()
        };
        // In the batch script of a 5-node job, without srun.
        assert_eq!(
            err(&[("SLURM_STEP_ID", None), ("SLURM_NODEID", Some("0"))]),
            "Slurm: this is the batch script of job 1234, which runs on the first of its 5 nodes only: \
             start cohort launch on every node with `srun --ntasks-per-node=1 cohort launch ...`"
        );
        // srun with one task per GPU, torchrun-less style.
        assert_eq!(
            err(&[("SLURM_STEP_NUM_TASKS", Some("40"))]),
            "Slurm: srun started 40 tasks on 5 node(s), but cohort launch runs once per node \
             and starts --nproc-per-node workers itself: start one task per node, \
             `srun --ntasks=5 --ntasks-per-node=1 cohort launch ...` \
             (srun can't start fewer tasks than the job was submitted with: submit it with --ntasks-per-node=1)"
        );
        assert_eq!(
            err(&[("SLURM_STEP_NODELIST", Some("gpu[01-04]"))]),
            "Slurm: SLURM_STEP_NODELIST=\"gpu[01-04]\": it names 4 host(s), but SLURM_STEP_NUM_NODES=5"
        );
        assert_eq!(
            err(&[("SLURM_STEP_NODELIST", Some("gpu[04-01]"))]),
            "Slurm: SLURM_STEP_NODELIST=\"gpu[04-01]\": the range 04-01 runs backwards"
        );
        assert_eq!(
            err(&[("SLURM_NODEID", Some("5"))]),
            "Slurm: SLURM_NODEID=\"5\": a node of 5 (SLURM_STEP_NUM_NODES) is numbered 0..4"
        );
        assert_eq!(
            err(&[("SLURM_STEP_NUM_NODES", Some("five"))]),
            "Slurm: SLURM_STEP_NUM_NODES=\"five\": not a number"
        );
        assert_eq!(
            err(&[("SLURM_STEP_NODELIST", None), ("SLURM_JOB_NODELIST", None)]),
            "Slurm: SLURM_JOB_NODELIST is not set; is this a task of srun inside a job?"
        );
    }
}
