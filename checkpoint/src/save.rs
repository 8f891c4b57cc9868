//! Writing a step: each rank's shard, then rank 0's commit.
//!
//! The commit protocol, and why a crash anywhere leaves the previous step
//! loadable:
//!
//! 1. Every rank writes `ROOT/.partial-step-N/rank-R.safetensors` and fsyncs
//!    it, then writes `rank-R.done.json` (its size and crc32c) through a
//!    temporary file + fsync + rename, and fsyncs the directory. A record
//!    exists only for a shard that is durable.
//! 2. Rank 0 polls for all `world` records until `commit_timeout`, checks
//!    them, writes `manifest.json` and fsyncs it and the directory.
//! 3. Rank 0 renames `.partial-step-N` to `step-N` (atomic) and fsyncs ROOT.
//!    Loaders ignore `.partial-*`, so until this rename the new step does not
//!    exist for them.
//! 4. Rank 0 replaces `ROOT/latest` (temporary file + fsync + rename) and
//!    fsyncs ROOT, then prunes committed steps beyond `keep_last` and
//!    partial directories of older steps (left by crashed saves).
//!
//! Ranks coordinate only through ROOT, so ROOT must be storage every rank
//! sees.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::format::{
    self, DoneRecord, FORMAT_NAME, FORMAT_VERSION, LATEST_FILE, LayoutEntry, MANIFEST_FILE,
    Manifest, PARAMS_TENSOR, ShardEntry,
};
use crate::lease::{self, Lease};
use crate::{CkptError, Meta, Shard};

/// How a [`Saver`] behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaverOptions {
    /// Committed steps to keep; older ones are deleted after each commit.
    /// 0 keeps every step.
    pub keep_last: usize,
    /// Write on a background thread: `save` returns once the data is handed
    /// over.
    pub async_save: bool,
    /// How long rank 0 waits for the other ranks' shards before giving up on
    /// committing a step.
    pub commit_timeout: Duration,
    /// Names this attempt of the job, the same on every rank of it (the
    /// worker env's `attempt()`), so a shard record that a crashed earlier
    /// attempt left for the same step is not taken for this one's.
    pub attempt: String,
    /// A recovery drill (`COHORT_INJECT_FAULT=rank=R,step=S,at=commit`):
    /// abort the process after writing this rank's shard of this step,
    /// before the step is committed.
    pub abort_before_commit: Option<u64>,
}

impl Default for SaverOptions {
    fn default() -> Self {
        SaverOptions {
            keep_last: 3,
            async_save: true,
            commit_timeout: Duration::from_secs(600),
            attempt: String::new(),
            abort_before_commit: None,
        }
    }
}

/// Writes one rank's part of each checkpoint; on rank 0 it also commits.
pub struct Saver {
    writer: Writer,
    /// The background thread (async saves only).
    worker: Option<Worker>,
    /// The result of the save in flight, if any.
    in_flight: Option<mpsc::Receiver<Result<(), CkptError>>>,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
}

struct Job {
    meta: Meta,
    shard: Shard,
    result: mpsc::SyncSender<Result<(), CkptError>>,
}

/// What a save needs besides the data; cloned into the background thread.
#[derive(Clone)]
struct Writer {
    root: PathBuf,
    rank: usize,
    world: usize,
    opts: SaverOptions,
    /// Rank 0's lease on the root.
    lease: Option<Lease>,
}

