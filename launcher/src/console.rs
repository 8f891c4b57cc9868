//! The launcher's terminal: worker output prefixed `[rank N]`, and the job's
//! progress as an indicatif bar when stderr is a terminal, or as plain lines
//! when it is not.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cohort_proto::v1::{EventKind, JobEvent, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where the launcher writes: stdout/stderr lines, plus the progress view.
pub struct Console {
    bar: Option<ProgressBar>,
    last_plain_progress: Mutex<Option<Instant>>,
    /// Workers' `error: ...` lines shown so far (without the rank prefix).
    errors_shown: Mutex<HashSet<String>>,
}

/// How often the plain (non-terminal) view prints a progress line.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Console {
    /// A bar if stderr is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            last_plain_progress: Mutex::new(None),
            errors_shown: Mutex::new(HashSet::new()),
        }
    }

    /// A worker's stdout line.
    pub fn out(&self, line: &str) {
        self.write(false, line);
    }

    /// A worker's stderr line, or a launcher message.
    pub fn err(&self, line: &str) {
        self.write(true, line);
    }

    /// A line of rank `rank`'s output. An `error: ...` line that another
    /// rank already printed word for word (every rank fails the same way
    /// on a bad config or input) is not shown again.
    pub fn worker_line(&self, rank: u32, stderr: bool, text: &str) {
        if text.starts_with("error: ") {
            let mut shown = self.errors_shown.lock().unwrap_or_else(|e| e.into_inner());
            if !shown.insert(text.to_owned()) {
                return;
            }
        }
        self.write(stderr, &format!("[rank {rank}] {text}"));
    }

    /// Whether a worker's `error: ...` line `text` was shown.
    pub fn error_shown(&self, text: &str) -> bool {
        let shown = self.errors_shown.lock().unwrap_or_else(|e| e.into_inner());
        shown.contains(text)
    }

    fn write(&self, stderr: bool, line: &str) {
        let print = || {
            // A closed terminal must not kill the launcher: ignore errors.
            if stderr {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
        };
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }

    /// Shows one job event.
    pub fn event(&self, event: &JobEvent) {
        let progress = event.progress.unwrap_or_default();
        if let Some(bar) = &self.bar {
            self.update_bar(bar, event.generation, &progress);
        }
        if event.kind == EventKind::Progress as i32 {
            if self.bar.is_none() {
                let mut last = self
                    .last_plain_progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY) {
                    *last = Some(Instant::now());
                    self.err(&format!(
                        "[cohort] generation {}: {}",
                        event.generation,
                        describe_progress(&progress)
                    ));
                }
            }
        } else if !event.message.is_empty() {
            self.err(&format!("[cohort] {}", event.message));
        }
    }

    fn update_bar(&self, bar: &ProgressBar, generation: u64, p: &Progress) {
        bar.set_prefix(format!(
            "generation {generation} · {}/{} ranks up",
            p.ranks_up, p.world_size
        ));
        if p.max_steps > 0 && bar.length() != Some(p.max_steps) {
            bar.set_length(p.max_steps);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
        }
        bar.set_position(p.step);
        bar.set_message(metrics(p));
    }

    /// Removes the bar (before the final summary).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

fn metrics(p: &Progress) -> String {
    let mut parts = Vec::new();
    if let Some(loss) = p.loss {
        parts.push(format!("loss {loss:.4}"));
    }
    if let Some(t) = p.tokens_per_s {
        parts.push(format!("{t:.0} tokens/s"));
    }
    parts.join(" · ")
}

fn describe_progress(p: &Progress) -> String {
    let mut line = format!("{}/{} ranks up", p.ranks_up, p.world_size);
    if p.max_steps > 0 || p.step > 0 {
        line.push_str(&format!(", step {}/{}", p.step, p.max_steps));
    }
    let m = metrics(p);
    if !m.is_empty() {
        line.push_str(", ");
        line.push_str(&m);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_names_what_is_known() {
        let p = Progress {
            ranks_up: 4,
            world_size: 4,
            step: 10,
            max_steps: 100,
            loss: Some(2.5),
            tokens_per_s: Some(1234.4),
        };
        assert_eq!(
            describe_progress(&p),
            "4/4 ranks up, step 10/100, loss 2.5000 · 1234 tokens/s"
        );
        assert_eq!(describe_progress(&Progress::default()), "0/0 ranks up");
    }
}
