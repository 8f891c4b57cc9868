//! Kubernetes: every pod of an Indexed Job (or of a JobSet's replicated
//! Job) runs the same `cohort launch --nnodes N ...`; the pod's index makes
//! it node N, and pod 0 hosts the coordinator at its stable DNS name.
//!
//! | what | from |
//! | --- | --- |
//! | this node's rank | `JOB_COMPLETION_INDEX` |
//! | nodes | `--nnodes` (the Job's `completions`; Kubernetes doesn't tell the pods) |
//! | the coordinator | pod 0, port 29400: `<job>-0.<subdomain>` |
//! | the job id | the Job's name (`<job>` below) |
//! | the token | `COHORT_TOKEN` (from a Secret) |
//!
//! An Indexed Job names its pods' hosts `<job>-<index>` (a JobSet
//! `<jobset>-<replicated job>-<job index>-<index>`), so pod 0's name is this
//! pod's `HOSTNAME` with its index replaced by 0. The name resolves in the
//! cluster when the pod template's `subdomain` is a headless Service that
//! selects the pods: `<job>-0.<subdomain>`. The subdomain comes from
//! `COHORT_K8S_SUBDOMAIN` if set, else from the pod's hosts file, where the
//! kubelet writes the pod's full name (`<job>-1.<subdomain>.<namespace>.svc.<cluster domain>`).
//! A pod of a single-node job (`--nnodes` 1 or unset: an Indexed Job of
//! independent runs) derives nothing.

use super::{Placement, SchedError, Scheduler, hosted_or_joined, number};
use crate::decision::NodeRange;

/// The port pod 0's coordinator listens on (torchrun's rendezvous port;
/// each pod has its own network namespace, so it is free).
pub const PORT: u16 = 29400;

/// The placement of this pod in a job of `nnodes` (`--nnodes`, else the
/// config's), or `None` when it is not a pod of an Indexed Job (no
/// `JOB_COMPLETION_INDEX`) or the job has one node.
pub fn placement(
    env: &dyn Fn(&str) -> Option<String>,
    etc_hosts: &dyn Fn() -> Option<String>,
    nnodes: Option<NodeRange>,
) -> Result<Option<Placement>, SchedError> {
    let Some(index) = env("JOB_COMPLETION_INDEX") else {
        return Ok(None);
    };
    let Some(nnodes) = nnodes.filter(|n| n.max > 1) else {
        return Ok(None);
    };
    let node_rank: u32 = number(Scheduler::Kubernetes, "JOB_COMPLETION_INDEX", &index)?;
    let setup = |why: String| SchedError::Setup {
        scheduler: Scheduler::Kubernetes,
        why,
    };
    let hostname = env("HOSTNAME").ok_or_else(|| {
        setup(
            "HOSTNAME is not set: cohort takes pod 0's name from this pod's (<job>-<index>)"
                .to_owned(),
        )
    })?;
    let job = hostname
        .strip_suffix(&format!("-{node_rank}"))
        .filter(|job| !job.is_empty())
        .ok_or_else(|| SchedError::Invalid {
            scheduler: Scheduler::Kubernetes,
            var: "HOSTNAME",
            value: hostname.clone(),
            why: format!(
                "it does not end in -{node_rank} (JOB_COMPLETION_INDEX): cohort expects a pod of an \
                 Indexed Job, whose hostname is <job>-<index> (don't set the pod's hostname)"
            ),
        })?;
    let pod0 = format!("{job}-0");
    let domain = match env("COHORT_K8S_SUBDOMAIN") {
        Some(subdomain) => subdomain,
        None => etc_hosts()
            .and_then(|hosts| domain_of(&hosts, &hostname))
            .ok_or_else(|| {
                setup(format!(
                    "pod 0 ({pod0}) has no DNS name: give the pod template a subdomain naming a \
                     headless Service that selects the Job's pods (examples/kubernetes/), \
                     or set COHORT_K8S_SUBDOMAIN to that Service's name"
                ))
            })?,
    };
    let (coordinator, role) = hosted_or_joined(node_rank == 0, &format!("{pod0}.{domain}"), PORT);
    Ok(Some(Placement {
        scheduler: Scheduler::Kubernetes,
        nnodes,
        node_rank,
        coordinator,
        job_id: job.to_owned(),
        summary: format!("Kubernetes job {job}: node {node_rank} (JOB_COMPLETION_INDEX); {role}"),
    }))
}

