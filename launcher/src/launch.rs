//! `cohort launch` and `cohort coordinator` as library calls: option
//! structs, then one blocking function each that returns the process exit code.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1::{EventKind, JobOutcome, WatchEventsRequest};
use tokio::signal::unix::{SignalKind, signal};

use crate::LauncherError;
use crate::agent::{AgentConfig, AgentOutcome, WorkerCommand, run_agent};
use crate::auth::generate_token;
use crate::client::connect;
use crate::console::Console;
use crate::coordinator::{CoordinatorConfig, RunningCoordinator, generate_job_id};
use crate::decision::NodeRange;

/// Where the coordinator is.
#[derive(Clone, Debug)]
pub enum CoordinatorMode {
    /// Start one in this process on 127.0.0.1, any free port (single host).
    Embedded,
    /// Start one in this process on HOST:PORT, for other nodes to join.
    Bind(String),
    /// Join the one at HOST:PORT.
    Remote(String),
}

/// The clock of the launcher. Tests shorten it to run in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Between two heartbeats of a node agent (also the status-file poll).
    pub heartbeat_interval: Duration,
    /// A node silent for this long is lost; a coordinator silent for this
    /// long is given up on.
    pub heartbeat_timeout: Duration,
    /// Between the stop signal and SIGKILL.
    pub grace_period: Duration,
    /// How long to retry reaching the coordinator at start.
    pub connect_retry: Duration,
    /// With `--nnodes MIN:MAX`: how long to wait for more nodes once MIN joined.
    pub last_call: Duration,
    /// How long a node waits for a generation to form before giving up
    /// (torchrun's rendezvous timeout).
    pub rendezvous_timeout: Duration,
    /// `--coordinator-grace`: how long a node's workers keep running, and
    /// its calls are retried, while the coordinator does not answer.
    pub coordinator_grace: Duration,
    /// `--replacement-timeout`: with fewer nodes left than `--nnodes` needs,
    /// how long the job waits for new ones.
    pub replacement_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(15),
            grace_period: Duration::from_secs(5),
            connect_retry: Duration::from_secs(30),
            last_call: Duration::from_secs(10),
            rendezvous_timeout: Duration::from_secs(900),
            coordinator_grace: Duration::from_secs(60),
            replacement_timeout: Duration::from_secs(300),
        }
    }
}

/// Everything `cohort launch` was asked to do.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub nnodes: NodeRange,
    pub nproc_per_node: u32,
    /// `--node-rank`: this node's rank, fixed (static ranks); `None`: the
    /// coordinator's choice, kept across generations.
    pub node_rank: Option<u32>,
    /// `--role`: the workers' ROLE_NAME.
    pub role: String,
    /// `--local-ranks-filter`: the local ranks whose output is shown.
    pub local_ranks_filter: Option<Vec<u32>>,
    pub coordinator: CoordinatorMode,
    pub max_restarts: u32,
    pub hang_timeout: Duration,
    pub log_dir: PathBuf,
    pub job_id: Option<String>,
    pub token: Option<String>,
    pub command: WorkerCommand,
    pub timing: Timing,
    /// The address other nodes reach this host at (`COHORT_HOST` in the
    /// launcher's environment); `None` picks one (see `host_for`).
    pub host: Option<String>,
    /// What the launcher's environment sets of the variables cohort sets
    /// only where the user did not.
    pub user_set: cohort_contract::UserSet,
}

fn runtime() -> Result<tokio::runtime::Runtime, LauncherError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(LauncherError::Runtime)
}

/// The address other nodes reach this host at: `host` (`COHORT_HOST`) if
/// given, 127.0.0.1 for a coordinator on this host, else the local address
/// of the route to the coordinator (`None`: of the default route, for a
/// coordinator bound to every interface).
fn host_for(host: Option<&str>, coordinator: Option<&str>) -> String {
    if let Some(host) = host {
        return host.to_owned();
    }
    // Connecting a UDP socket sends nothing: it only picks the route.
    let probe = match coordinator {
        Some(addr) => addr.to_socket_addrs().ok().and_then(|mut a| a.next()),
        None => Some(SocketAddr::from(([203, 0, 113, 1], 9))),
    };
    let local = probe.filter(|a| !a.ip().is_loopback()).and_then(|target| {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
        socket.connect(target).ok()?;
        socket.local_addr().ok()
    });
    local.map_or_else(|| Ipv4Addr::LOCALHOST.to_string(), |a| a.ip().to_string())
}

