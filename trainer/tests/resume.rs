//! Checkpoints: a job resumed from step S on the same world size continues
//! exactly as if it had never stopped (parameters, optimizer state, data
//! position, RNG, LR schedule), and a checkpoint loads on another world size.

use std::path::Path;

use cohort_collectives::Communicator;
use cohort_configs::JobConfig;
use cohort_trainer::WorkerEnv;
use cohort_trainer::train::{Resume, Summary, run};

fn job(dir: &Path, max_steps: u64, stage: u8) -> JobConfig {
    let text = format!(
        r#"
[train]
max_steps = {max_steps}
batch_size = 2
grad_accum_steps = 2
log_every = 100
threads = 1
[model]
kind = "gpt"
n_layer = 1
n_head = 2
n_embd = 16
block_size = 8
dropout = 0.0  # dropout draws from the global torch RNG, shared by the rank threads
[optim]
warmup_steps = 2
[parallel]
zero_stage = {stage}
bucket_mb = 0.01
[checkpoint]
dir = "{}"
every = 4
keep_last = 5
async = true
"#,
        dir.display()
    );
    JobConfig::from_toml_str(&text, "resume-test.toml", &[]).unwrap()
}

/// Runs `job` on `world` threads; returns rank 0's summary.
fn run_world(job: &JobConfig, world: usize, resume: &Resume) -> Summary {
    let handles: Vec<_> = Communicator::mem_group(world)
        .into_iter()
        .map(|comm| {
            let (job, resume) = (job.clone(), resume.clone());
            std::thread::spawn(move || {
                let env = WorkerEnv {
                    rank: comm.rank(),
                    local_rank: comm.rank(),
                    world,
                    local_world: world,
                    resume: Some(resume),
                    ..WorkerEnv::default()
                };
                run(&job, &env, comm).unwrap()
            })
        })
        .collect();
    let mut summaries: Vec<Summary> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    summaries.remove(0)
}

fn step_dir(root: &Path, step: u64) -> std::path::PathBuf {
    root.join(cohort_checkpoint::format::step_dir_name(step))
}

#[test]
fn resuming_on_the_same_world_continues_bit_for_bit() {
    for stage in [0, 2] {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let straight = run_world(&job(&a, 8, stage), 2, &Resume::Never);
        assert_eq!(straight.steps, 8);
        let resumed = run_world(&job(&b, 8, stage), 2, &Resume::Path(step_dir(&a, 4)));
        assert_eq!(resumed.resumed_from, Some(step_dir(&a, 4)));
        assert_eq!(resumed.final_loss, straight.final_loss, "stage {stage}");
        for rank in 0..2 {
            let (ma, sa) = cohort_checkpoint::load(&step_dir(&a, 8), rank, 2).unwrap();
            let (mb, sb) = cohort_checkpoint::load(&step_dir(&b, 8), rank, 2).unwrap();
            assert_eq!(
                sa, sb,
                "stage {stage} rank {rank}: parameters or optimizer state differ"
            );
            assert_eq!(ma.train_state, mb.train_state);
        }
    }
}

#[test]
fn a_checkpoint_resumes_on_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run_world(&job(&a, 4, 1), 2, &Resume::Never);
    // Auto: finds a/step-4 by itself when the directory is the same.
    let again = run_world(&job(&a, 6, 1), 3, &Resume::Auto);
    assert_eq!(again.resumed_from, Some(step_dir(&a, 4)));
    assert_eq!(again.steps, 6);
    // Parameters saved by 2 ranks are the same ones 3 ranks start from:
    // compare the whole flat space of step 4 read at both world sizes.
    let whole = |world: usize| -> Vec<f32> {
        (0..world)
            .flat_map(|r| {
                cohort_checkpoint::load(&step_dir(&a, 4), r, world)
                    .unwrap()
                    .1
                    .params
            })
            .collect()
    };
    assert_eq!(whole(2), whole(3));
    let fresh = run_world(&job(&b, 2, 1), 1, &Resume::Auto);
    assert_eq!(fresh.resumed_from, None);
    assert!(fresh.final_loss.unwrap().is_finite());
}
