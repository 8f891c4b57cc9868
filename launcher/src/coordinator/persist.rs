//! `cohort coordinator --state-dir DIR`: the job's durable state
//! ([`CoordinatorState`]) in `DIR/coordinator.state`, rewritten whole after
//! every change (a temporary file, fsync, rename, fsync of the directory),
//! so a coordinator killed at any point and restarted on the same address
//! finds either the state before a change or the state after it.
//!
//! The file: a magic line, the payload's length (8 bytes, little endian),
//! the payload (protobuf), its SHA-256. Anything else is refused with the
//! file's name, never taken for an empty job.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cohort_proto::v1::CoordinatorState;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::LauncherError;

/// What a user can do about a state file this coordinator can't carry on.
pub const CANNOT_CARRY_ON: &str = "this coordinator can't carry on that job: pass the --state-dir \
     (and --token) the job's coordinator was started with, or move the file away to start a new job";

const MAGIC: &[u8] = b"cohort coordinator state v1\n";
const FILE: &str = "coordinator.state";

/// The state file of one coordinator.
pub struct StateFile {
    path: PathBuf,
    /// The payload last written (an unchanged state is not written again),
    /// and whether the last write failed (said once per failing streak).
    last: Mutex<(Vec<u8>, bool)>,
}

impl StateFile {
    /// Opens `dir` (created if missing) and reads the state a coordinator
    /// saved there, if any.
    pub fn open(dir: &Path) -> Result<(Self, Option<CoordinatorState>), LauncherError> {
        let io = |path: &Path, source| LauncherError::Io {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| LauncherError::StateFile {
            path: dir.to_owned(),
            reason: format!(
                "cannot create the state directory: {e}; give --state-dir a directory this user can write"
            ),
        })?;
        let path = dir.join(FILE);
        let saved = match std::fs::read(&path) {
            Ok(bytes) => Some(decode(&bytes).map_err(|reason| LauncherError::StateFile {
                path: path.clone(),
                reason: format!("{reason}; {CANNOT_CARRY_ON}"),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&path, e)),
        };
        let last = saved
            .as_ref()
            .map(Message::encode_to_vec)
            .unwrap_or_default();
        Ok((
            Self {
                path,
                last: Mutex::new((last, false)),
            },
            saved,
        ))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `state` if it changed. A failed write is logged (the job goes
    /// on; a restart would find the state before it) and tried again at the
    /// next change.
    pub fn save(&self, state: &CoordinatorState) {
        let payload = state.encode_to_vec();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.0 == payload {
            return;
        }
        match self.write(&payload) {
            Ok(()) => {
                if last.1 {
                    tracing::warn!("saved the job's state to {} again", self.path.display());
                }
                *last = (payload, false);
            }
            Err(e) => {
                if !last.1 {
                    tracing::error!(
                        "cannot save the job's state to {}: {e}; a coordinator restarted now \
                         would carry on from the last state saved",
                        self.path.display()
                    );
                }
                last.1 = true;
            }
        }
    }

    /// Writes `state` now, failing if it can't be written (a new job's
    /// first state: a state directory that can't be written is found at
    /// start, not when the job needs it).
    pub fn save_first(&self, state: &CoordinatorState) -> std::io::Result<()> {
        let payload = state.encode_to_vec();
        self.write(&payload)?;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = (payload, false);
        Ok(())
    }

    fn write(&self, payload: &[u8]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("state.tmp");
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&encode(payload))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + payload.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&Sha256::digest(payload));
    out
}

fn decode(bytes: &[u8]) -> Result<CoordinatorState, String> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("not a cohort coordinator state file (its first line is not the format's)")?;
    let (len, rest) = rest
        .split_first_chunk::<8>()
        .ok_or("cut short before the payload's length")?;
    let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| "a length out of range")?;
    if rest.len() != len.saturating_add(32) {
        return Err(format!(
            "{} bytes after the header where the payload and its checksum need {}",
            rest.len(),
            len.saturating_add(32)
        ));
    }
    let (payload, sum) = rest.split_at(len);
    if Sha256::digest(payload).as_slice() != sum {
        return Err("its checksum does not match its contents".to_owned());
    }
    CoordinatorState::decode(payload).map_err(|e| format!("its contents do not decode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> CoordinatorState {
        CoordinatorState {
            token: "t".into(),
            job_id: Some("job".into()),
            generation: 3,
            restart_count: 2,
            ..CoordinatorState::default()
        }
    }

    #[test]
    fn a_saved_state_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (file, saved) = StateFile::open(dir.path()).unwrap();
        assert!(saved.is_none());
        file.save(&state());
        let (_, saved) = StateFile::open(dir.path()).unwrap();
        assert_eq!(saved, Some(state()));
        let mode = std::fs::metadata(dir.path().join(FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        assert!(!dir.path().join("coordinator.state.tmp").exists());
    }

    #[test]
    fn a_damaged_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = StateFile::open(dir.path()).unwrap();
        file.save(&state());
        let path = dir.path().join(FILE);
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        flipped[MAGIC.len() + 9] ^= 1;
        for (bytes, why) in [
            (b"garbage".to_vec(), "not a cohort coordinator state file"),
            (good[..good.len() - 1].to_vec(), "bytes after the header"),
            (flipped, "checksum does not match"),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let err = StateFile::open(dir.path()).err().expect("refused");
            let text = err.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains(why), "{text}");
            assert!(err.is_usage(), "{text}");
        }
    }
}
