//! The coordinator under simulated load: `--nodes` node agents with
//! `--nproc` workers each, in this process, multiplexed on `--channels` gRPC
//! connections to a real coordinator on 127.0.0.1, join one generation and
//! then heartbeat at `--interval-ms` (each start jittered) for `--rounds` rounds.
//!
//! Reports the rendezvous time (first Join sent -> last Join answered, i.e. the
//! generation formed and every node knows its ranks) and heartbeat latency
//! percentiles, as a table and as one JSON line (`--json PATH` also writes it).
//!
//! ```text
//! cargo run --release -p cohort-launcher --example coordinator_scale -- --nodes 2048 --nproc 8
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_launcher::NodeRange;
use cohort_launcher::client::connect;
use cohort_launcher::coordinator::{CoordinatorConfig, RunningCoordinator};
use cohort_proto::v1::{
    Action, HeartbeatRequest, JobOptions, JoinRequest, WorkerState, WorkerStatus, join_response,
};

struct Args {
    nodes: u32,
    nproc: u32,
    channels: usize,
    rounds: u32,
    interval: Duration,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        nodes: 2048,
        nproc: 8,
        channels: 16,
        rounds: 5,
        interval: Duration::from_secs(1),
        json: None,
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
            other => {
                return Err(format!(
                    "unknown flag {other:?} (flags: --nodes N --nproc N --channels N --rounds N --interval-ms MS --json PATH)"
                ));
            }
        }
    }
    if args.nodes == 0 || args.nproc == 0 {
        return Err("--nodes and --nproc must be at least 1".to_owned());
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
    for join in joins {
        let a = join.await??;
        ranks_seen += u64::from(args.nproc);
        world = a.world_size;
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
    let json = format!(
        "{{\"ranks\": {ranks_seen}, \"nodes\": {}, \"nproc\": {}, \"channels\": {}, \"rendezvous_s\": {:.4}, \
         \"heartbeats\": {}, \"hb_p50_ms\": {:.3}, \"hb_p99_ms\": {:.3}, \"hb_max_ms\": {:.3}, \"hb_per_s\": {:.1}}}",
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
