//! What a checkpoint looks like on disk.
//!
//! ```text
//! ROOT/
//!   latest                        "step-00000020\n", replaced atomically after each commit
//!   step-00000020/
//!     manifest.json               Manifest: layout, shard ranges, crc32c per file, train_state, config
//!     rank-00000.safetensors      tensors "params" and one per state name, 1-D f32 over rank 0's range
//!     rank-00001.safetensors
//!   .partial-step-00000030/       a save in progress: shards + per-rank done-records, no manifest yet
//! ```
//!
//! Shard files are plain safetensors (`safetensors.torch.load_file` reads
//! them); the shard's range is also in the header's `__metadata__`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use serde::{Deserialize, Serialize};

use crate::CkptError;

#[cfg(target_endian = "big")]
compile_error!("checkpoint shards are little-endian f32 bytes written straight from memory");

/// `format` field of every manifest.
pub const FORMAT_NAME: &str = "cohort-checkpoint";
/// The manifest version this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The name of the params tensor in every shard file.
pub const PARAMS_TENSOR: &str = "params";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const LATEST_FILE: &str = "latest";

/// Bytes checksummed and then handed to one `write` call at a time: small
/// enough to still be in cache when `write` copies them, large enough that
/// syscalls cost nothing (measured in bench/ckpt_save.sh on tmpfs: 16 MiB
/// chunks ran at 0.77x of dd from /dev/zero, 256 KiB at 0.85x).
const WRITE_CHUNK: usize = 256 << 10;

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

pub fn partial_dir_name(step: u64) -> String {
    format!(".partial-step-{step:08}")
}

pub fn shard_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

pub fn done_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.done.json")
}

/// The step of a committed step directory name (`step-` and at least 8 digits).
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    parse_digits(name.strip_prefix("step-")?)
}

/// The step of a partial directory name.
pub fn parse_partial_dir_name(name: &str) -> Option<u64> {
    parse_digits(name.strip_prefix(".partial-step-")?)
}

fn parse_digits(digits: &str) -> Option<u64> {
    if digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

/// One parameter as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// First element in the flat parameter space.
    pub offset: usize,
    pub numel: usize,
}

/// One rank's shard file as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub rank: usize,
    pub file: String,
    /// Elements `start..end` of the flat space (params and every state).
    pub start: usize,
    pub end: usize,
    pub bytes: u64,
    pub crc32c: u32,
}

impl ShardEntry {
    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }
}

/// `manifest.json`: everything needed to load a step, written last by rank 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub step: u64,
    pub world: usize,
    pub zero_stage: u8,
    /// Element type of params and states ("F32").
    pub dtype: String,
    /// Elements of the flat parameter space.
    pub total: usize,
    pub layout: Vec<LayoutEntry>,
    pub state_names: Vec<String>,
    pub shards: Vec<ShardEntry>,
    /// Data-loader position, RNG states, LR schedule: opaque here.
    pub train_state: serde_json::Value,
    /// The resolved job config.
    pub config_toml: String,
}

impl Manifest {
    /// Reads and checks `step_dir/manifest.json`.
    pub fn read(step_dir: &Path) -> Result<Manifest, CkptError> {
        let path = step_dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CkptError::Manifest {
                    path,
                    detail: "the file does not exist (the step was never committed, or the manifest was deleted)".into(),
                });
            }
            Err(e) => return Err(CkptError::io("read", path)(e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| CkptError::Manifest {
                path: path.clone(),
                detail: format!("not a valid manifest ({e}); the file is truncated or corrupt"),
            })?;
        manifest
            .check()
            .map_err(|detail| CkptError::Manifest { path, detail })?;
        Ok(manifest)
    }

    /// Internal consistency: shard ranges tile the flat space the way
    /// `shard_range` does, layout entries lie inside it, names are usable.
    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT_NAME {
            return Err(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                self.format
            ));
        }
        if self.format_version == 0 || self.format_version > FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this build reads 1..={FORMAT_VERSION}); use a newer cohort",
                self.format_version
            ));
        }
        if self.dtype != "F32" {
            return Err(format!(
                "dtype {:?} is not supported (only F32)",
                self.dtype
            ));
        }
        if self.world == 0 || self.shards.len() != self.world {
            return Err(format!(
                "world size {} but {} shard entries",
                self.world,
                self.shards.len()
            ));
        }
        for (rank, shard) in self.shards.iter().enumerate() {
            let want = cohort_contract::shard_range(self.total, self.world, rank);
            if shard.rank != rank || shard.range() != want || shard.file != shard_file_name(rank) {
                return Err(format!(
                    "shard entry {rank} is rank {} file {:?} range {:?}, expected rank {rank} file {:?} range {want:?}",
                    shard.rank,
                    shard.file,
                    shard.range(),
                    shard_file_name(rank)
                ));
            }
        }
        check_state_names(&self.state_names)?;
        for p in &self.layout {
            let numel = numel(&p.shape)
                .ok_or_else(|| format!("parameter {:?}: shape {:?} overflows", p.name, p.shape))?;
            if p.numel != numel || p.dtype != "F32" {
                return Err(format!(
                    "parameter {:?}: numel {} dtype {:?} disagree with shape {:?} (expected numel {numel}, dtype \"F32\")",
                    p.name, p.numel, p.dtype, p.shape
                ));
            }
        }
        check_layout(
            self.layout
                .iter()
                .map(|p| (p.name.as_str(), p.offset, p.numel)),
            self.total,
        )
    }
}

