//! Reading committed steps: resolve a path, verify checksums, re-slice shards
//! for any world size, export consolidated weights.

use std::collections::HashMap;
use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::format::{self, LATEST_FILE, MANIFEST_FILE, Manifest, PARAMS_TENSOR, ShardEntry};
use crate::{CkptError, Meta, ParamLayout, Shard};

/// The step directory `path` names: `path` itself if it holds
/// `manifest.json`, else the step `path/latest` points to.
pub fn resolve(path: &Path) -> Result<PathBuf, CkptError> {
    let not_ckpt = |detail: String| CkptError::NotACheckpoint {
        path: path.to_path_buf(),
        detail,
    };
    if !path.is_dir() {
        return Err(not_ckpt(if path.exists() {
            "it is not a directory".into()
        } else {
            "it does not exist".into()
        }));
    }
    if path.join(MANIFEST_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(LATEST_FILE);
    if latest.exists() {
        match read_latest(path) {
            Ok(dir) => return Ok(dir),
            Err(why) => match newest_step_dir(path)? {
                Some(dir) => {
                    warn_latest(&why, &dir);
                    return Ok(dir);
                }
                None => return Err(not_ckpt(why)),
            },
        }
    }
    let is_step = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| format::parse_step_dir_name(n).is_some());
    if is_step {
        // Report the missing manifest as such.
        Manifest::read(path)?;
    }
    Err(not_ckpt(format!(
        "it holds neither {MANIFEST_FILE} nor {LATEST_FILE}"
    )))
}

/// The step directory `root/latest` names, or why it names none.
fn read_latest(root: &Path) -> Result<PathBuf, String> {
    let latest = root.join(LATEST_FILE);
    let bytes =
        fs::read(&latest).map_err(|e| format!("{} can't be read ({e})", latest.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let name = text.trim();
    if format::parse_step_dir_name(name).is_none() {
        let shown: String = name.chars().take(40).collect();
        return Err(format!(
            "{} holds {shown:?}, not a step directory name",
            latest.display()
        ));
    }
    let dir = root.join(name);
    if !dir.join(MANIFEST_FILE).exists() {
        return Err(format!(
            "{} points to {name}, which has no {MANIFEST_FILE}",
            latest.display()
        ));
    }
    Ok(dir)
}

fn warn_latest(why: &str, dir: &Path) {
    tracing::warn!(
        "ignoring {why}; using the newest step directory, {} (the next commit rewrites `latest`)",
        dir.display()
    );
}

/// The committed step directories under `root`, newest first.
pub fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>, CkptError> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CkptError::io("list", root)(e)),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(CkptError::io("list", root))?;
        if let Some(step) = entry
            .file_name()
            .to_str()
            .and_then(format::parse_step_dir_name)
        {
            steps.push((step, entry.path()));
        }
    }
    steps.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
    Ok(steps)
}

/// The newest step directory under `root` that has a manifest.
fn newest_step_dir(root: &Path) -> Result<Option<PathBuf>, CkptError> {
    Ok(step_dirs(root)?
        .into_iter()
        .map(|(_, dir)| dir)
        .find(|dir| dir.join(MANIFEST_FILE).exists()))
}

/// When `root/latest` does not name a committed step, the newest committed
/// step it should name (with a warning saying why), so the caller can
/// rewrite it; `None` when `latest` is fine or there is no step.
pub fn latest_needs_repair(root: &Path) -> Result<Option<PathBuf>, CkptError> {
    if !root.join(LATEST_FILE).exists() && step_dirs(root)?.is_empty() {
        return Ok(None);
    }
    let Err(why) = read_latest(root) else {
        return Ok(None);
    };
    Ok(newest_step_dir(root)?.inspect(|dir| warn_latest(&why, dir)))
}

/// The manifest of the step `path` names (see [`resolve`]).
pub fn read_manifest(path: &Path) -> Result<(PathBuf, Manifest), CkptError> {
    let dir = resolve(path)?;
    let manifest = Manifest::read(&dir)?;
    Ok((dir, manifest))
}

/// A shard file checked against its manifest entry: size, crc32c, tensors.
struct OpenShard {
    map: Mmap,
    /// Byte offset of each tensor's data in the file, by name.
    data_start: HashMap<String, usize>,
}