/// The domain after `hostname` in the pod's hosts file: the kubelet writes
/// `10.1.2.3  <hostname>.<subdomain>.<namespace>.svc.cluster.local  <hostname>`
/// when the pod has a subdomain.
fn domain_of(etc_hosts: &str, hostname: &str) -> Option<String> {
    etc_hosts
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .flat_map(|line| line.split_whitespace().skip(1))
        .find_map(|name| {
            name.strip_prefix(hostname)?
                .strip_prefix('.')
                .filter(|d| !d.is_empty())
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::launch::CoordinatorMode;

    /// A kubelet-managed hosts file of pod `host` in namespace `ml`.
    fn kubelet_hosts(host: &str, subdomain: &str) -> String {
        format!(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n10.244.1.7\t{host}.{subdomain}.ml.svc.cluster.local\t{host}\n"
        )
    }

    fn place(
        vars: &[(&str, &str)],
        hosts: Option<String>,
    ) -> Result<Option<Placement>, SchedError> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        placement(
            &|name| env.get(name).cloned(),
            &|| hosts.clone(),
            Some(NodeRange::exactly(16)),
        )
    }

    #[test]
    fn pod_0_hosts_the_coordinator_and_the_others_join_it_by_its_dns_name() {
        let hosts = kubelet_hosts("cohort-quickstart-0", "cohort-quickstart");
        let vars = [
            ("JOB_COMPLETION_INDEX", "0"),
            ("HOSTNAME", "cohort-quickstart-0"),
        ];
        let p = place(&vars, Some(hosts)).unwrap().unwrap();
        assert_eq!(
            (p.scheduler, p.nnodes, p.node_rank),
            (Scheduler::Kubernetes, NodeRange::exactly(16), 0)
        );
        assert!(
            matches!(&p.coordinator, CoordinatorMode::Bind(a) if a == "0.0.0.0:29400"),
            "{p:?}"
        );
        assert_eq!(p.job_id, "cohort-quickstart");
        assert_eq!(
            p.summary,
            "Kubernetes job cohort-quickstart: node 0 (JOB_COMPLETION_INDEX); hosting the coordinator on \
             cohort-quickstart-0.cohort-quickstart.ml.svc.cluster.local:29400"
        );

        let hosts = kubelet_hosts("cohort-quickstart-11", "cohort-quickstart");
        let vars = [
            ("JOB_COMPLETION_INDEX", "11"),
            ("HOSTNAME", "cohort-quickstart-11"),
        ];
        let p = place(&vars, Some(hosts)).unwrap().unwrap();
        assert_eq!(p.node_rank, 11);
        assert!(
            matches!(&p.coordinator, CoordinatorMode::Remote(a)
                if a == "cohort-quickstart-0.cohort-quickstart.ml.svc.cluster.local:29400"),
            "{p:?}"
        );
    }

    #[test]
    fn a_jobset_pod_finds_pod_0_of_its_job() {
        // JobSet "train", replicated Job "workers", Job 0, pod 3; subdomain
        // defaults to the JobSet's name.
        let hosts = kubelet_hosts("train-workers-0-3", "train");
        let vars = [
            ("JOB_COMPLETION_INDEX", "3"),
            ("HOSTNAME", "train-workers-0-3"),
        ];
        let p = place(&vars, Some(hosts)).unwrap().unwrap();
        assert!(
            matches!(&p.coordinator, CoordinatorMode::Remote(a)
                if a == "train-workers-0-0.train.ml.svc.cluster.local:29400"),
            "{p:?}"
        );
        assert_eq!(p.job_id, "train-workers-0");
    }

    #[test]
    fn the_subdomain_can_be_given() {
        let vars = [
            ("JOB_COMPLETION_INDEX", "1"),
            ("HOSTNAME", "job-1"),
            ("COHORT_K8S_SUBDOMAIN", "svc"),
        ];
        let p = place(&vars, None).unwrap().unwrap();
        assert!(
            matches!(&p.coordinator, CoordinatorMode::Remote(a) if a == "job-0.svc:29400"),
            "{p:?}"
        );
    }

    #[test]
    fn mistakes_are_named_with_what_to_do() {
        let err = |vars: &[(&str, &str)], hosts: Option<String>| {
            place(vars, hosts).unwrap_err().to_string()
        };
        assert_eq!(
            err(
                &[("JOB_COMPLETION_INDEX", "1"), ("HOSTNAME", "job-1")],
                Some("127.0.0.1 localhost\n".into())
            ),
            "Kubernetes: pod 0 (job-0) has no DNS name: give the pod template a subdomain naming a headless \
             Service that selects the Job's pods (examples/kubernetes/), or set COHORT_K8S_SUBDOMAIN to that \
             Service's name"
        );
        assert_eq!(
            err(
                &[("JOB_COMPLETION_INDEX", "2"), ("HOSTNAME", "trainer")],
                None
            ),
            "Kubernetes: HOSTNAME=\"trainer\": it does not end in -2 (JOB_COMPLETION_INDEX): cohort expects a \
             pod of an Indexed Job, whose hostname is <job>-<index> (don't set the pod's hostname)"
        );
        assert_eq!(
            err(&[("JOB_COMPLETION_INDEX", "x")], None),
            "Kubernetes: JOB_COMPLETION_INDEX=\"x\": not a number"
        );
        assert_eq!(
            err(&[("JOB_COMPLETION_INDEX", "0")], None),
            "Kubernetes: HOSTNAME is not set: cohort takes pod 0's name from this pod's (<job>-<index>)"
        );
    }

    #[test]
    fn not_a_pod_of_an_indexed_job() {
        assert!(place(&[("HOSTNAME", "web-5d8f")], None).unwrap().is_none());
    }

    #[test]
    fn the_domain_is_read_from_the_hosts_file() {
        let hosts = "# comment job-1.evil\n10.0.0.1 job-10.s.ns.svc.cluster.local job-10\n\
                     10.0.0.2 job-1.s.ns.svc.cluster.local job-1 # here\n";
        assert_eq!(
            domain_of(hosts, "job-1").as_deref(),
            Some("s.ns.svc.cluster.local")
        );
        assert_eq!(domain_of(hosts, "job-2"), None);
    }
}
