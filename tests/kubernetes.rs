//! The Kubernetes examples (examples/kubernetes/): the fields cohort relies
//! on, cohort's placement derived from every pod's environment as
//! Kubernetes gives it, and the Indexed Job run for real on network
//! namespace hosts named as its pods (skipped where namespaces can't be made).

mod launch_util;
mod netns;
mod worker_bin;

use std::path::Path;
use std::time::Duration;

use cohort_launcher::sched::{self, kubernetes::PORT};
use cohort_launcher::{CoordinatorMode, NodeRange};
use launch_util::{FAST, Proc};
use serde_yaml::Value;

/// The namespace the pods are imagined in (the examples name none).
const NAMESPACE: &str = "default";

/// The YAML documents of an example.
fn manifests(name: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/kubernetes")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

/// The value at a dotted path (`spec.template.spec`); fails naming it.
fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(value, |v, key| {
        match key.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(key),
        }
        .unwrap_or_else(|| panic!("no {path} (at {key}) in {value:?}"))
    })
}

fn text<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

fn number(value: &Value, path: &str) -> u64 {
    at(value, path)
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not a number"))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| text(d, "kind") == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// What the pods of `job` (a batch/v1 Job spec) must hold for cohort:
/// Indexed, as many pods at once as completions, a container whose command
/// is `cohort launch --nnodes <completions>`, the coordinator's port, the
/// token from a Secret, and no hostname of their own (pod 0's name is
/// derived from the default one). Returns the node count and the command.
fn check_job(job: &Value) -> (u32, Vec<String>) {
    assert_eq!(text(job, "completionMode"), "Indexed");
    let n = number(job, "completions");
    assert_eq!(number(job, "parallelism"), n, "every pod must run at once");
    let pod = at(job, "template.spec");
    assert!(
        pod.get("hostname").is_none(),
        "a pod hostname of its own hides <job>-<index>"
    );
    let container = at(pod, "containers.0");
    let command: Vec<String> = at(container, "command")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .expect("command arguments are strings")
                .to_owned()
        })
        .collect();
    assert_eq!(command[..2], ["cohort", "launch"]);
    let nnodes = command
        .iter()
        .position(|a| a == "--nnodes")
        .expect("--nnodes");
    assert_eq!(
        command[nnodes + 1],
        n.to_string(),
        "--nnodes must equal completions"
    );
    assert_eq!(number(container, "ports.0.containerPort"), u64::from(PORT));
    let env = at(container, "env").as_sequence().unwrap();
    let token = env
        .iter()
        .find(|e| text(e, "name") == "COHORT_TOKEN")
        .expect("COHORT_TOKEN");
    assert!(
        token
            .get("valueFrom")
            .and_then(|v| v.get("secretKeyRef"))
            .is_some(),
        "COHORT_TOKEN must come from a Secret"
    );
    (u32::try_from(n).unwrap(), command)
}

/// The kubelet's hosts file of a pod named `hostname` under `subdomain`.
fn kubelet_hosts(hostname: &str, subdomain: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n10.1.0.9\t{hostname}.{subdomain}.{NAMESPACE}.svc.cluster.local\t{hostname}\n"
    )
}

/// cohort's placement on each of `n` pods named `<prefix>-<i>`: pod 0
/// hosts the coordinator, the others join it at pod 0's DNS name.
fn check_placements(prefix: &str, subdomain: &str, n: u32) {
    let pod0 = format!("{prefix}-0.{subdomain}.{NAMESPACE}.svc.cluster.local:{PORT}");
    for i in 0..n {
        let hostname = format!("{prefix}-{i}");
        let index = i.to_string();
        let env = |name: &str| match name {
            "JOB_COMPLETION_INDEX" => Some(index.clone()),
            "HOSTNAME" => Some(hostname.clone()),
            _ => None,
        };
        let asked = sched::Asked {
            nnodes: Some(NodeRange::exactly(n)),
            config_nnodes: None,
            token_given: true,
        };
        let placement = sched::detect(&env, &|| Some(kubelet_hosts(&hostname, subdomain)), &asked)
            .unwrap()
            .expect("a pod of an Indexed Job of several pods has a placement");
        assert_eq!(placement.node_rank, i);
        match (i, &placement.coordinator) {
            (0, CoordinatorMode::Bind(addr)) => assert_eq!(addr, &format!("0.0.0.0:{PORT}")),
            (_, CoordinatorMode::Remote(addr)) if i > 0 => assert_eq!(addr, &pod0),
            (_, other) => panic!("pod {i}: coordinator {other:?}"),
        }
    }
}

#[test]
fn the_indexed_job_gives_cohort_what_it_needs() {
    let docs = manifests("indexed-job.yaml");
    let service = of_kind(&docs, "Service");
    let job = of_kind(&docs, "Job");
    let name = text(job, "metadata.name");
    assert_eq!(
        text(service, "spec.clusterIP"),
        "None",
        "the Service must be headless"
    );
    assert_eq!(
        at(service, "spec.publishNotReadyAddresses").as_bool(),
        Some(true)
    );
    assert_eq!(
        text(service, "spec.selector.job-name"),
        name,
        "the Service must select the Job's pods"
    );
    assert_eq!(number(service, "spec.ports.0.port"), u64::from(PORT));
    let subdomain = text(job, "spec.template.spec.subdomain");
    assert_eq!(
        subdomain,
        text(service, "metadata.name"),
        "the pods' subdomain must be the Service"
    );
    let (n, _) = check_job(at(job, "spec"));
    check_placements(name, subdomain, n);
}