impl OpenShard {
    fn open(dir: &Path, manifest: &Manifest, entry: &ShardEntry) -> Result<OpenShard, CkptError> {
        let path = dir.join(&entry.file);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CkptError::MissingFile { file: path });
            }
            Err(e) => return Err(CkptError::io("open", &path)(e)),
        };
        let actual = file.metadata().map_err(CkptError::io("stat", &path))?.len();
        if actual != entry.bytes {
            return Err(CkptError::SizeMismatch {
                file: path,
                expected: entry.bytes,
                actual,
            });
        }
        // SAFETY: committed checkpoint files are never modified in place (a
        // re-save of a step replaces the whole directory); a file truncated
        // behind our back would fault, which is what reading it would do too.
        let map = unsafe { Mmap::map(&file) }.map_err(CkptError::io("memory-map", &path))?;
        let crc = crc32c::crc32c(&map);
        if crc != entry.crc32c {
            return Err(CkptError::Checksum {
                file: path,
                expected: entry.crc32c,
                actual: crc,
            });
        }
        let bad = |detail: String| CkptError::BadShardFile {
            file: path.clone(),
            detail,
        };
        let (header_len, header) = SafeTensors::read_metadata(&map)
            .map_err(|e| bad(format!("safetensors header: {e}")))?;
        let len = entry.range().len();
        let mut data_start = HashMap::new();
        for name in
            std::iter::once(PARAMS_TENSOR).chain(manifest.state_names.iter().map(String::as_str))
        {
            let info = header
                .info(name)
                .ok_or_else(|| bad(format!("no tensor {name:?}")))?;
            if info.dtype != Dtype::F32 || info.shape != [len] {
                return Err(bad(format!(
                    "tensor {name:?} is {:?} {:?}, expected F32 [{len}]",
                    info.dtype, info.shape
                )));
            }
            data_start.insert(name.to_string(), 8 + header_len + info.data_offsets.0);
        }
        Ok(OpenShard { map, data_start })
    }

    /// Copies elements `want` (flat indices inside this shard's `range`) of
    /// tensor `name` into `out`.
    fn copy(&self, name: &str, range: &Range<usize>, want: &Range<usize>, out: &mut [f32]) {
        let start = self.data_start[name] + (want.start - range.start) * 4;
        let bytes = &self.map[start..start + want.len() * 4];
        bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
    }
}

/// Elements `range` of the flat space, params and (if `with_states`) every
/// state, gathered from the shards that overlap it.
fn read_range(
    dir: &Path,
    manifest: &Manifest,
    range: Range<usize>,
    with_states: bool,
) -> Result<Shard, CkptError> {
    let n_states = if with_states {
        manifest.state_names.len()
    } else {
        0
    };
    let mut params = vec![0f32; range.len()];
    let mut states = vec![vec![0f32; range.len()]; n_states];
    for entry in &manifest.shards {
        let old = entry.range();
        let overlap = old.start.max(range.start)..old.end.min(range.end);
        if overlap.is_empty() {
            continue;
        }
        let shard = OpenShard::open(dir, manifest, entry)?;
        let dst = overlap.start - range.start..overlap.end - range.start;
        shard.copy(PARAMS_TENSOR, &old, &overlap, &mut params[dst.clone()]);
        for (name, state) in manifest.state_names.iter().zip(&mut states) {
            shard.copy(name, &old, &overlap, &mut state[dst.clone()]);
        }
    }
    Ok(Shard {
        range,
        params,
        states,
    })
}

fn meta_of(manifest: Manifest) -> Meta {
    Meta {
        step: manifest.step,
        world: manifest.world,
        zero_stage: manifest.zero_stage,
        total: manifest.total,
        layout: manifest
            .layout
            .into_iter()
            .map(|p| ParamLayout {
                name: p.name,
                shape: p.shape,
                offset: p.offset,
            })
            .collect(),
        state_names: manifest.state_names,
        train_state: manifest.train_state,
        config_toml: manifest.config_toml,
    }
}

