//! `cohort ckpt inspect|verify|export`: read checkpoints without libtorch.
//!
//! Each takes a step directory (`step-NNNNNNNN/`) or a checkpoint root (then
//! the step `latest` names). Exit codes: 0 ok, 1 a bad or unreadable
//! checkpoint, 2 a usage error (bad flags, a path that does not exist).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cohort_checkpoint::{Manifest, format};
use cohort_configs::ModelKind;
use serde::Serialize;

#[derive(clap::Args)]
pub struct CkptArgs {
    #[command(subcommand)]
    command: CkptCommand,
}

#[derive(clap::Subcommand)]
enum CkptCommand {
    /// Show a checkpoint's step, world size, tensors, states, sizes on disk and config.
    Inspect {
        /// A step directory, or a checkpoint root (its `latest` step is used).
        dir: PathBuf,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Check the manifest and the crc32c of every shard file; exit 1 on any problem.
    Verify {
        /// A step directory, or a checkpoint root (its `latest` step is used).
        dir: PathBuf,
    },
    /// Write consolidated fp32 model weights (one tensor per parameter) as safetensors.
    Export {
        /// A step directory, or a checkpoint root (its `latest` step is used).
        dir: PathBuf,
        /// The safetensors file to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: CkptArgs) -> anyhow::Result<ExitCode> {
    let dir = match &args.command {
        CkptCommand::Inspect { dir, .. }
        | CkptCommand::Verify { dir }
        | CkptCommand::Export { dir, .. } => dir,
    };
    if !dir.exists() {
        return Ok(usage_error(&format!(
            "{} does not exist; pass a step directory (step-NNNNNNNN/) or a checkpoint root",
            dir.display()
        )));
    }
    match args.command {
        CkptCommand::Inspect { dir, json } => inspect(&dir, json),
        CkptCommand::Verify { dir } => verify(&dir),
        CkptCommand::Export { dir, out } => {
            let parent = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if out.is_dir() {
                return Ok(usage_error(&format!(
                    "--out {} is a directory; give a file name such as model.safetensors",
                    out.display()
                )));
            }
            if !parent.is_dir() {
                return Ok(usage_error(&format!(
                    "--out {}: directory {} does not exist",
                    out.display(),
                    parent.display()
                )));
            }
            export(&dir, &out)
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// One file of the step directory with its size, if present.
#[derive(Serialize)]
struct FileSize {
    file: String,
    bytes: Option<u64>,
}

#[derive(Serialize)]
struct Inspect<'a> {
    dir: &'a Path,
    step: u64,
    world: usize,
    zero_stage: u8,
    format_version: u32,
    dtype: &'a str,
    total_elements: usize,
    tensors: &'a [format::LayoutEntry],
    state_names: &'a [String],
    shards: &'a [format::ShardEntry],
    files: Vec<FileSize>,
    bytes_on_disk: u64,
    train_state: &'a serde_json::Value,
    config_toml: &'a str,
}

fn inspect(dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let (dir, m) = cohort_checkpoint::read_manifest(dir)?;
    let files: Vec<FileSize> = std::iter::once(format::MANIFEST_FILE.to_string())
        .chain(m.shards.iter().map(|s| s.file.clone()))
        .map(|file| FileSize {
            bytes: std::fs::metadata(dir.join(&file)).ok().map(|md| md.len()),
            file,
        })
        .collect();
    let bytes_on_disk = files.iter().filter_map(|f| f.bytes).sum();
    if json {
        let report = Inspect {
            dir: &dir,
            step: m.step,
            world: m.world,
            zero_stage: m.zero_stage,
            format_version: m.format_version,
            dtype: &m.dtype,
            total_elements: m.total,
            tensors: &m.layout,
            state_names: &m.state_names,
            shards: &m.shards,
            files,
            bytes_on_disk,
            train_state: &m.train_state,
            config_toml: &m.config_toml,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_inspect(&dir, &m, &files, bytes_on_disk);
    Ok(ExitCode::SUCCESS)
}

fn print_inspect(dir: &Path, m: &Manifest, files: &[FileSize], bytes_on_disk: u64) {
    println!("checkpoint   {}", dir.display());
    println!("step         {}", m.step);
    println!("world size   {} (zero stage {})", m.world, m.zero_stage);
    println!(
        "format       {} v{}, {}",
        m.format, m.format_version, m.dtype
    );
    println!(
        "parameters   {} tensors, {} elements ({} per vector)",
        m.layout.len(),
        m.total,
        human_bytes(4 * m.total as u64)
    );
    let shapes: Vec<String> = m.layout.iter().map(|p| format!("{:?}", p.shape)).collect();
    let name_w = m
        .layout
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let shape_w = shapes.iter().map(String::len).max().unwrap_or(0).max(5);
    println!(
        "  {:name_w$}  {:shape_w$}  DTYPE  {:>12}",
        "NAME", "SHAPE", "NUMEL"
    );
    for (p, shape) in m.layout.iter().zip(&shapes) {
        println!(
            "  {:name_w$}  {shape:shape_w$}  {:5}  {:>12}",
            p.name, p.dtype, p.numel
        );
    }
    let states = if m.state_names.is_empty() {
        "(none)".to_string()
    } else {
        m.state_names.join(", ")
    };
    println!("states       {states}");
    println!("files");
    println!("  {:24}  {:>24}  {:>12}", "FILE", "RANGE", "SIZE");
    for f in files {
        let range = m
            .shards
            .iter()
            .find(|s| s.file == f.file)
            .map(|s| format!("{}..{}", s.start, s.end))
            .unwrap_or_default();
        let size = f.bytes.map_or_else(|| "MISSING".to_string(), human_bytes);
        println!("  {:24}  {range:>24}  {size:>12}", f.file);
    }
    println!("on disk      {}", human_bytes(bytes_on_disk));
    let mut train_state = m.train_state.to_string();
    if train_state.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|&i| train_state.is_char_boundary(i))
            .unwrap_or(0);
        train_state.truncate(cut);
        train_state.push_str(" ...");
    }
    println!("train_state  {train_state}");
    let lines: Vec<&str> = m
        .config_toml
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    const SHOWN: usize = 30;
    println!(
        "config       resolved job config, {} lines without comments:",
        lines.len()
    );
    for line in lines.iter().take(SHOWN) {
        println!("  {line}");
    }
    if lines.len() > SHOWN {
        println!(
            "  ... {} more (see {}/manifest.json)",
            lines.len() - SHOWN,
            dir.display()
        );
    }
}

fn verify(dir: &Path) -> anyhow::Result<ExitCode> {
    let report = cohort_checkpoint::verify(dir)?;
    let files = report.manifest.shards.len();
    if report.is_ok() {
        println!(
            "ok: {} step {}: manifest and {files} shard files ({}) verified (crc32c)",
            report.dir.display(),
            report.manifest.step,
            human_bytes(report.bytes_ok)
        );
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &report.problems {
        eprintln!("BAD: {problem}");
    }
    anyhow::bail!(
        "{}: {} of {files} shard files are bad, {} verified; resume from an older step (`cohort ckpt verify` on each step directory shows which are good)",
        report.dir.display(),
        report.problems.len(),
        report.files_ok
    )
}

/// Exports under the names PyTorch gives the parameters of a module of the
/// checkpoint's model (`ModelKind::state_dict_name`).
fn export(dir: &Path, out: &Path) -> anyhow::Result<ExitCode> {
    let (_, manifest) = cohort_checkpoint::read_manifest(dir)?;
    let kind = match ModelKind::of_saved_config(&manifest.config_toml) {
        Ok(kind) => Some(kind),
        Err(problem) => {
            eprintln!(
                "warning: {}: {problem}; the tensors keep the names the checkpoint records",
                dir.display()
            );
            None
        }
    };
    let summary = cohort_checkpoint::export(dir, out, |name| match kind {
        Some(kind) => kind.state_dict_name(name),
        None => name.to_owned(),
    })?;
    println!(
        "exported step {} of {} ({} tensors, fp32, {}) to {}",
        summary.step,
        summary.dir.display(),
        summary.tensors,
        human_bytes(summary.bytes),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(300 << 20), "300.0 MiB");
    }
}
