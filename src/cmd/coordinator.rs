//! `cohort coordinator`: a standalone coordinator for a multi-node job. It
//! prints the address it listens on (and the job token it generated, if none
//! was given), serves one job, and exits when that job is over: 0 if it
//! succeeded, 1 if it failed. With `--state-dir` it keeps the job's state on
//! disk, and a coordinator restarted with it carries on the job.

use std::process::ExitCode;

use cohort_contract::var;
use cohort_launcher::{CoordinatorOptions, NodeRange};

use super::launch::{TimingArgs, finish};

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// Listen on HOST:PORT (port 0: any free port; the real one is printed).
    #[arg(long, value_name = "HOST:PORT")]
    bind: String,
    /// Nodes in the job: N or MIN:MAX [default: the first node's --nnodes].
    #[arg(long, value_name = "N|MIN:MAX")]
    nnodes: Option<NodeRange>,
    /// The job token nodes must present [default: generated and printed].
    #[arg(long, value_name = "T", env = var::TOKEN, hide_env_values = true)]
    token: Option<String>,
    /// The job's id [default: the first node's --job-id, or generated].
    #[arg(long, value_name = "ID")]
    job_id: Option<String>,
    /// Keep the job's state in DIR (created if missing): a coordinator
    /// restarted with the same --state-dir on the same address carries on
    /// the job (its token too, if --token is not given).
    #[arg(long, value_name = "DIR", env = "COHORT_STATE_DIR")]
    state_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    timing: TimingArgs,
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    finish(cohort_launcher::serve(CoordinatorOptions {
        bind: args.bind,
        nnodes: args.nnodes,
        token: args.token.filter(|t| !t.is_empty()),
        job_id: args.job_id,
        state_dir: args.state_dir,
        timing: args.timing.into(),
    }))
}