impl Saver {
    /// Creates `root` if needed and checks that it is writable, so a bad
    /// checkpoint directory fails before training starts.
    pub fn new(
        root: &Path,
        rank: usize,
        world: usize,
        opts: SaverOptions,
    ) -> Result<Saver, CkptError> {
        if world == 0 || rank >= world {
            return Err(CkptError::Invalid(format!(
                "rank {rank} of world {world}: need 0 <= rank < world"
            )));
        }
        if opts.commit_timeout.is_zero() {
            return Err(CkptError::Invalid("commit_timeout must be positive".into()));
        }
        check_writable(root, rank)?;
        // Rank 0 commits: it holds the root's lease (fencing).
        let lease = if rank == 0 {
            let mine = Lease::mine(&opts.attempt);
            lease::acquire(root, &mine)?;
            repair_latest(root)?;
            Some(mine)
        } else {
            None
        };
        let writer = Writer {
            root: root.to_path_buf(),
            rank,
            world,
            opts,
            lease,
        };
        let worker = if writer.opts.async_save {
            let (jobs, rx) = mpsc::channel::<Job>();
            let w = writer.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ckpt-writer-{rank}"))
                .spawn(move || {
                    for job in rx {
                        let result = w.write(job.meta, job.shard);
                        // The receiver is gone only if the Saver was dropped
                        // mid-wait; nothing is left to tell.
                        let _ = job.result.send(result);
                    }
                })
                .map_err(CkptError::io(
                    "spawn the checkpoint writer thread for",
                    root,
                ))?;
            Some(Worker { jobs, thread })
        } else {
            None
        };
        Ok(Saver {
            writer,
            worker,
            in_flight: None,
        })
    }

    /// Saves this rank's shard of step `meta.step`. Synchronous: returns when
    /// the shard is durable (rank 0: when the step is committed).
    /// Asynchronous: first waits for the save in flight, if any, and returns
    /// its error; then hands the data to the writer thread and returns.
    pub fn save(&mut self, meta: Meta, shard: Shard) -> Result<(), CkptError> {
        self.writer.check(&meta, &shard)?;
        self.finish()?;
        let Some(worker) = &self.worker else {
            return self.writer.write(meta, shard);
        };
        let (result, rx) = mpsc::sync_channel(1);
        worker
            .jobs
            .send(Job {
                meta,
                shard,
                result,
            })
            .map_err(|_| CkptError::WriterDied)?;
        self.in_flight = Some(rx);
        Ok(())
    }

    /// Waits for the save in flight (rank 0: for its commit) and returns its
    /// result. Call before exiting.
    pub fn finish(&mut self) -> Result<(), CkptError> {
        match self.in_flight.take() {
            Some(rx) => rx.recv().unwrap_or(Err(CkptError::WriterDied)),
            None => Ok(()),
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!("checkpoint save failed: {e}");
        }
        if let Some(worker) = self.worker.take() {
            drop(worker.jobs);
            let _ = worker.thread.join();
        }
        if let Some(mine) = &self.writer.lease {
            lease::release(&self.writer.root, mine);
        }
    }
}

fn check_writable(root: &Path, rank: usize) -> Result<(), CkptError> {
    let not_writable = |error| CkptError::NotWritable {
        root: root.to_path_buf(),
        error,
    };
    fs::create_dir_all(root).map_err(not_writable)?;
    let probe = root.join(format!(".write-probe-{rank}-{}", std::process::id()));
    if let Err(e) = fs::write(&probe, b"cohort") {
        // A full disk can fail the write after creating the file.
        let _ = fs::remove_file(&probe);
        return Err(not_writable(e));
    }
    fs::remove_file(&probe).map_err(not_writable)
}

/// A `latest` that names no committed step (garbage, a step since removed)
/// is rewritten to the newest committed step at start, so a job that
/// resumes at its final step, and so commits nothing, still leaves a good
/// one (loaders already fall back to the newest step, with a warning).
fn repair_latest(root: &Path) -> Result<(), CkptError> {
    if let Some(dir) = crate::latest_needs_repair(root)? {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        format::write_file_atomic(&root.join(LATEST_FILE), format!("{name}\n").as_bytes())?;
        format::fsync_dir(root)?;
        tracing::warn!(
            "rewrote {} to name {name}",
            root.join(LATEST_FILE).display()
        );
    }
    Ok(())
}

