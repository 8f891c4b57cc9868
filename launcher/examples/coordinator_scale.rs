//! The coordinator under simulated load: `--nodes` node agents with
//! `--nproc` workers each, in this process, multiplexed on `--channels` gRPC
//! connections to a real coordinator on 127.0.0.1, join one generation and
//! then heartbeat at `--interval-ms` (each start jittered) for `--rounds` rounds.
//!
//! Reports the rendezvous time (first Join sent -> last Join answered, i.e. the
//! generation formed and every node knows its ranks) and heartbeat latency
//! percentiles, as a table and as one JSON line (`--json PATH` also writes it).
//!
//! With `--notice`, then an in-place recovery's store traffic
//! (`cohort_contract::recovery`), for every one of the nodes × nproc ranks:
//!
//! 1. Every rank's watcher waits in `KvWait` on `recovery/notice/1` (one
//!    wait per rank, multiplexed on the same `--channels` connections). They
//!    count as waiting once each wait was sent and a `KvGet` sent after all
//!    of them was answered on every connection, twice (HTTP/2 hands a
//!    connection's streams to the server in order); the deadline is
//!    `--epoch-timeout-s`.
//! 2. A simulated agent, on a connection of its own, claims the epoch
//!    (`KvCompareAndSet` of `recovery/epoch` from absent to `1`) and sets
//!    the `Notice` JSON under `recovery/notice/1`. Notice latency: that
//!    `KvSet` sent -> each rank's wait answered (p50/p99/max).
//! 3. Each rank, once woken, bootstraps epoch 1's communicator through the
//!    store under `epoch-1/`, as `--bootstrap` says:
//!    - `mesh` (default; what recovery's `connect_in_epoch` runs:
//!      `Communicator::connect_tcp`'s bootstrap): set `epoch-1/addr/<rank>`
//!      (an entry of the real size) and wait for every rank's `addr/*`
//!      key, i.e. world keys per rank. Its answer grows as world × ~130
//!      bytes; beyond gRPC's default 4 MiB a real worker's store client
//!      could not decode it, so the example refuses such a world rather
//!      than simulate a bootstrap that would fail.
//!    - `nccl` (what `NcclCommunicator::connect` does through the store):
//!      rank 0 sets `epoch-1/nccl/unique_id`, every other rank waits for
//!      that one key (the rest of NCCL's bootstrap is not the store's).
//!    - `none`: no bootstrap, the notice's fan-out alone.
//!
//!    Epoch formed: the notice's `KvSet` sent -> the last rank holding every
//!    key it waits for.
//!
//! ```text
//! cargo run --release -p cohort-launcher --example coordinator_scale -- --nodes 2048 --nproc 8
//! cargo run --release -p cohort-launcher --example coordinator_scale -- --nodes 2048 --nproc 8 \
//!     --rounds 0 --notice --bootstrap mesh
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cohort_contract::recovery::{EPOCH_KEY, Notice, epoch_prefix, notice_key, unix_ms};
use cohort_launcher::NodeRange;
use cohort_launcher::client::{Client, connect};
use cohort_launcher::coordinator::{CoordinatorConfig, RunningCoordinator};
use cohort_proto::v1::{
    Action, HeartbeatRequest, JobOptions, JoinRequest, KvCompareAndSetRequest, KvGetRequest,
    KvSetRequest, KvWaitRequest, WorkerState, WorkerStatus, join_response,
};

/// How a rank bootstraps the new epoch's communicator through the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bootstrap {
    /// Every rank sets `addr/<rank>` and waits for every rank's.
    Mesh,
    /// Rank 0 sets `nccl/unique_id`; the others wait for it.
    Nccl,
    /// No bootstrap: the notice alone.
    None,
}

impl Bootstrap {
    fn name(self) -> &'static str {
        match self {
            Bootstrap::Mesh => "mesh",
            Bootstrap::Nccl => "nccl",
            Bootstrap::None => "none",
        }
    }
}