fn node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Prints the job's events (progress, generations, failures) until aborted;
/// a stream the coordinator dropped (it restarted) is opened again.
async fn watch(
    addr: String,
    token: String,
    job_id: String,
    console: Arc<Console>,
    retry_for: Duration,
) {
    loop {
        if let Ok(mut client) = connect(&addr, &token, retry_for).await
            && let Ok(response) = client
                .watch_events(WatchEventsRequest {
                    job_id: job_id.clone(),
                })
                .await
        {
            let mut stream = response.into_inner();
            while let Ok(Some(event)) = stream.message().await {
                if event.kind == EventKind::Finished as i32 {
                    return;
                }
                console.event(&event);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prints the outcome; returns the exit code.
fn report(console: &Console, outcome: &JobOutcome) -> i32 {
    console.finish();
    console.err(&format!("[cohort] {}", outcome.summary));
    if outcome.success {
        return 0;
    }
    if let Some(cause) = &outcome.root_cause {
        let who = match cause.rank {
            Some(rank) => format!("rank {rank} on node {}", cause.node_id),
            None => format!("node {}", cause.node_id),
        };
        console.err(&format!(
            "[cohort] root cause: {who} (node rank {}, host {}), generation {}: {}",
            cause.node_rank, cause.host, cause.generation, cause.reason
        ));
        if let Some(error) = &cause.error {
            console.err(&format!(
                "[cohort] error file: {} (recorded {}, the job's earliest)",
                error.path,
                crate::errorfile::utc(error.timestamp)
            ));
            if !error.traceback.is_empty() {
                console.err("[cohort] traceback:");
                for line in error.traceback.lines() {
                    console.err(&format!("    {line}"));
                }
            }
        }
        if !cause.log_path.is_empty() {
            console.err(&format!("[cohort] log: {}", cause.log_path));
        }
        // A permanent failure's error was shown as it happened: its
        // output is not repeated (unless it ran on another node).
        let error_shown = cause.permanent
            && cause.log_tail.last().is_some_and(|line| {
                line.split_once("] ")
                    .is_some_and(|(_, text)| console.error_shown(text))
            });
        if !cause.log_tail.is_empty() && !error_shown {
            console.err("[cohort] last lines of its output:");
            for line in &cause.log_tail {
                console.err(&format!("    {line}"));
            }
        }
    }
    match &outcome.root_cause {
        Some(cause) if cause.permanent => 2,
        _ => 1,
    }
}

/// Runs `cohort launch`; returns the exit code (0: every worker of the final
/// generation exited 0; 1: the job failed; 2: a worker failed on the job's
/// configuration or input, `cohort_contract::exit::PERMANENT_FAILURE`, and
/// the job was not restarted; 128+signal: interrupted).
pub fn launch(options: LaunchOptions) -> Result<i32, LauncherError> {
    if options.nproc_per_node == 0 {
        return Err(LauncherError::Usage(
            "--nproc-per-node must be at least 1".to_owned(),
        ));
    }
    if matches!(options.coordinator, CoordinatorMode::Embedded) && options.nnodes.min > 1 {
        return Err(LauncherError::Usage(format!(
            "--nnodes {} needs a coordinator every node can reach: pass --coordinator-bind HOST:PORT \
             on the first node and --coordinator HOST:PORT on the others",
            options.nnodes
        )));
    }
    let (token, generated) = match (&options.token, &options.coordinator) {
        (Some(t), _) => (t.clone(), false),
        (None, CoordinatorMode::Remote(addr)) => {
            return Err(LauncherError::Usage(format!(
                "joining the coordinator at {addr} needs its job token: pass --token or set COHORT_TOKEN"
            )));
        }
        (None, _) => (generate_token(), true),
    };
    std::fs::create_dir_all(&options.log_dir).map_err(|source| LauncherError::Io {
        path: options.log_dir.clone(),
        source,
    })?;
    let log_dir = std::path::absolute(&options.log_dir).map_err(|source| LauncherError::Io {
        path: options.log_dir.clone(),
        source,
    })?;
    let console = Arc::new(Console::new());
    if let Err(why) = crate::reaper::start(None) {
        console.err(&format!(
            "[cohort] warning: {why}; if this launcher is killed, programs its workers \
             started may outlive it"
        ));
    }
    let timing = options.timing;
    runtime()?.block_on(async move {
        let (hosted, addr, host) = match &options.coordinator {
            CoordinatorMode::Remote(addr) => (
                None,
                addr.clone(),
                host_for(options.host.as_deref(), Some(addr)),
            ),
            CoordinatorMode::Embedded | CoordinatorMode::Bind(_) => {
                let bind = match &options.coordinator {
                    CoordinatorMode::Bind(addr) => addr.as_str(),
                    _ => "127.0.0.1:0",
                };
                let config = CoordinatorConfig {
                    job_id: Some(options.job_id.clone().unwrap_or_else(generate_job_id)),
                    nnodes: Some(options.nnodes),
                    max_restarts: Some(options.max_restarts),
                    token: token.clone(),
                    state_dir: None,
                    heartbeat_timeout: timing.heartbeat_timeout,
                    last_call: timing.last_call,
                    tick: (timing.heartbeat_interval / 4).max(Duration::from_millis(10)),
                    replacement_timeout: timing.replacement_timeout,
                };
                let running = RunningCoordinator::start(bind, config).await?;
                let ip = running.addr().ip();
                if let CoordinatorMode::Bind(_) = options.coordinator {
                    console.err(&format!("[cohort] coordinator listening on {}", running.addr()));
                    if generated {
                        console.err(&format!(
                            "[cohort] job token: {token} (give it to the other nodes with --token or COHORT_TOKEN)"
                        ));
                    }
                }
                let host = if ip.is_unspecified() {
                    host_for(options.host.as_deref(), None)
                } else {
                    ip.to_string()
                };
                let addr = local_dial_address(running.addr());
                (Some(running), addr, host)
            }
        };
        let agent = AgentConfig {
            coordinator: addr.clone(),
            token: token.clone(),
            job_id: options.job_id.clone().unwrap_or_default(),
            node_id: node_id(),
            host,
            nproc: options.nproc_per_node,
            nnodes: options.nnodes,
            node_rank: options.node_rank,
            role: options.role.clone(),
            local_ranks_filter: options.local_ranks_filter.clone(),
            max_restarts: options.max_restarts,
            hang_timeout: options.hang_timeout,
            heartbeat_interval: timing.heartbeat_interval,
            coordinator_timeout: timing.heartbeat_timeout,
            coordinator_grace: match options.coordinator {
                // Its coordinator lives and dies with this process.
                CoordinatorMode::Embedded => timing.heartbeat_timeout,
                _ => timing.coordinator_grace,
            },
            grace_period: timing.grace_period,
            connect_retry: timing.connect_retry,
            rendezvous_timeout: timing.rendezvous_timeout,
            log_dir,
            command: options.command.clone(),
            user_set: options.user_set,
        };
        let view = tokio::spawn(watch(
            addr,
            token,
            options.job_id.clone().unwrap_or_default(),
            console.clone(),
            timing.connect_retry,
        ));
        let outcome = run_agent(agent, console.clone()).await;
        view.abort();
        let code = match &outcome {
            Ok(AgentOutcome::Finished(outcome)) => report(&console, outcome),
            Ok(AgentOutcome::Interrupted { signal }) => {
                console.finish();
                console.err("[cohort] interrupted: workers stopped");
                128 + signal
            }
            Err(_) => {
                console.finish();
                1
            }
        };
        if let Some(running) = hosted {
            // Other nodes learn the outcome from this coordinator: keep
            // serving until they left (or a heartbeat timeout passed).
            if running.coordinator().outcome().is_some() {
                running.coordinator().wait_finished(timing.heartbeat_timeout).await;
            }
            running.shutdown().await;
        }
        outcome.map(|_| code)
    })
}

/// An address to dial for a coordinator bound to `addr`: a wildcard bind
/// (0.0.0.0 or ::) is reached through loopback from this host.
fn local_dial_address(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()).to_string()
    } else {
        addr.to_string()
    }
}

/// Prints a line for a person (or a script) on stdout. A closed stdout must
/// not stop the coordinator, so write errors are ignored (SIGPIPE is ignored
/// in this process).
fn say(line: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// What `cohort coordinator` was asked to do.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub bind: String,
    pub nnodes: Option<NodeRange>,
    pub token: Option<String>,
    pub job_id: Option<String>,
    /// `--state-dir`: where the job's durable state is kept.
    pub state_dir: Option<PathBuf>,
    pub timing: Timing,
}

/// Runs `cohort coordinator` until its job is over (or SIGINT/SIGTERM);
/// prints the address it listens on (and a generated token) to stdout.
pub fn serve(options: CoordinatorOptions) -> Result<i32, LauncherError> {
    // A restarted coordinator given no token takes the one its job has.
    let saved_token = match (&options.token, &options.state_dir) {
        (None, Some(dir)) => crate::coordinator::saved_token(dir)?,
        _ => None,
    };
    let (token, generated) = match (&options.token, saved_token) {
        (Some(t), _) => (t.clone(), false),
        (None, Some(t)) => (t, false),
        (None, None) => (generate_token(), true),
    };
    runtime()?.block_on(async move {
        let config = CoordinatorConfig {
            job_id: options.job_id.clone(),
            nnodes: options.nnodes,
            max_restarts: None,
            token: token.clone(),
            state_dir: options.state_dir.clone(),
            heartbeat_timeout: options.timing.heartbeat_timeout,
            last_call: options.timing.last_call,
            tick: (options.timing.heartbeat_interval / 4).max(Duration::from_millis(10)),
            replacement_timeout: options.timing.replacement_timeout,
        };
        let running = RunningCoordinator::start(&options.bind, config).await?;
        say(&format!(
            "cohort coordinator listening on {}",
            running.addr()
        ));
        if let Some(line) = running.restored() {
            say(line);
        }
        if generated {
            say(&format!(
                "job token: {token} (pass it to every node with --token or COHORT_TOKEN)"
            ));
        }
        let mut events = running.coordinator().subscribe();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) if e.kind != EventKind::Progress as i32 => {
                        say(&e.message);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let mut int = signal(SignalKind::interrupt()).map_err(LauncherError::Runtime)?;
        let mut term = signal(SignalKind::terminate()).map_err(LauncherError::Runtime)?;
        let code = tokio::select! {
            outcome = running.coordinator().wait_finished(options.timing.heartbeat_timeout) => {
                i32::from(!outcome.success)
            }
            _ = int.recv() => 128 + libc::SIGINT,
            _ = term.recv() => 128 + libc::SIGTERM,
        };
        running.shutdown().await;
        Ok(code)
    })
}
