//! `cohort`: launch data-parallel training jobs, test collectives on one host,
//! inspect checkpoints. This binary does not link libtorch; training runs in
//! `cohort-worker`, which `launch` starts for every rank.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cohort", version, about = "Distributed data-parallel training", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job's workers on this node (torchrun style): `cohort launch CONFIG.toml` or `cohort launch -- PROGRAM ARGS`.
    Launch(Box<cmd::launch::LaunchArgs>),
    /// Run a standalone coordinator for a multi-node job.
    Coordinator(cmd::coordinator::CoordinatorArgs),
    /// Report libtorch, CUDA, NCCL, cores, memory and the collective backend `launch` would pick.
    Doctor(cmd::doctor::DoctorArgs),
    /// Inspect, verify or export a checkpoint (a step directory or a checkpoint root).
    Ckpt(cmd::ckpt::CkptArgs),
    /// Benchmark the collectives (nccl-tests style): `cohort bench collectives --nproc 4`.
    Bench(cmd::bench::BenchArgs),
    /// Run by `launch` itself: kills the job's processes once the launcher is gone.
    #[command(name = "__reap", hide = true)]
    Reap {
        #[arg(value_name = "COOKIE")]
        cookie: std::ffi::OsString,
    },
}

fn main() -> ExitCode {
    cmd::init_tracing();
    use clap::{CommandFactory, FromArgMatches};
    let command = Cli::command().mut_subcommand("launch", cmd::launch::with_pet_env);
    let cli = match command
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout with exit 0, and usage errors
            // to stderr with exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // The commands that only print die quietly on a closed stdout (`cohort
    // doctor | head`), as command-line tools do, instead of panicking in
    // println!. `launch` and `coordinator` keep SIGPIPE ignored (Rust's
    // default): they talk gRPC, and a vectored write (writev, which hyper
    // uses) to a connection the other side has closed raises SIGPIPE, which
    // would kill them; they write their own output ignoring errors.
    if matches!(
        cli.command,
        Command::Doctor(_) | Command::Ckpt(_) | Command::Bench(_)
    ) {
        // SAFETY: setting a signal disposition to SIG_DFL before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Launch(args) => cmd::launch::run(*args),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Ckpt(args) => cmd::ckpt::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Reap { cookie } => Ok(ExitCode::from(
            u8::try_from(cohort_launcher::reaper::reap_main(&cookie)).unwrap_or(1),
        )),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