/// The most a gRPC client decodes by default (tonic's limit, which the
/// store client of a worker keeps).
const GRPC_DECODE_LIMIT: u64 = 4 * 1024 * 1024;

struct Args {
    nodes: u32,
    nproc: u32,
    channels: usize,
    rounds: u32,
    interval: Duration,
    json: Option<String>,
    notice: bool,
    bootstrap: Bootstrap,
    epoch_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        nodes: 2048,
        nproc: 8,
        channels: 16,
        rounds: 5,
        interval: Duration::from_secs(1),
        json: None,
        notice: false,
        bootstrap: Bootstrap::Mesh,
        epoch_timeout: Duration::from_secs(120),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--nodes" => args.nodes = num(value()?)? as u32,
            "--nproc" => args.nproc = num(value()?)? as u32,
            "--channels" => args.channels = num(value()?)?.max(1) as usize,
            "--rounds" => args.rounds = num(value()?)? as u32,
            "--interval-ms" => args.interval = Duration::from_millis(num(value()?)?),
            "--json" => args.json = Some(value()?),
            "--notice" => args.notice = true,
            "--bootstrap" => {
                args.bootstrap = match value()?.as_str() {
                    "mesh" => Bootstrap::Mesh,
                    "nccl" => Bootstrap::Nccl,
                    "none" => Bootstrap::None,
                    other => {
                        return Err(format!(
                            "--bootstrap {other:?}: expected mesh, nccl or none"
                        ));
                    }
                }
            }
            "--epoch-timeout-s" => {
                args.epoch_timeout = Duration::from_secs(num(value()?)?.max(1));
            }
            other => {
                return Err(format!(
                    "unknown flag {other:?} (flags: --nodes N --nproc N --channels N --rounds N --interval-ms MS --json PATH --notice --bootstrap mesh|nccl|none --epoch-timeout-s S)"
                ));
            }
        }
    }
    if args.nodes == 0 || args.nproc == 0 {
        return Err("--nodes and --nproc must be at least 1".to_owned());
    }
    let world = u64::from(args.nodes) * u64::from(args.nproc);
    if world > u64::from(u32::MAX) {
        return Err(format!(
            "--nodes × --nproc = {world} ranks: at most {}",
            u32::MAX
        ));
    }
    let answer = world * (entry(world as u32 - 1, args.nproc).len() as u64 + 3);
    if args.notice && args.bootstrap == Bootstrap::Mesh && answer > GRPC_DECODE_LIMIT {
        return Err(format!(
            "--bootstrap mesh at {world} ranks: each rank's KvWait would answer with every rank's \
             address entry, ~{:.1} MiB, over the {} MiB a worker's store client decodes (gRPC's \
             default), so the real bootstrap would fail there; use fewer ranks, or \
             --bootstrap nccl",
            answer as f64 / (1024.0 * 1024.0),
            GRPC_DECODE_LIMIT / (1024 * 1024)
        ));
    }
    Ok(args)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `status`, with what to do when HTTP/2 closed the connection for carrying
/// too many unread requests (h2 allows about 2,500 small ones per
/// connection; the real workers each have a connection of their own).
fn rpc(status: &tonic::Status) -> String {
    if status.to_string().contains("too_many_data_frames") {
        format!("{status} (too many requests at once on one connection: raise --channels)")
    } else {
        status.to_string()
    }
}

/// How long a watcher's `KvWait` on the notice lasts (the real watcher asks
/// again every 20 s; one long wait here).
const NOTICE_WAIT: Duration = Duration::from_secs(600);

/// Rank `rank`'s `addr/<rank>` entry, in the bootstrap's format and of its
/// size: `HOST:PORT listener=HEX host=HOSTNAME/BOOT-ID/NETNS shm=1`.
fn entry(rank: u32, nproc: u32) -> String {
    let node = rank / nproc;
    format!(
        "10.{}.{}.{}:{} listener={:032x} host=node-{node:06}/{node:08x}-1c2d-4e5f-8a9b-0c1d2e3f4a5b/4026531840 shm=1",
        node >> 16,
        (node >> 8) & 255,
        node & 255,
        30000 + rank % nproc,
        u128::from(rank).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834),
    )
}

