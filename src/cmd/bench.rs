//! `cohort bench collectives`: an nccl-tests-style benchmark of the
//! collectives on one host: cohort's host-memory backend (shared memory or
//! TCP between the processes, `--transport`), or with `--backend nccl` the
//! NCCL backend (device memory, one GPU per rank).
//!
//! The parent spawns `--nproc` copies of this binary in a hidden worker mode
//! (`--worker-rank R --store DIR`), which bootstrap through a `FileStore` in a
//! temporary directory with a random job token. Every worker runs every op
//! and size, times each iteration (the buffer is refilled before it,
//! untimed), checks every result, and agrees with the others on the time of
//! every iteration (that of its slowest rank: the op is done when every
//! rank is) and the total of wrong elements; rank 0 prints one JSON row per
//! size (mean, median and p99 of those times), which the parent turns into
//! the table.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_collectives::nccl::{self, DeviceBuffer, NcclCommunicator, Stream};
use cohort_collectives::{
    Algorithm, Communicator, DType, Element, FileStore, OpKind, OpOptions, PrefixStore, ReduceOp,
    TcpConfig, TransportKind, shard_range,
};
use cohort_contract::{CommEnv, var};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand)]
enum BenchWhat {
    /// Time all_reduce, reduce_scatter, all_gather and broadcast between
    /// local processes, nccl-tests style (TCP, or NCCL with --backend nccl).
    Collectives(CollectivesArgs),
}

#[derive(clap::Args, Clone)]
struct CollectivesArgs {
    /// Number of local processes (ranks).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    nproc: u16,
    /// Collectives to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "all_reduce")]
    op: Vec<BenchOp>,
    /// Backend: tcp (host memory) or nccl (CUDA device memory, one GPU per rank).
    #[arg(long, default_value = "tcp")]
    backend: BenchBackend,
    /// Algorithm of the host-memory backend: auto, ring, tree, doubling or
    /// hierarchical (NCCL picks its own).
    #[arg(long, default_value = "auto")]
    algo: Algorithm,
    /// How the processes of the tcp backend reach each other: auto (shared
    /// memory on one host), tcp, or shm.
    #[arg(long, default_value = "auto")]
    transport: TransportKind,
    /// Bind rank r to core r (modulo the cores this process may use), as
    /// mpirun does by default; unbound otherwise.
    #[arg(long)]
    bind: bool,
    /// Element type: f32, f64, f16, bf16, i32, i64, u8.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// The reduction of all_reduce and reduce_scatter: sum, or avg (through
    /// NCCL, avg launches a kernel even at world 1 where an in-place sum
    /// does nothing). Results are checked either way.
    #[arg(long, default_value = "sum")]
    reduce: BenchReduce,
    /// Smallest buffer (bytes; K, M, G suffixes are powers of 1024).
    #[arg(long, default_value = "1K", value_parser = parse_size)]
    min_bytes: usize,
    /// Largest buffer.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    max_bytes: usize,
    /// Size multiplier from one row to the next.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..))]
    factor: u32,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Untimed iterations before them.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Also write the rows to this file, as a JSON array of objects.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Largest pipeline segment in bytes (tuning).
    #[arg(long, hide = true, value_parser = parse_size)]
    segment_bytes: Option<usize>,
    /// How long a waiting op polls before blocking, in microseconds (tuning).
    #[arg(long, hide = true)]
    spin_us: Option<u64>,
    /// Worker mode: this process is rank R.
    #[arg(long, hide = true, requires = "store")]
    worker_rank: Option<usize>,
    /// Worker mode: the FileStore directory.
    #[arg(long, hide = true)]
    store: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchReduce {
    Sum,
    Avg,
}

impl BenchReduce {
    fn op(self) -> ReduceOp {
        match self {
            BenchReduce::Sum => ReduceOp::Sum,
            BenchReduce::Avg => ReduceOp::Avg,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchBackend {
    Tcp,
    Nccl,
}

impl BenchBackend {
    fn name(self) -> &'static str {
        match self {
            BenchBackend::Tcp => "tcp",
            BenchBackend::Nccl => "nccl",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
enum BenchOp {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "all_reduce",
            BenchOp::ReduceScatter => "reduce_scatter",
            BenchOp::AllGather => "all_gather",
            BenchOp::Broadcast => "broadcast",
        }
    }

    /// nccl-tests' bus bandwidth factor.
    fn busbw_factor(self, world: usize) -> f64 {
        let n = world as f64;
        match self {
            BenchOp::AllReduce => 2.0 * (n - 1.0) / n,
            BenchOp::ReduceScatter | BenchOp::AllGather => (n - 1.0) / n,
            BenchOp::Broadcast => 1.0,
        }
    }
}

/// One row of results.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    op: BenchOp,
    dtype: String,
    bytes: usize,
    count: usize,
    world: usize,
    algo: String,
    /// How the processes reached each other (`nccl` for that backend).
    transport: String,
    /// Mean of the per-iteration times (each the slowest rank's).
    time_us: f64,
    median_us: f64,
    p99_us: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    wrong: u64,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1usize << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 64K, 256M, 1G)"))
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        BenchWhat::Collectives(a) => match (a.worker_rank, a.store.clone()) {
            (Some(rank), Some(store)) => worker(&a, rank, &store),
            _ => parent(&a),
        },
    }
}

fn sizes(a: &CollectivesArgs) -> Vec<usize> {
    let mut out = Vec::new();
    let mut b = a.min_bytes.max(1);
    while b <= a.max_bytes {
        out.push(b);
        match b.checked_mul(a.factor as usize) {
            Some(next) => b = next,
            None => break,
        }
    }
    out
}

// ---------------------------------------------------------------- parent

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Kills and reaps every child still running when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Removes the store directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .context("reading /dev/urandom for the job token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn parent(a: &CollectivesArgs) -> anyhow::Result<ExitCode> {
    if a.min_bytes > a.max_bytes {
        bail!(
            "--min-bytes ({}) is larger than --max-bytes ({})",
            a.min_bytes,
            a.max_bytes
        );
    }
    let world = usize::from(a.nproc);
    // The checked values are exact only while every sum stays small: under
    // avg each rank's values are scaled by the world size (up to 10·N·N).
    if a.reduce == BenchReduce::Avg && a.dtype == DType::U8 && world > 5 {
        bail!(
            "--reduce avg with --dtype u8 overflows u8 above 5 ranks (--nproc {world}): use sum, or another dtype"
        );
    }
    if a.backend == BenchBackend::Nccl {
        let ready = nccl::probe().map_err(|why| anyhow::anyhow!("--backend nccl: {why}"))?;
        if world > ready.driver.devices {
            bail!(
                "--backend nccl runs one rank per GPU (NCCL refuses two ranks on one device): \
                 --nproc {world}, but {} CUDA device(s) are visible",
                ready.driver.devices
            );
        }
    }
    let dir = TempDir(std::env::temp_dir().join(format!("cohort-bench-{}", random_hex(8)?)));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let token = random_hex(32)?;
    let exe = std::env::current_exe().context("finding this executable")?;

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }

    let cores = allowed_cores().context("reading this process's CPU affinity")?;
    let mut children = Children(Vec::with_capacity(world));
    let mut rank0_out = None;
    for rank in 0..world {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "collectives"])
            .args(forwarded_args(a))
            .arg("--worker-rank")
            .arg(rank.to_string())
            .arg("--store")
            .arg(&dir.0)
            .env(var::TOKEN, &token)
            .stdin(Stdio::null())
            .stdout(if rank == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let core = a.bind.then(|| cores[rank % cores.len()]);
        // SAFETY: prctl and sched_setaffinity are async-signal-safe; the
        // first makes the worker die with us even if this process is killed
        // without a chance to clean up, the second binds it to `core`.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(core) = core {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(core, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting worker rank {rank}"))?;
        if rank == 0 {
            rank0_out = child.stdout.take();
        }
        children.0.push(child);
    }

    let (tx, rx) = mpsc::channel::<String>();
    let out = rank0_out.context("rank 0's stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let how = match a.backend {
        BenchBackend::Tcp => format!(
            "this host (transport {}{}), algo {}",
            a.transport,
            if a.bind { ", bound to cores" } else { "" },
            a.algo
        ),
        BenchBackend::Nccl => format!("one GPU each (NCCL {})", nccl_version()),
    };
    println!(
        "# cohort bench collectives: {world} processes on {how}, dtype {}, \
         {} warmup + {} timed iterations",
        a.dtype, a.warmup, a.iters
    );
    println!(
        "# {:>12} {:>12} {:>6} {:>15} {:>5} {:>11} {:>11} {:>11} {:>12} {:>12} {:>7}",
        "size(B)",
        "count",
        "type",
        "op",
        "algo",
        "mean(us)",
        "median(us)",
        "p99(us)",
        "algbw(GB/s)",
        "busbw(GB/s)",
        "#wrong"
    );
    let mut rows = Vec::new();
    let mut exited = vec![false; world];
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                let row: Row = serde_json::from_str(&line)
                    .with_context(|| format!("rank 0 printed an unreadable row: {line}"))?;
                println!(
                    "  {:>12} {:>12} {:>6} {:>15} {:>5} {:>11.1} {:>11.1} {:>11.1} {:>12.3} {:>12.3} {:>7}",
                    row.bytes,
                    row.count,
                    row.dtype,
                    row.op.name(),
                    row.algo,
                    row.time_us,
                    row.median_us,
                    row.p99_us,
                    row.algbw_gbps,
                    row.busbw_gbps,
                    row.wrong
                );
                let _ = std::io::stdout().flush();
                rows.push(row);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if exited.iter().all(|&e| e) {
                    break;
                }
            }
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted: stopped the {world} workers");
        }
        for (rank, child) in children.0.iter_mut().enumerate() {
            if exited[rank] {
                continue;
            }
            if let Some(status) = child.try_wait().context("waiting for a worker")? {
                exited[rank] = true;
                if !status.success() {
                    bail!(
                        "worker rank {rank} failed ({status}); its error is above. \
                         Stopped the other workers"
                    );
                }
            }
        }
    }

    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&rows)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let wrong: u64 = rows.iter().map(|r| r.wrong).sum();
    if wrong > 0 {
        eprintln!("error: {wrong} wrong elements in the results (see the #wrong column)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The cores this process may run on, in order.
fn allowed_cores() -> std::io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid, empty set; the call fills it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        set
    };
    // SAFETY: CPU_ISSET reads a valid set for indexes below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

fn forwarded_args(a: &CollectivesArgs) -> Vec<String> {
    let ops: Vec<&str> = a.op.iter().map(|o| o.name()).collect();
    let mut v = vec![
        format!("--nproc={}", a.nproc),
        format!("--op={}", ops.join(",")),
        format!("--backend={}", a.backend.name()),
        format!("--algo={}", a.algo),
        format!("--transport={}", a.transport),
        format!("--dtype={}", a.dtype),
        format!("--reduce={}", a.reduce.op()),
        format!("--min-bytes={}", a.min_bytes),
        format!("--max-bytes={}", a.max_bytes),
        format!("--factor={}", a.factor),
        format!("--iters={}", a.iters),
        format!("--warmup={}", a.warmup),
    ];
    if let Some(s) = a.segment_bytes {
        v.push(format!("--segment-bytes={s}"));
    }
    if let Some(s) = a.spin_us {
        v.push(format!("--spin-us={s}"));
    }
    v
}

// ---------------------------------------------------------------- worker

/// Benchmark values: small integers, exact in every dtype for sums over up
/// to 25 ranks (bf16 holds integers up to 256 exactly).
trait BenchElem: Element + PartialEq {
    fn from_i64(x: i64) -> Self;
}

macro_rules! bench_elem {
    ($($t:ty => $conv:expr),* $(,)?) => {
        $(impl BenchElem for $t {
            fn from_i64(x: i64) -> Self {
                $conv(x)
            }
        })*
    };
}

bench_elem!(
    f32 => |x: i64| x as f32,
    f64 => |x: i64| x as f64,
    f16 => |x: i64| f16::from_f32(x as f32),
    bf16 => |x: i64| bf16::from_f32(x as f32),
    i32 => |x: i64| x as i32,
    i64 => |x: i64| x,
    u8 => |x: i64| x as u8,
);

/// Values repeat with this period, so expected results are a small table.
const PERIOD: usize = 11;

/// Written over a host buffer before a device result is copied into it:
/// never an expected value (those are small and non-negative; -1 is 255 in u8, above any u8 sum checked here).
const POISON: i64 = -1;

fn value(rank: usize, i: usize) -> i64 {
    ((i + 3 * rank) % PERIOD) as i64
}

fn table<T: BenchElem>(f: impl Fn(usize) -> i64) -> [T; PERIOD] {
    std::array::from_fn(|i| T::from_i64(f(i)))
}

fn fill<T: BenchElem>(buf: &mut [T], t: &[T; PERIOD]) {
    for (i, x) in buf.iter_mut().enumerate() {
        *x = t[i % PERIOD];
    }
}

fn count_wrong<T: BenchElem>(buf: &[T], range: std::ops::Range<usize>, t: &[T; PERIOD]) -> u64 {
    range.filter(|&i| buf[i] != t[i % PERIOD]).count() as u64
}

fn nccl_version() -> String {
    nccl::probe::nccl_library().map_or_else(|_| "?".into(), |n| n.version)
}

fn worker(a: &CollectivesArgs, rank: usize, store_dir: &Path) -> anyhow::Result<ExitCode> {
    let world = usize::from(a.nproc);
    // The benchmark's own worker environment: the token the parent gave it,
    // COHORT_HOST and COHORT_COLLECTIVE_TIMEOUT_S.
    let env = CommEnv::from_env()?;
    let cfg = TcpConfig {
        transport: match a.backend {
            BenchBackend::Tcp => a.transport,
            // The NCCL backend's group only carries barriers and results.
            BenchBackend::Nccl => TransportKind::Auto,
        },
        ..TcpConfig::new(
            env.token()?.as_bytes(),
            env.host.as_deref(),
            env.op_timeout(),
        )
    };
    let store = PrefixStore::new("bench", FileStore::new(store_dir)?)?;
    // TCP carries the data of the tcp backend, and the barriers and the
    // agreement on results of both.
    let mut comm = Communicator::connect_tcp(&store, rank, world, &cfg)
        .with_context(|| format!("rank {rank}: joining the benchmark group"))?;
    if let Some(s) = a.segment_bytes {
        comm.set_max_segment_bytes(s);
    }
    if let Some(us) = a.spin_us {
        comm.set_spin(Duration::from_micros(us));
    }
    let mut gpu = match a.backend {
        BenchBackend::Tcp => None,
        BenchBackend::Nccl => {
            let nccl_store = PrefixStore::new("bench-nccl", FileStore::new(store_dir)?)?;
            Some(
                NcclCommunicator::connect(&nccl_store, rank, world, rank, cfg.default_timeout)
                    .with_context(|| {
                        format!("rank {rank}: joining the NCCL communicator on GPU {rank}")
                    })?,
            )
        }
    };
    for &op in &a.op {
        for bytes in sizes(a) {
            macro_rules! run {
                ($t:ty) => {
                    measure::<$t>(&mut comm, gpu.as_mut(), a, op, bytes)
                };
            }
            let row = match a.dtype {
                DType::F32 => run!(f32),
                DType::F64 => run!(f64),
                DType::F16 => run!(f16),
                DType::BF16 => run!(bf16),
                DType::I32 => run!(i32),
                DType::I64 => run!(i64),
                DType::U8 => run!(u8),
            }
            .with_context(|| format!("rank {rank}: {} of {bytes} bytes", op.name()))?;
            if rank == 0 {
                println!("{}", serde_json::to_string(&row)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The timed op through NCCL on device memory: enqueue, then wait for the
/// stream (with the watchdog's deadline).
fn nccl_op(
    nccl: &mut NcclCommunicator,
    dev: &DeviceBuffer,
    op: BenchOp,
    count: usize,
    dtype: DType,
    reduce: ReduceOp,
) -> anyhow::Result<()> {
    let s = Stream::DEFAULT;
    // SAFETY: `dev` holds `count` elements of `dtype` on this rank's GPU and
    // lives until the synchronize below.
    unsafe {
        match op {
            BenchOp::AllReduce => nccl.all_reduce(dev.ptr(), count, dtype, reduce, s)?,
            BenchOp::ReduceScatter => {
                nccl.reduce_scatter(dev.ptr(), count, dtype, reduce, s)?;
            }
            BenchOp::AllGather => nccl.all_gather(dev.ptr(), count, dtype, s)?,
            BenchOp::Broadcast => nccl.broadcast(dev.ptr(), count, dtype, 0, s)?,
        }
    }
    nccl.synchronize(s, None)?;
    Ok(())
}

fn measure<T: BenchElem>(
    comm: &mut Communicator,
    gpu: Option<&mut NcclCommunicator>,
    a: &CollectivesArgs,
    op: BenchOp,
    bytes: usize,
) -> anyhow::Result<Row> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let count = bytes / std::mem::size_of::<T>();
    let opts = OpOptions {
        algorithm: a.algo,
        timeout: None,
    };
    // Under avg every rank's values are scaled by the world size, so the
    // average is the same exact integers as the unscaled sum.
    let reduce = a.reduce.op();
    let scale = if reduce == ReduceOp::Avg { world } else { 1 } as i64;
    let value = |rank, i| value(rank, i) * scale;
    let mine: [T; PERIOD] = table(|i| value(rank, i));
    let root0: [T; PERIOD] = table(|i| value(0, i));
    let reduced: [T; PERIOD] = table(|i| (0..world).map(|r| value(r, i)).sum::<i64>() / scale);
    let owners: Vec<[T; PERIOD]> = (0..world).map(|r| table(|i| value(r, i))).collect();
    let shard = shard_range(count, world, rank);
    let mut buf = vec![T::from_i64(0); count];
    // The NCCL backend's communicator and this size's device buffer.
    let mut gpu = match gpu {
        Some(nccl) => {
            let dev = DeviceBuffer::new(nccl.device(), bytes)
                .map_err(|e| anyhow::anyhow!("rank {rank}: {e}"))?;
            Some((nccl, dev))
        }
        None => None,
    };
    let mut times_us = Vec::with_capacity(a.iters as usize);
    let mut wrong = 0u64;
    let quiet = OpOptions::default();
    for it in 0..a.warmup + a.iters {
        fill(&mut buf, &mine);
        if let Some((_, dev)) = gpu.as_mut() {
            dev.copy_from_host(bytemuck::cast_slice(&buf))
                .map_err(|e| anyhow::anyhow!("rank {rank}: {e}"))?;
        }
        // Untimed barriers around the timed op: no rank fills or checks
        // (heavy on memory) while another is still being timed, which
        // matters when ranks outnumber cores.
        comm.barrier(&quiet)?;
        let started = Instant::now();
        match gpu.as_mut() {
            Some((nccl, dev)) => nccl_op(nccl, dev, op, count, T::DTYPE, reduce)?,
            None => match op {
                BenchOp::AllReduce => comm.all_reduce(&mut buf, reduce, &opts)?,
                BenchOp::ReduceScatter => {
                    comm.reduce_scatter(&mut buf, reduce, &opts)?;
                }
                BenchOp::AllGather => comm.all_gather(&mut buf, &opts)?,
                BenchOp::Broadcast => comm.broadcast(&mut buf, 0, &opts)?,
            },
        }
        let took = started.elapsed();
        if it >= a.warmup {
            times_us.push(took.as_secs_f64() * 1e6);
        }
        if let Some((_, dev)) = gpu.as_ref() {
            // Poisoned first: a read-back that never happened leaves no
            // right answer behind (at world 1 the input is the answer).
            buf.fill(T::from_i64(POISON));
            dev.copy_to_host(bytemuck::cast_slice_mut(&mut buf))
                .map_err(|e| anyhow::anyhow!("rank {rank}: {e}"))?;
        }
        comm.barrier(&quiet)?;
        wrong += match op {
            BenchOp::AllReduce => count_wrong(&buf, 0..count, &reduced),
            BenchOp::ReduceScatter => count_wrong(&buf, shard.clone(), &reduced),
            BenchOp::AllGather => (0..world)
                .map(|r| count_wrong(&buf, shard_range(count, world, r), &owners[r]))
                .sum(),
            BenchOp::Broadcast => count_wrong(&buf, 0..count, &root0),
        };
    }
    let gpu_used = gpu.is_some();
    let algo = if gpu_used {
        "nccl".to_string()
    } else {
        comm.flight_record()
            .iter()
            .rev()
            .find(|r| r.kind != OpKind::Barrier)
            .map_or_else(|| a.algo.to_string(), |r| r.algorithm.to_string())
    };
    // Every iteration's slowest rank, and everyone's wrong elements.
    comm.all_reduce(&mut times_us, ReduceOp::Max, &OpOptions::default())?;
    let (mean_us, median_us, p99_us) = summary(&mut times_us);
    let mut wrong_all = [wrong as i64];
    comm.all_reduce(&mut wrong_all, ReduceOp::Sum, &OpOptions::default())?;
    let bytes = count * std::mem::size_of::<T>();
    let algbw = if mean_us > 0.0 {
        bytes as f64 / mean_us / 1e3
    } else {
        0.0
    };
    Ok(Row {
        op,
        dtype: T::DTYPE.to_string(),
        bytes,
        count,
        world,
        algo,
        transport: if gpu_used {
            String::from("nccl")
        } else {
            a.transport.to_string()
        },
        time_us: mean_us,
        median_us,
        p99_us,
        algbw_gbps: algbw,
        busbw_gbps: algbw * op.busbw_factor(world),
        wrong: wrong_all[0] as u64,
    })
}

/// Mean, median and 99th percentile (nearest rank) of `times`.
fn summary(times: &mut [f64]) -> (f64, f64, f64) {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let mean = times.iter().sum::<f64>() / n as f64;
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    };
    let p99 = times[(n * 99).div_ceil(100).max(1) - 1];
    (mean, median, p99)
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn summary_of_times() {
        let mut t: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        assert_eq!(summary(&mut t), (100.5, 100.5, 198.0));
        assert_eq!(summary(&mut [3.0, 1.0, 2.0]), (2.0, 2.0, 3.0));
        assert_eq!(summary(&mut [5.0]), (5.0, 5.0, 5.0));
    }
}