impl Writer {
    /// Everything `save` can reject before any I/O.
    fn check(&self, meta: &Meta, shard: &Shard) -> Result<(), CkptError> {
        let invalid = |s: String| Err(CkptError::Invalid(s));
        if meta.world != self.world {
            return invalid(format!(
                "meta.world is {} but this Saver is for world {}",
                meta.world, self.world
            ));
        }
        let want = cohort_contract::shard_range(meta.total, self.world, self.rank);
        if shard.range != want {
            return invalid(format!(
                "rank {} of {} owns elements {want:?} of {}, the shard covers {:?}",
                self.rank, self.world, meta.total, shard.range
            ));
        }
        if shard.params.len() != want.len() {
            return invalid(format!(
                "shard has {} params for range {want:?} ({} elements)",
                shard.params.len(),
                want.len()
            ));
        }
        if shard.states.len() != meta.state_names.len() {
            return invalid(format!(
                "shard has {} state vectors, meta names {} ({:?})",
                shard.states.len(),
                meta.state_names.len(),
                meta.state_names
            ));
        }
        for (name, state) in meta.state_names.iter().zip(&shard.states) {
            if state.len() != want.len() {
                return invalid(format!(
                    "state {name:?} has {} elements, the range {want:?} has {}",
                    state.len(),
                    want.len()
                ));
            }
        }
        format::check_state_names(&meta.state_names).or_else(invalid)?;
        for p in &meta.layout {
            if format::numel(&p.shape).is_none() {
                return invalid(format!(
                    "parameter {:?}: shape {:?} overflows",
                    p.name, p.shape
                ));
            }
        }
        format::check_layout(
            meta.layout
                .iter()
                .map(|p| (p.name.as_str(), p.offset, p.numel())),
            meta.total,
        )
        .or_else(invalid)
    }

    /// Steps 1 to 4 of the protocol for this rank; a failed save removes
    /// what it wrote (rank 0, whose commit failed: the whole partial
    /// directory), so failures leave no `.partial-step-*` behind.
    fn write(&self, meta: Meta, shard: Shard) -> Result<(), CkptError> {
        let partial = self.root.join(format::partial_dir_name(meta.step));
        let result = self.write_steps(meta, shard, &partial);
        if result.is_err() {
            if self.rank == 0 {
                let _ = fs::remove_dir_all(&partial);
            } else {
                let _ = fs::remove_file(partial.join(format::shard_file_name(self.rank)));
                let _ = fs::remove_file(partial.join(format::done_file_name(self.rank)));
                // Only once the other ranks' files are gone too.
                let _ = fs::remove_dir(&partial);
            }
        }
        result
    }