/// What every simulated rank of the recovery knows.
struct Plan {
    job: String,
    generation: u64,
    world: u32,
    nproc: u32,
    bootstrap: Bootstrap,
    epoch_timeout: Duration,
    /// Ranks whose notice wait was sent (its call polled once).
    sent: AtomicU64,
}

/// When one rank had the notice, and when it had every key of the new
/// epoch's bootstrap.
struct RankTimes {
    woke: Instant,
    formed: Instant,
}

/// `fut`, counted in `sent` once it was first polled (its request handed to
/// the connection).
async fn counted<F: Future>(fut: F, sent: &AtomicU64) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut first = true;
    std::future::poll_fn(|cx| {
        let poll = fut.as_mut().poll(cx);
        if first {
            first = false;
            sent.fetch_add(1, Ordering::Relaxed);
        }
        poll
    })
    .await
}

fn wait_request(plan: &Plan, keys: Vec<String>, timeout: Duration) -> KvWaitRequest {
    KvWaitRequest {
        job_id: plan.job.clone(),
        generation: plan.generation,
        keys,
        timeout_ms: timeout.as_millis() as u64,
    }
}

/// One rank's side of the recovery: its watcher's wait for the notice, then
/// the new epoch's bootstrap through the store.
async fn rank_recovery(
    mut client: Client,
    rank: u32,
    plan: Arc<Plan>,
) -> Result<RankTimes, String> {
    let notice = notice_key(1);
    let call = client.kv_wait(wait_request(&plan, vec![notice.clone()], NOTICE_WAIT));
    let answer = counted(call, &plan.sent)
        .await
        .map_err(|s| format!("rank {rank}: KvWait on {notice}: {}", rpc(&s)))?
        .into_inner();
    let woke = Instant::now();
    if !answer.complete {
        return Err(format!(
            "rank {rank}: no notice under {notice} within {NOTICE_WAIT:?}"
        ));
    }
    match answer
        .values
        .first()
        .map(|v| serde_json::from_slice::<Notice>(v))
    {
        Some(Ok(n)) if n.epoch == 1 => {}
        other => {
            return Err(format!(
                "rank {rank}: the notice is not epoch 1's: {other:?}"
            ));
        }
    }
    let prefix = epoch_prefix(1);
    let set = |key: String, value: Vec<u8>| KvSetRequest {
        job_id: plan.job.clone(),
        generation: plan.generation,
        key,
        value,
    };
    let (keys, setting) = match plan.bootstrap {
        Bootstrap::Mesh => (
            (0..plan.world)
                .map(|r| format!("{prefix}/addr/{r}"))
                .collect::<Vec<_>>(),
            Some(set(
                format!("{prefix}/addr/{rank}"),
                entry(rank, plan.nproc).into_bytes(),
            )),
        ),
        Bootstrap::Nccl if rank == 0 => (
            Vec::new(),
            Some(set(format!("{prefix}/nccl/unique_id"), vec![7; 128])),
        ),
        Bootstrap::Nccl => (vec![format!("{prefix}/nccl/unique_id")], None),
        Bootstrap::None => (Vec::new(), None),
    };
    if let Some(request) = setting {
        let key = request.key.clone();
        client
            .kv_set(request)
            .await
            .map_err(|s| format!("rank {rank}: KvSet of {key}: {}", rpc(&s)))?;
    }
    if !keys.is_empty() {
        let wanted = keys.len();
        let answer = client
            .kv_wait(wait_request(&plan, keys, plan.epoch_timeout))
            .await
            .map_err(|s| {
                format!(
                    "rank {rank}: KvWait on {wanted} key(s) under {prefix}/: {}",
                    rpc(&s)
                )
            })?
            .into_inner();
        if !answer.complete || answer.values.len() != wanted {
            return Err(format!(
                "rank {rank}: {} of the {wanted} key(s) under {prefix}/ still missing after {:?} \
                 (e.g. {:?}); raise --epoch-timeout-s",
                answer.missing.len(),
                plan.epoch_timeout,
                answer.missing.first()
            ));
        }
    }
    Ok(RankTimes {
        woke,
        formed: Instant::now(),
    })
}