/// Product of a shape's dimensions, `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// State names become tensor names beside `params`.
pub fn check_state_names(names: &[String]) -> Result<(), String> {
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || name == PARAMS_TENSOR || name.starts_with("__") {
            return Err(format!(
                "state name {name:?} is not allowed (empty, \"params\" or starting with \"__\")"
            ));
        }
        if names[..i].contains(name) {
            return Err(format!("state name {name:?} appears twice"));
        }
    }
    Ok(())
}

/// Every parameter lies inside `0..total` and names are unique.
pub fn check_layout<'a>(
    params: impl Iterator<Item = (&'a str, usize, usize)>,
    total: usize,
) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for (name, offset, numel) in params {
        if !seen.insert(name) {
            return Err(format!("parameter {name:?} appears twice in the layout"));
        }
        if offset.checked_add(numel).is_none_or(|end| end > total) {
            return Err(format!(
                "parameter {name:?} at offset {offset} with {numel} elements ends past the flat space of {total} elements"
            ));
        }
    }
    Ok(())
}

/// Written by each rank into the partial directory once its shard is durable;
/// rank 0 commits when it has one from every rank of the same attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneRecord {
    pub rank: usize,
    pub world: usize,
    pub step: u64,
    pub start: usize,
    pub end: usize,
    pub bytes: u64,
    pub crc32c: u32,
    /// Identifies the job attempt (job id, generation, restart count), so a
    /// record left by a crashed earlier attempt of the same step is ignored.
    pub attempt: String,
}

/// Size and checksum of a file just written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub crc32c: u32,
}

/// Writes a safetensors file of 1-D-or-shaped f32 tensors straight from the
/// slices (no conversion, no copy), checksumming as it goes, and fsyncs it
/// once. `tensors` are laid out in the given order.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<Written, CkptError> {
    let bad = |detail: String| CkptError::BadShardFile {
        file: path.to_path_buf(),
        detail,
    };
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for &(name, shape, data) in tensors {
        if numel(shape) != Some(data.len()) {
            return Err(bad(format!(
                "tensor {name:?}: shape {shape:?} does not hold {} elements",
                data.len()
            )));
        }
        let end = offset + std::mem::size_of_val(data);
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype: Dtype::F32,
                shape: shape.to_vec(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let header = Metadata::new(metadata, infos).map_err(|e| bad(format!("header: {e}")))?;
    // Through a JSON value, whose objects keep their keys sorted: the
    // header's metadata is a HashMap, and the same checkpoint must export to
    // the same bytes every time.
    let mut header = serde_json::to_value(&header)
        .and_then(|v| serde_json::to_vec(&v))
        .map_err(|e| bad(format!("header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut file = File::create(path).map_err(CkptError::io("create", path))?;
    let mut crc = 0u32;
    let mut put = |bytes: &[u8]| -> Result<(), CkptError> {
        for chunk in bytes.chunks(WRITE_CHUNK) {
            crc = crc32c::crc32c_append(crc, chunk);
            file.write_all(chunk)
                .map_err(CkptError::io("write", path))?;
        }
        Ok(())
    };
    put(&(header.len() as u64).to_le_bytes())?;
    put(&header)?;
    for &(_, _, data) in tensors {
        put(bytemuck::cast_slice(data))?;
    }
    file.sync_all().map_err(CkptError::io("fsync", path))?;
    Ok(Written {
        bytes: (8 + header.len() + offset) as u64,
        crc32c: crc,
    })
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename.
/// The caller fsyncs the parent directory.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), CkptError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp).map_err(CkptError::io("create", &tmp))?;
    file.write_all(bytes)
        .map_err(CkptError::io("write", &tmp))?;
    file.sync_all().map_err(CkptError::io("fsync", &tmp))?;
    fs::rename(&tmp, path).map_err(CkptError::io("rename into place", path))
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn fsync_dir(dir: &Path) -> Result<(), CkptError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(CkptError::io("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(step_dir_name(20), "step-00000020");
        assert_eq!(parse_step_dir_name("step-00000020"), Some(20));
        assert_eq!(parse_step_dir_name("step-123456789"), Some(123_456_789));
        assert_eq!(parse_step_dir_name("step-20"), None);
        assert_eq!(parse_step_dir_name("step-0000002x"), None);
        assert_eq!(parse_partial_dir_name(&partial_dir_name(7)), Some(7));
        assert_eq!(shard_file_name(3), "rank-00003.safetensors");
    }

    #[test]
    fn written_file_is_valid_safetensors_with_the_recorded_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = [1.0f32, -2.5, 3.25];
        let b = [0.5f32; 4];
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let w =
            write_safetensors(&path, &[("a", &[3], &a), ("b", &[2, 2], &b)], Some(meta)).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(w.bytes, bytes.len() as u64);
        assert_eq!(w.crc32c, crc32c::crc32c(&bytes));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("b").unwrap();
        assert_eq!(t.shape(), &[2, 2]);
        assert_eq!(t.data(), bytemuck::cast_slice::<f32, u8>(&b));
        assert_eq!(
            st.tensor("a").unwrap().data(),
            bytemuck::cast_slice::<f32, u8>(&a)
        );
    }

    #[test]
    fn shape_that_does_not_match_the_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            write_safetensors(&dir.path().join("x"), &[("a", &[2], &[1.0])], None).unwrap_err();
        assert!(
            err.to_string().contains("does not hold 1 elements"),
            "{err}"
        );
    }

    #[test]
    fn layout_checks_name_the_parameter() {
        let err = check_layout([("w", 0, 4), ("b", 4, 2)].into_iter(), 5).unwrap_err();
        assert!(err.contains("\"b\""), "{err}");
        let err = check_layout([("w", 0, 1), ("w", 1, 1)].into_iter(), 5).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        assert!(check_state_names(&["params".into()]).is_err());
        assert!(check_state_names(&["m".into(), "m".into()]).is_err());
    }
}