    fn write_steps(&self, meta: Meta, shard: Shard, partial: &Path) -> Result<(), CkptError> {
        let partial = partial.to_path_buf();
        fs::create_dir_all(&partial).map_err(CkptError::io("create", &partial))?;
        let done_path = partial.join(format::done_file_name(self.rank));
        // A record left by a crashed earlier save of this step must not
        // vouch for the shard about to be rewritten.
        match fs::remove_file(&done_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CkptError::io("remove stale", &done_path)(e));
            }
            _ => {}
        }

        let shard_path = partial.join(format::shard_file_name(self.rank));
        let len = shard.range.len();
        let mut tensors: Vec<(&str, &[usize], &[f32])> = Vec::with_capacity(1 + shard.states.len());
        let shape = [len];
        tensors.push((PARAMS_TENSOR, &shape, &shard.params));
        for (name, state) in meta.state_names.iter().zip(&shard.states) {
            tensors.push((name, &shape, state));
        }
        let header_meta = [
            ("format", FORMAT_NAME.to_string()),
            ("step", meta.step.to_string()),
            ("rank", self.rank.to_string()),
            ("world", self.world.to_string()),
            ("start", shard.range.start.to_string()),
            ("end", shard.range.end.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let written = format::write_safetensors(&shard_path, &tensors, Some(header_meta))?;
        drop(shard);

        if self.opts.abort_before_commit == Some(meta.step) {
            eprintln!(
                "injected fault: rank {} aborting after writing its shard of step {}, before the commit",
                self.rank, meta.step
            );
            std::process::abort();
        }

        let record = DoneRecord {
            rank: self.rank,
            world: self.world,
            step: meta.step,
            start: meta_range(&meta, self.rank).start,
            end: meta_range(&meta, self.rank).end,
            bytes: written.bytes,
            crc32c: written.crc32c,
            attempt: self.opts.attempt.clone(),
        };
        let json = serde_json::to_vec(&record).expect("a DoneRecord always serializes");
        // The directory is opened before the record is published: once rank 0
        // sees every record it may rename the directory into place, and this
        // handle still reaches it (a path would name nothing by then).
        let dir = fs::File::open(&partial).map_err(CkptError::io("open directory", &partial))?;
        format::write_file_atomic(&done_path, &json)?;
        #[cfg(test)]
        tests::after_record(self.rank);
        dir.sync_all()
            .map_err(CkptError::io("fsync directory", &partial))?;
        drop(dir);

        if self.rank == 0 {
            self.commit(meta, &partial)?;
        }
        Ok(())
    }

    /// Rank 0: steps 2 to 4.
    fn commit(&self, meta: Meta, partial: &Path) -> Result<(), CkptError> {
        let records = self.wait_for_records(&meta, partial)?;
        let mut shards = Vec::with_capacity(self.world);
        for r in records {
            let file = partial.join(format::shard_file_name(r.rank));
            let actual = fs::metadata(&file)
                .map_err(CkptError::io("stat", &file))?
                .len();
            if actual != r.bytes {
                return Err(CkptError::SizeMismatch {
                    file,
                    expected: r.bytes,
                    actual,
                });
            }
            shards.push(ShardEntry {
                rank: r.rank,
                file: format::shard_file_name(r.rank),
                start: r.start,
                end: r.end,
                bytes: r.bytes,
                crc32c: r.crc32c,
            });
        }
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            step: meta.step,
            world: self.world,
            zero_stage: meta.zero_stage,
            dtype: "F32".into(),
            total: meta.total,
            layout: meta
                .layout
                .iter()
                .map(|p| LayoutEntry {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    dtype: "F32".into(),
                    offset: p.offset,
                    numel: p.numel(),
                })
                .collect(),
            state_names: meta.state_names,
            shards,
            train_state: meta.train_state,
            config_toml: meta.config_toml,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a Manifest always serializes");
        format::write_file_atomic(&partial.join(MANIFEST_FILE), &json)?;
        for rank in 0..self.world {
            let done = partial.join(format::done_file_name(rank));
            fs::remove_file(&done).map_err(CkptError::io("remove", &done))?;
        }
        format::fsync_dir(partial)?;

        if let Some(mine) = &self.lease {
            lease::check_and_renew(&self.root, mine)?;
        }
        let name = format::step_dir_name(meta.step);
        let final_dir = self.root.join(&name);
        if final_dir.exists() {
            // The same step saved again (e.g. after resuming from it): the new
            // one replaces it. Until the rename below, loaders fall back to
            // the step before.
            tracing::warn!("replacing existing checkpoint {}", final_dir.display());
            fs::remove_dir_all(&final_dir).map_err(CkptError::io("remove", &final_dir))?;
        }
        fs::rename(partial, &final_dir).map_err(CkptError::io("rename into place", &final_dir))?;
        format::fsync_dir(&self.root)?;
        format::write_file_atomic(&self.root.join(LATEST_FILE), format!("{name}\n").as_bytes())?;
        format::fsync_dir(&self.root)?;
        tracing::info!("checkpoint {} committed", final_dir.display());
        self.prune(meta.step)
    }

    /// Polls the partial directory for a done-record of every rank of this
    /// attempt, until `commit_timeout`.
    fn wait_for_records(&self, meta: &Meta, partial: &Path) -> Result<Vec<DoneRecord>, CkptError> {
        let deadline = Instant::now() + self.opts.commit_timeout;
        let mut records: Vec<Option<DoneRecord>> = vec![None; self.world];
        let mut pause = Duration::from_millis(1);
        loop {
            for (rank, slot) in records.iter_mut().enumerate().filter(|(_, s)| s.is_none()) {
                *slot = self.read_record(meta, partial, rank)?;
            }
            let missing: Vec<usize> = (0..self.world).filter(|&r| records[r].is_none()).collect();
            if missing.is_empty() {
                return Ok(records.into_iter().flatten().collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CkptError::CommitTimeout {
                    dir: partial.to_path_buf(),
                    missing,
                    timeout: self.opts.commit_timeout,
                });
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Rank `rank`'s record for this step and attempt, if it is there yet.
    fn read_record(
        &self,
        meta: &Meta,
        partial: &Path,
        rank: usize,
    ) -> Result<Option<DoneRecord>, CkptError> {
        let path = partial.join(format::done_file_name(rank));
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CkptError::io("read", &path)(e)),
        };
        let bad = |detail: String| CkptError::BadShardFile {
            file: path.clone(),
            detail,
        };
        let record: DoneRecord = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("unreadable done-record: {e}")))?;
        if record.attempt != self.opts.attempt {
            // Left by an earlier attempt that crashed; this rank has not
            // finished yet in this attempt.
            return Ok(None);
        }
        let want = meta_range(meta, rank);
        if record.rank != rank
            || record.world != self.world
            || record.step != meta.step
            || (record.start..record.end) != want
        {
            return Err(bad(format!(
                "rank {} of world {} step {} range {:?}, expected rank {rank} of world {} step {} range {want:?}; do all ranks save the same step with the same model?",
                record.rank,
                record.world,
                record.step,
                record.start..record.end,
                self.world,
                meta.step
            )));
        }
        Ok(Some(record))
    }

    /// After committing `step`: keep the newest `keep_last` committed steps
    /// up to `step`, and remove partial directories of older steps.
    fn prune(&self, step: u64) -> Result<(), CkptError> {
        let entries = fs::read_dir(&self.root).map_err(CkptError::io("list", &self.root))?;
        let mut committed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(CkptError::io("list", &self.root))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(s) = format::parse_step_dir_name(name) {
                if s > step {
                    tracing::warn!(
                        "checkpoint {} is newer than the step just committed ({step}); it is from an earlier run and resuming would pick it: delete it if it is not wanted",
                        entry.path().display()
                    );
                } else {
                    committed.push((s, entry.path()));
                }
            } else if format::parse_partial_dir_name(name).is_some_and(|s| s < step) {
                remove_dir(&entry.path())?;
            }
        }
        if self.opts.keep_last > 0 {
            committed.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
            for (_, dir) in committed.iter().skip(self.opts.keep_last) {
                remove_dir(dir)?;
            }
        }
        Ok(())
    }
}