#[test]
fn the_jobset_gives_cohort_what_it_needs() {
    let docs = manifests("jobset.yaml");
    let set = of_kind(&docs, "JobSet");
    let name = text(set, "metadata.name");
    let network = at(set, "spec.network");
    assert_eq!(at(network, "enableDNSHostnames").as_bool(), Some(true));
    assert_eq!(
        at(network, "publishNotReadyAddresses").as_bool(),
        Some(true)
    );
    // JobSet's default subdomain is its name.
    let subdomain = network
        .get("subdomain")
        .and_then(Value::as_str)
        .unwrap_or(name);
    let jobs = at(set, "spec.replicatedJobs").as_sequence().unwrap();
    assert_eq!(jobs.len(), 1, "one replicated Job is one cohort job");
    assert_eq!(
        number(&jobs[0], "replicas"),
        1,
        "one replica is one cohort job"
    );
    let (n, _) = check_job(at(&jobs[0], "template.spec"));
    // JobSet names pods <jobset>-<replicated job>-<job index>-<pod index>.
    check_placements(
        &format!("{name}-{}-0", text(&jobs[0], "name")),
        subdomain,
        n,
    );
}

/// The Indexed Job's pods as network namespace hosts with the pods' names
/// and hosts files, each running the container's command with the pod's
/// environment (the quickstart cut to 6 steps).
#[test]
fn the_indexed_job_runs_on_hosts_named_as_its_pods() {
    let docs = manifests("indexed-job.yaml");
    let job = of_kind(&docs, "Job");
    let name = text(job, "metadata.name");
    let subdomain = text(job, "spec.template.spec.subdomain");
    let (n, command) = check_job(at(job, "spec"));
    let pods: Vec<String> = (0..n)
        .map(|i| format!("{name}-{i}.{subdomain}.{NAMESPACE}.svc.cluster.local"))
        .collect();
    let Some(net) = netns::Net::with_names(&pods) else {
        return;
    };
    worker_bin::ensure();
    // The image's working directory: the repository's configs.
    let work = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::os::unix::fs::symlink(repo.join("configs"), work.path().join("configs")).unwrap();
    let mut launchers: Vec<Proc> = net
        .hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let mut cmd = launch_util::cohort();
            cmd.current_dir(work.path())
                .args(&command[1..])
                .args(FAST)
                .args(["--set", "train.max_steps=6", "--set", "train.eval_every=0"])
                .env("JOB_COMPLETION_INDEX", i.to_string())
                .env("HOSTNAME", host.hostname())
                .env("COHORT_TOKEN", "from-the-secret");
            Proc::spawn(host.inside(cmd))
        })
        .collect();
    let limit = Duration::from_secs(180);
    let statuses: Vec<_> = launchers.iter_mut().map(|p| p.wait(limit)).collect();
    let report = || {
        launchers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("pod {i} ({}):\n{}{}", statuses[i], p.out, p.err))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(statuses.iter().all(|s| s.success()), "{}", report());
    let pod0 = &launchers[0].err;
    for line in [
        format!(
            "[cohort] Kubernetes job {name}: node 0 (JOB_COMPLETION_INDEX); hosting the coordinator on {}:{PORT}",
            pods[0]
        ),
        "generation 0 formed: 2 node(s), 4 ranks".to_owned(),
        "job succeeded: all 4 ranks of generation 0 exited 0".to_owned(),
    ] {
        assert!(pod0.contains(&line), "no {line:?}:\n{}", report());
    }
    assert!(
        launchers[1].err.contains(&format!(
            "node 1 (JOB_COMPLETION_INDEX); joining the coordinator on {}:{PORT}",
            pods[0]
        )),
        "{}",
        report()
    );
}

/// A pod that starts before pod 0's name resolves (a headless Service's
/// names appear only once its pods are up) keeps dialling pod 0 for the
/// whole rendezvous timeout (not the shorter connect retry), says so every
/// 5 s, and then gives up naming pod 0. Pod 1 alone, on a namespace host
/// named as its pod, where pod 0's name resolves nowhere.
#[test]
fn a_pod_keeps_dialling_pod_0_until_the_rendezvous_timeout() {
    let pod1 = format!("late-1.late.{NAMESPACE}.svc.cluster.local");
    let Some(net) = netns::Net::with_names(&[&pod1]) else {
        return;
    };
    let host = net.host(0);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = launch_util::cohort();
    cmd.current_dir(dir.path())
        .args(["launch", "--nnodes", "2"])
        // FAST gives up connecting after 3 s; a pod waits for the rendezvous.
        .args(FAST)
        .args(["--rendezvous-timeout", "8", "--log-dir"])
        .arg(dir.path().join("logs"))
        .args(["--", "true"])
        .env("JOB_COMPLETION_INDEX", "1")
        .env("HOSTNAME", host.hostname())
        .env("COHORT_TOKEN", "from-the-secret");
    let started = std::time::Instant::now();
    let (status, _, err) = launch_util::run(host.inside(cmd), Duration::from_secs(60));
    let took = started.elapsed();
    let pod0 = format!("late-0.late.{NAMESPACE}.svc.cluster.local:{PORT}");
    assert_eq!(status.code(), Some(1), "{err}");
    for line in [
        format!("node 1 (JOB_COMPLETION_INDEX); joining the coordinator on {pod0}"),
        format!(
            "[cohort] still connecting to the coordinator at {pod0} (giving up after 8s): 5s so far"
        ),
        format!("could not reach the coordinator at {pod0}"),
        format!(
            "[cohort] {pod0} is pod 0's coordinator: its name resolves once pod 0 runs and the pod \
             template's subdomain names a headless Service"
        ),
        "--rendezvous-timeout (here 8s)".to_owned(),
    ] {
        assert!(err.contains(&line), "no {line:?} in:\n{err}");
    }
    assert!(
        took >= Duration::from_millis(7500) && took < Duration::from_secs(20),
        "gave up after {took:?}, not about 8 s:\n{err}"
    );
}