/// What the recovery phase measured.
struct Recovery {
    /// First notice wait sent -> every wait counted as registered.
    armed: Duration,
    /// The notice's `KvSet` sent -> each rank woken, sorted.
    notice: Vec<Duration>,
    /// The notice's `KvSet` sent -> each rank's bootstrap done, sorted.
    formed: Vec<Duration>,
}

/// Every rank waits for the notice; an agent claims epoch 1 and sets its
/// notice; every rank bootstraps epoch 1 through the store.
async fn recovery(
    clients: &[Client],
    mut agent: Client,
    plan: Plan,
) -> Result<Recovery, Box<dyn std::error::Error>> {
    let plan = Arc::new(plan);
    let start = Instant::now();
    let ranks: Vec<_> = (0..plan.world)
        .map(|rank| {
            let client = clients[rank as usize % clients.len()].clone();
            tokio::spawn(rank_recovery(client, rank, plan.clone()))
        })
        .collect();
    // Every wait sent, then a KvGet behind them on every connection
    // answered, twice: the waits are with the server.
    let deadline = start + plan.epoch_timeout;
    while plan.sent.load(Ordering::Relaxed) < u64::from(plan.world) {
        if Instant::now() >= deadline {
            return Err(format!(
                "only {} of {} notice waits were sent within {:?}",
                plan.sent.load(Ordering::Relaxed),
                plan.world,
                plan.epoch_timeout
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for _ in 0..2 {
        let fences: Vec<_> = clients
            .iter()
            .map(|c| {
                let mut c = c.clone();
                let request = KvGetRequest {
                    job_id: plan.job.clone(),
                    generation: plan.generation,
                    key: "bench/fence".into(),
                };
                tokio::spawn(async move { c.kv_get(request).await })
            })
            .collect();
        for (i, fence) in fences.into_iter().enumerate() {
            fence.await?.map_err(|s| {
                format!(
                    "KvGet behind the notice waits on connection {i}: {}",
                    rpc(&s)
                )
            })?;
        }
    }
    let armed = start.elapsed();

    // The failed rank's agent: claim epoch 1, then write its notice.
    let claim = agent
        .kv_compare_and_set(KvCompareAndSetRequest {
            job_id: plan.job.clone(),
            generation: plan.generation,
            key: EPOCH_KEY.into(),
            expected: None,
            desired: b"1".to_vec(),
        })
        .await
        .map_err(|s| format!("the agent's KvCompareAndSet of {EPOCH_KEY}: {s}"))?
        .into_inner();
    if !claim.swapped {
        return Err(format!("{EPOCH_KEY} was already {:?}", claim.current).into());
    }
    let failed = plan.world / 2;
    let notice = Notice {
        epoch: 1,
        rank: failed as usize,
        reason: "was killed by SIGKILL".into(),
        failed_unix_ms: unix_ms(),
        noticed_unix_ms: unix_ms(),
    };
    let set_at = Instant::now();
    agent
        .kv_set(KvSetRequest {
            job_id: plan.job.clone(),
            generation: plan.generation,
            key: notice_key(1),
            value: serde_json::to_vec(&notice)?,
        })
        .await
        .map_err(|s| format!("the agent's KvSet of the notice: {s}"))?;

    let (mut woke, mut formed) = (Vec::new(), Vec::new());
    let mut failures = Vec::new();
    for rank in ranks {
        match rank.await? {
            Ok(t) => {
                woke.push(t.woke.saturating_duration_since(set_at));
                formed.push(t.formed.saturating_duration_since(set_at));
            }
            Err(e) => failures.push(e),
        }
    }
    if let Some(first) = failures.first() {
        return Err(format!(
            "{} of {} ranks did not form epoch 1; the first: {first}",
            failures.len(),
            plan.world
        )
        .into());
    }
    woke.sort_unstable();
    formed.sort_unstable();
    Ok(Recovery {
        armed,
        notice: woke,
        formed,
    })
}

async fn bench(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let token = "bench-token".to_owned();
    let mut config = CoordinatorConfig::new(token.clone());
    config.job_id = Some("scale".to_owned());
    config.nnodes = Some(NodeRange::exactly(args.nodes));
    config.max_restarts = Some(0);
    config.heartbeat_timeout = Duration::from_secs(60);
    let server = RunningCoordinator::start("127.0.0.1:0", config).await?;
    let addr = server.addr().to_string();
    let mut clients = Vec::new();
    for _ in 0..args.channels {
        clients.push(connect(&addr, &token, Duration::from_secs(10)).await?);
    }

    let start = Instant::now();
    let mut joins = Vec::new();
    for node in 0..args.nodes {
        let mut client = clients[node as usize % clients.len()].clone();
        let nproc = args.nproc;
        joins.push(tokio::spawn(async move {
            let response = client
                .join(JoinRequest {
                    job_id: "scale".into(),
                    node_id: format!("node-{node:06}"),
                    host: format!("10.{}.{}.{}", node >> 16, (node >> 8) & 255, node & 255),
                    nproc,
                    master_port: 29500,
                    options: Some(JobOptions::default()),
                    ..JoinRequest::default()
                })
                .await?
                .into_inner();
            match response.outcome {
                Some(join_response::Outcome::Assignment(a)) => Ok::<_, tonic::Status>(a),
                other => Err(tonic::Status::internal(format!("no assignment: {other:?}"))),
            }
        }));
    }
    let mut ranks_seen = 0u64;
    let mut world = 0;
    let mut generation = 0;
    for join in joins {
        let a = join.await??;
        ranks_seen += u64::from(args.nproc);
        world = a.world_size;
        generation = a.generation;
    }
    let rendezvous = start.elapsed();
    assert_eq!(u64::from(world), ranks_seen, "world size vs ranks assigned");

    let hb_start = Instant::now();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut beats = Vec::new();
    for node in 0..args.nodes {
        let mut client = clients[node as usize % clients.len()].clone();
        let latencies = latencies.clone();
        let (nproc, rounds, interval) = (args.nproc, args.rounds, args.interval);
        beats.push(tokio::spawn(async move {
            let jitter = interval.mul_f64(f64::from(node) / f64::from(args.nodes));
            tokio::time::sleep(jitter).await;
            let mut ticker = tokio::time::interval(interval);
            let mut mine = Vec::with_capacity(rounds as usize);
            for round in 0..rounds {
                ticker.tick().await;
                let workers = (0..nproc)
                    .map(|l| WorkerStatus {
                        rank: node * nproc + l,
                        local_rank: l,
                        state: WorkerState::Running as i32,
                        reports_progress: true,
                        step: u64::from(round),
                        max_steps: 1000,
                        loss: Some(2.5),
                        tokens_per_s: Some(1e4),
                    })
                    .collect();
                let sent = Instant::now();
                let directive = client
                    .heartbeat(HeartbeatRequest {
                        job_id: "scale".into(),
                        node_id: format!("node-{node:06}"),
                        generation: 0,
                        workers,
                        ..HeartbeatRequest::default()
                    })
                    .await?
                    .into_inner()
                    .directive
                    .unwrap_or_default();
                mine.push(sent.elapsed());
                if directive.action != Action::Continue as i32 {
                    return Err(tonic::Status::internal(format!(
                        "unexpected directive: {directive:?}"
                    )));
                }
            }
            latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(mine);
            Ok::<_, tonic::Status>(())
        }));
    }
    for beat in beats {
        beat.await??;
    }
    let hb_wall = hb_start.elapsed();
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    let (p50, p99, max) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
    );
    let rate = lat.len() as f64 / hb_wall.as_secs_f64();
    let recovered = if args.notice {
        let agent = connect(&addr, &token, Duration::from_secs(10)).await?;
        let plan = Plan {
            job: "scale".into(),
            generation,
            world,
            nproc: args.nproc,
            bootstrap: args.bootstrap,
            epoch_timeout: args.epoch_timeout,
            sent: AtomicU64::new(0),
        };
        Some(recovery(&clients, agent, plan).await?)
    } else {
        None
    };
    server.shutdown().await;

    println!(
        "{:>8} {:>6} {:>6} {:>9} {:>14} {:>10} {:>10} {:>10} {:>12}",
        "ranks",
        "nodes",
        "nproc",
        "channels",
        "rendezvous_s",
        "hb_p50_ms",
        "hb_p99_ms",
        "hb_max_ms",
        "hb_per_s"
    );
    println!(
        "{:>8} {:>6} {:>6} {:>9} {:>14.3} {:>10.2} {:>10.2} {:>10.2} {:>12.0}",
        ranks_seen,
        args.nodes,
        args.nproc,
        args.channels,
        rendezvous.as_secs_f64(),
        ms(p50),
        ms(p99),
        ms(max),
        rate
    );
    let mut json = format!(
        "{{\"ranks\": {ranks_seen}, \"nodes\": {}, \"nproc\": {}, \"channels\": {}, \"rendezvous_s\": {:.4}, \
         \"heartbeats\": {}, \"hb_p50_ms\": {:.3}, \"hb_p99_ms\": {:.3}, \"hb_max_ms\": {:.3}, \"hb_per_s\": {:.1}",
        args.nodes,
        args.nproc,
        args.channels,
        rendezvous.as_secs_f64(),
        lat.len(),
        ms(p50),
        ms(p99),
        ms(max),
        rate
    );
    if let Some(r) = &recovered {
        let (bootstrap, armed) = (args.bootstrap.name(), r.armed.as_secs_f64());
        let (n50, n99, nmax) = (
            ms(percentile(&r.notice, 0.5)),
            ms(percentile(&r.notice, 0.99)),
            ms(r.notice.last().copied().unwrap_or_default()),
        );
        let (f50, f99, formed) = (
            ms(percentile(&r.formed, 0.5)),
            ms(percentile(&r.formed, 0.99)),
            r.formed.last().copied().unwrap_or_default().as_secs_f64(),
        );
        println!(
            "{:>8} {:>9} {:>9} {:>13} {:>13} {:>13} {:>12} {:>12} {:>15}",
            "ranks",
            "bootstrap",
            "armed_s",
            "notice_p50_ms",
            "notice_p99_ms",
            "notice_max_ms",
            "rank_p50_ms",
            "rank_p99_ms",
            "epoch_formed_s"
        );
        println!(
            "{ranks_seen:>8} {bootstrap:>9} {armed:>9.3} {n50:>13.1} {n99:>13.1} {nmax:>13.1} \
             {f50:>12.1} {f99:>12.1} {formed:>15.3}"
        );
        json.push_str(&format!(
            ", \"bootstrap\": \"{bootstrap}\", \"armed_s\": {armed:.4}, \"notice_p50_ms\": {n50:.3}, \
             \"notice_p99_ms\": {n99:.3}, \"notice_max_ms\": {nmax:.3}, \"rank_formed_p50_ms\": {f50:.3}, \
             \"rank_formed_p99_ms\": {f99:.3}, \"epoch_formed_s\": {formed:.4}"
        ));
    }
    json.push('}');
    println!("{json}");
    if let Some(path) = args.json {
        std::fs::write(&path, format!("{json}\n"))?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
