//! A real Slurm cluster (Debian's slurmctld, slurmd and munge) on network
//! namespaces: the controller on one host, one slurmd per node host, each
//! with its own address and name. `sbatch examples/slurm/cohort.sbatch`
//! runs the quickstart on 2 nodes, each `cohort launch` finding its place
//! from Slurm's environment alone.
//!
//! Skipped (with a message) where network namespaces can't be made; as root
//! the Slurm packages must be installed (scripts/test-deps.sh, which
//! `make test` runs, does it).

mod launch_util;
mod netns;
mod worker_bin;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use launch_util::eventually;
use netns::Net;

/// A Slurm cluster of its own: controller `slurmctl`, nodes `node01`...;
/// every daemon and file goes when it is dropped.
struct Cluster {
    // Dropped first: stops every process on the hosts.
    net: Net,
    daemons: Vec<Child>,
    conf: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// `nodes` slurmd nodes; `None` (after saying why) where namespaces
    /// can't be made.
    fn start(nodes: usize) -> Option<Self> {
        let names: Vec<String> = std::iter::once("slurmctl".to_owned())
            .chain((1..=nodes).map(|i| format!("node{i:02}")))
            .collect();
        let net = Net::with_names(&names)?;
        for daemon in ["slurmctld", "slurmd", "sbatch", "munged"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {daemon}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "{daemon} is not installed: run scripts/test-deps.sh (make test does)"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["munge", "state", "log", "run"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        for name in &names[1..] {
            std::fs::create_dir_all(d.join("spool").join(name)).unwrap();
        }
        let key = d.join("munge.key");
        std::fs::write(&key, rand_bytes(1024)).unwrap();
        set_mode(&key, 0o400);
        // munged wants the way to its socket open to everyone.
        set_mode(d, 0o755);
        set_mode(&d.join("munge"), 0o755);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut conf = format!(
            "ClusterName=cohort-test\n\
             SlurmctldHost=slurmctl({ctl})\n\
             AuthType=auth/munge\n\
             AuthInfo=socket={d}/munge/munge.socket\n\
             CredType=cred/munge\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool/%n\n\
             SlurmctldPidFile={d}/run/slurmctld.pid\n\
             SlurmdPidFile={d}/run/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd-%n.log\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\n\
             SchedulerType=sched/builtin\n\
             SelectType=select/cons_tres\n\
             MpiDefault=none\n\
             ReturnToService=2\n",
            ctl = net.host(0).addr(),
            d = d.display(),
        );
        for host in &net.hosts()[1..] {
            conf.push_str(&format!(
                "NodeName={} NodeAddr={} CPUs={cpus} State=UNKNOWN\n",
                host.name(),
                host.addr()
            ));
        }
        conf.push_str("PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n");
        let conf_path = d.join("slurm.conf");
        std::fs::write(&conf_path, conf).unwrap();
        // slurmd loads a cgroup plugin even when nothing uses it; inside a
        // namespace host /sys is its own, without cgroup mounts, so name
        // the plugin instead of letting slurmd look for one.
        std::fs::write(d.join("cgroup.conf"), "CgroupPlugin=cgroup/v1\n").unwrap();

        let mut cluster = Self {
            net,
            daemons: Vec::new(),
            conf: conf_path,
            dir,
        };
        let d = cluster.dir.path().to_owned();
        let conf = cluster.conf.display().to_string();
        let munged = [
            "-F".to_owned(),
            "--force".to_owned(),
            format!("--socket={}/munge/munge.socket", d.display()),
            format!("--key-file={}", key.display()),
            format!("--pid-file={}/munge/munged.pid", d.display()),
            format!("--log-file={}/log/munged.log", d.display()),
            format!("--seed-file={}/munge/seed", d.display()),
        ];
        cluster.daemon(0, "munged", &munged);
        assert!(
            eventually(Duration::from_secs(30), || d
                .join("munge/munge.socket")
                .exists()),
            "munged did not start:\n{}",
            cluster.logs()
        );
        cluster.daemon(0, "slurmctld", &["-D".into(), "-f".into(), conf.clone()]);
        for i in 1..=nodes {
            let name = cluster.net.host(i).name().to_owned();
            cluster.daemon(
                i,
                "slurmd",
                &["-D".into(), "-f".into(), conf.clone(), "-N".into(), name],
            );
        }
        let all_idle = || {
            let out = cluster
                .client("sinfo", &["-h", "-N", "-o", "%T"])
                .output()
                .unwrap();
            let states = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success()
                && states.lines().count() == nodes
                && states.lines().all(|s| s == "idle")
        };
        assert!(
            eventually(Duration::from_secs(60), all_idle),
            "the Slurm nodes did not come up:\n{}",
            cluster.logs()
        );
        Some(cluster)
    }

    /// Starts `program args` on host `i`, its output in the log directory.
    fn daemon(&mut self, i: usize, program: &str, args: &[String]) {
        let host = self.net.host(i);
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("log/{program}-{}.out", host.name())),
        )
        .unwrap();
        let child = host
            .command(program, args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.daemons.push(child);
    }

    /// A Slurm client command (sbatch, sinfo, ...) run on the controller's host.
    fn client(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = self.net.host(0).command(program, args);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    /// Every log of the cluster, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("log"))
            .map(|dir| dir.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("== {}\n", file.display()));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn rand_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = vec![0; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes
}

#[test]
fn sbatch_runs_the_quickstart_on_two_nodes() {
    let Some(cluster) = Cluster::start(2) else {
        return;
    };
    worker_bin::ensure();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = cluster.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let chdir = format!("--chdir={}", work.display());
    let output = format!("--output={}/job-%j.out", work.display());
    let config = repo.join("configs/quickstart.toml").display().to_string();
    let data = format!("data.path={}", repo.join("configs/data/tiny.txt").display());
    let script = repo
        .join("examples/slurm/cohort.sbatch")
        .display()
        .to_string();
    let mut sbatch = cluster.client(
        "sbatch",
        &[
            "--wait",
            &chdir,
            &output,
            &script,
            &config,
            "--set",
            &data,
            "--set",
            "train.max_steps=6",
            "--set",
            "train.eval_every=0",
        ],
    );
    sbatch
        .env("COHORT", env!("CARGO_BIN_EXE_cohort"))
        .env("RUST_LOG", "warn")
        .env_remove("COHORT_TOKEN");
    let (status, out, err) = launch_util::run(sbatch, Duration::from_secs(240));
    let job_output = || {
        std::fs::read_dir(&work)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("job-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    };
    let job = job_output();
    assert!(
        status.success(),
        "sbatch --wait: {status}\n{out}{err}\njob output:\n{job}\n{}",
        cluster.logs()
    );
    let id = out
        .trim()
        .strip_prefix("Submitted batch job ")
        .unwrap_or_else(|| panic!("no job id in {out:?}"));
    for line in [
        format!(
            "[cohort] Slurm job {id}: node 0 of 2 (SLURM_NODEID); hosting the coordinator on node01:{port} \
             (the first host of SLURM_STEP_NODELIST=node[01-02])",
            port = 20000 + id.parse::<u32>().unwrap() % 10000
        ),
        format!(
            "[cohort] Slurm job {id}: node 1 of 2 (SLURM_NODEID); joining the coordinator on node01:"
        ),
        "generation 0 formed: 2 node(s), 4 ranks".to_owned(),
        "[rank 0] done: 6 steps".to_owned(),
        "job succeeded: all 4 ranks of generation 0 exited 0".to_owned(),
    ] {
        assert!(
            job.contains(&line),
            "no {line:?} in the job's output:\n{job}"
        );
    }
    // The job id is Slurm's: the logs are under cohort-logs/<job id>/.
    assert!(work.join("cohort-logs").join(id).is_dir(), "{job}");
}