fn remove_dir(dir: &Path) -> Result<(), CkptError> {
    tracing::debug!("pruning {}", dir.display());
    fs::remove_dir_all(dir).map_err(CkptError::io("remove", dir))
}

fn meta_range(meta: &Meta, rank: usize) -> std::ops::Range<usize> {
    cohort_contract::shard_range(meta.total, meta.world, rank)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::ParamLayout;

    /// The rank that pauses between publishing its record and making it
    /// durable (usize::MAX: none).
    static PAUSING_RANK: AtomicUsize = AtomicUsize::new(usize::MAX);

    pub(super) fn after_record(rank: usize) {
        if PAUSING_RANK.load(Ordering::SeqCst) == rank {
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Rank 0 renames the partial directory into place as soon as the last
    /// record appears; the rank that wrote it may still be making it
    /// durable, and must not fail because the directory has moved.
    #[test]
    fn a_record_made_durable_after_rank_0_committed_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let layout = vec![ParamLayout {
            name: "w".into(),
            shape: vec![8],
            offset: 0,
        }];
        let meta = Meta {
            step: 1,
            world: 2,
            zero_stage: 1,
            total: 8,
            layout,
            state_names: vec![],
            train_state: serde_json::json!({}),
            config_toml: String::new(),
        };
        PAUSING_RANK.store(1, Ordering::SeqCst);
        let results: Vec<Result<(), CkptError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let meta = meta.clone();
                    let root = dir.path();
                    s.spawn(move || {
                        let opts = SaverOptions {
                            async_save: false,
                            ..SaverOptions::default()
                        };
                        let mut saver = Saver::new(root, rank, 2, opts)?;
                        let range = cohort_contract::shard_range(8, 2, rank);
                        let shard = Shard {
                            params: vec![rank as f32; range.len()],
                            states: vec![],
                            range,
                        };
                        saver.save(meta, shard)?;
                        saver.finish()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        PAUSING_RANK.store(usize::MAX, Ordering::SeqCst);
        for (rank, r) in results.iter().enumerate() {
            assert!(r.is_ok(), "rank {rank}: {}", r.as_ref().unwrap_err());
        }
        assert!(dir.path().join(format::step_dir_name(1)).is_dir());
    }
}