/// Loads rank `rank`'s slice `shard_range(total, world, rank)` of the step
/// `path` names (a step directory, or a root: then `latest`), whatever world
/// size it was saved with. Checks the crc32c of every file it reads. The
/// returned `Meta` is the manifest's (its `world` is the saving world).
pub fn load(path: &Path, rank: usize, world: usize) -> Result<(Meta, Shard), CkptError> {
    if world == 0 || rank >= world {
        return Err(CkptError::Invalid(format!(
            "load for rank {rank} of world {world}: need 0 <= rank < world"
        )));
    }
    let (dir, manifest) = read_manifest(path)?;
    let range = cohort_contract::shard_range(manifest.total, world, rank);
    let shard = read_range(&dir, &manifest, range, true)?;
    Ok((meta_of(manifest), shard))
}

/// The outcome of checking every file of a step.
#[derive(Debug)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Shard files that verified.
    pub files_ok: usize,
    /// Bytes of the shard files that verified.
    pub bytes_ok: u64,
    /// One error per bad file, naming it.
    pub problems: Vec<CkptError>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the manifest and every shard file of the step `path` names. An
/// unreadable manifest is an `Err`; bad shard files are listed in the report.
pub fn verify(path: &Path) -> Result<VerifyReport, CkptError> {
    let (dir, manifest) = read_manifest(path)?;
    let (mut files_ok, mut bytes_ok, mut problems) = (0, 0, Vec::new());
    for entry in &manifest.shards {
        match OpenShard::open(&dir, &manifest, entry) {
            Ok(_) => {
                files_ok += 1;
                bytes_ok += entry.bytes;
            }
            Err(e) => problems.push(e),
        }
    }
    Ok(VerifyReport {
        dir,
        manifest,
        files_ok,
        bytes_ok,
        problems,
    })
}

/// The newest committed step under `root` that verifies, or `None` if there
/// is no step (or no `root`). Each newer step that fails is skipped with a
/// warning naming the file and the problem; when steps exist but none
/// verifies, that is an error naming each one and why (starting over from
/// step 0 would silently throw the run away).
pub fn find_resumable(root: &Path) -> Result<Option<PathBuf>, CkptError> {
    let steps = step_dirs(root)?;
    let mut failures = Vec::new();
    for (_, dir) in steps {
        let problems: Vec<String> = match verify(&dir) {
            Ok(report) if report.is_ok() => return Ok(Some(dir)),
            Ok(report) => report.problems.iter().map(ToString::to_string).collect(),
            Err(problem) => vec![problem.to_string()],
        };
        for problem in &problems {
            tracing::warn!("skipping checkpoint {}: {problem}", dir.display());
        }
        failures.push(format!("{}: {}", dir.display(), problems.join("; ")));
    }
    if failures.is_empty() {
        Ok(None)
    } else {
        Err(CkptError::NoneVerifies {
            root: root.to_path_buf(),
            failures,
        })
    }
}

/// What [`export`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    pub dir: PathBuf,
    pub step: u64,
    pub tensors: usize,
    pub bytes: u64,
}

/// Writes the step's parameters to `out` as one safetensors file, one fp32
/// tensor per parameter with its shape, named `name(layout name)` (the
/// names a PyTorch module of the model's structure gives them). The file
/// appears atomically (temporary sibling + rename).
pub fn export(
    path: &Path,
    out: &Path,
    name: impl Fn(&str) -> String,
) -> Result<ExportSummary, CkptError> {
    let (dir, manifest) = read_manifest(path)?;
    let flat = read_range(&dir, &manifest, 0..manifest.total, false)?.params;
    let names: Vec<String> = manifest.layout.iter().map(|p| name(&p.name)).collect();
    let tensors: Vec<(&str, &[usize], &[f32])> = manifest
        .layout
        .iter()
        .zip(&names)
        .map(|(p, name)| {
            (
                name.as_str(),
                p.shape.as_slice(),
                &flat[p.offset..p.offset + p.numel],
            )
        })
        .collect();
    let header = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("cohort_step".to_string(), manifest.step.to_string()),
    ]);
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = format::write_safetensors(&tmp, &tensors, Some(header))?;
    fs::rename(&tmp, out).map_err(CkptError::io("rename into place", out))?;
    Ok(ExportSummary {
        dir,
        step: manifest.step,
        tensors: tensors.len(),
        bytes: written.bytes,
    })
}
