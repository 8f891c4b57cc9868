//! The built-in trainer's checkpoints: where a run resumes from, what a
//! checkpoint records besides the shards (the metadata: layout, optimizer
//! state names, data position, the job's config), and when one is saved.

use std::path::PathBuf;
use std::time::Instant;

use cohort_checkpoint::{CkptError, Meta, ParamLayout, Saver, SaverOptions};
use cohort_configs::JobConfig;
use cohort_contract::{FaultPoint, Resume, WorkerEnv, var};
use serde_json::json;

use crate::data::Loader;
use crate::{DataParallel, TrainError};

/// Resumes and saves one rank's part of a job's checkpoints.
pub struct Checkpointer {
    job: JobConfig,
    /// The flat space's parameters, as the checkpoint names them.
    layout: Vec<ParamLayout>,
    /// `None` without `checkpoint.dir` and `checkpoint.every`.
    saver: Option<Saver>,
}

impl Checkpointer {
    /// The checkpointer of `dp`'s rank, after resuming `dp` and `loader`
    /// from the checkpoint `env` asks for (see [`Checkpointer::resume`]);
    /// then its saver (when the job saves) takes `checkpoint.dir` for this
    /// attempt of the job, with the commit-time fault of `env`'s fault
    /// spec, if any. Also returns the path it resumed from.
    pub fn start(
        job: &JobConfig,
        env: &WorkerEnv,
        dp: &mut DataParallel,
        loader: &mut Loader,
    ) -> Result<(Self, Option<PathBuf>), TrainError> {
        let (rank, world) = (dp.rank(), dp.world_size());
        let layout = dp
            .flat()
            .slots()
            .iter()
            .map(|s| ParamLayout {
                name: s.name.clone(),
                shape: s.shape.clone(),
                offset: s.offset,
            })
            .collect();
        let mut ckpt = Checkpointer {
            job: job.clone(),
            layout,
            saver: None,
        };
        let resumed_from = ckpt.resume(env.resume.as_ref().unwrap_or(&Resume::Auto), dp, loader)?;
        let c = &job.checkpoint;
        ckpt.saver = match &c.dir {
            Some(dir) if c.every > 0 => Some(Saver::new(
                dir,
                rank,
                world,
                SaverOptions {
                    keep_last: c.keep_last,
                    async_save: c.async_save,
                    attempt: env.attempt(),
                    abort_before_commit: env
                        .fault()
                        .and_then(|f| f.step_for(rank, FaultPoint::Commit)),
                    ..SaverOptions::default()
                },
            )?),
            _ => None,
        };
        Ok((ckpt, resumed_from))
    }

    /// Loads the checkpoint `resume` names (`auto`: the newest that
    /// verifies under `checkpoint.dir`, if any) into `dp` and `loader`;
    /// the path it resumed from.
    fn resume(
        &self,
        resume: &Resume,
        dp: &mut DataParallel,
        loader: &mut Loader,
    ) -> Result<Option<PathBuf>, TrainError> {
        let path = match (resume, &self.job.checkpoint.dir) {
            (Resume::Never, _) | (Resume::Auto, None) => return Ok(None),
            (Resume::Path(p), _) => p.clone(),
            (Resume::Auto, Some(dir)) if !dir.exists() => return Ok(None),
            (Resume::Auto, Some(dir)) => match cohort_checkpoint::find_resumable(dir)? {
                Some(p) => p,
                None => return Ok(None),
            },
        };
        let (meta, shard) = cohort_checkpoint::load(&path, dp.rank(), dp.world_size())?;
        meta.check_compatible(&self.layout).map_err(|e| match e {
            CkptError::Incompatible { detail } => CkptError::Incompatible {
                detail: format!(
                    "{}: {detail}; resume it with the model config it was saved with, \
                     or start afresh (--resume never, or another checkpoint.dir)",
                    path.display()
                ),
            },
            other => other,
        })?;
        let names: Vec<&str> = meta.state_names.iter().map(String::as_str).collect();
        if names != dp.optimizer_state_names() {
            return Err(TrainError::Config(format!(
                "checkpoint {} holds optimizer state {:?}, but optim.kind = {:?} needs {:?}: resume with the optimizer it was saved with, or set {}=never",
                path.display(),
                names,
                self.job.optim.kind,
                dp.optimizer_state_names(),
                var::RESUME
            )));
        }
        let position = meta
            .train_state
            .get("data_position")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "checkpoint {} has no train_state.data_position: it was not written by cohort's trainer",
                    path.display()
                ))
            })?;
        dp.restore(meta.step, shard.params, shard.states)?;
        loader.set_position(position);
        Ok(Some(path))
    }

    /// Saves the step `dp` has just completed when it is due
    /// (`checkpoint.every`, and the last step); the time the step stalled
    /// for it: with async saves, the copy to host memory and the hand-off
    /// to the writer (or the wait for the previous save still in flight).
    pub fn after_step(
        &mut self,
        dp: &mut DataParallel,
        loader: &Loader,
    ) -> Result<Option<f64>, TrainError> {
        let step = dp.steps_done();
        let (job, layout) = (&self.job, &self.layout);
        let Some(saver) = self.saver.as_mut() else {
            return Ok(None);
        };
        if step % job.checkpoint.every != 0 && step != job.train.max_steps {
            return Ok(None);
        }
        let start = Instant::now();
        let shard = dp.checkpoint_shard()?;
        let meta = Meta {
            step,
            world: dp.world_size(),
            zero_stage: job.parallel.zero_stage.as_u8(),
            total: dp.flat().total(),
            layout: layout.clone(),
            state_names: dp
                .optimizer_state_names()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            train_state: json!({
                "data_position": loader.position(),
                "seed": job.train.seed,
                "rng": "re-seeded every step from (train.seed, step, rank)",
                "lr_schedule": { "step": step, "next_lr": dp.next_lr() },
            }),
            config_toml: job.to_toml_string(),
        };
        saver.save(meta, shard)?;
        Ok(Some(start.elapsed().as_secs_f64()))
    }

    /// Waits for the saves in flight to be written and committed.
    pub fn finish(&mut self) -> Result<(), TrainError> {
        if let Some(saver) = self.saver.as_mut() {
            saver.finish()?;
        }
        Ok(())
    }
}
