//! torch.distributed.elastic's error files: every worker gets its own
//! `TORCHELASTIC_ERROR_FILE` under the attempt's log directory, `@record`
//! writes the worker's uncaught exception there, and when a generation fails
//! the root cause is the earliest recorded error (by the file's timestamp),
//! as torchrun chooses it, however late that worker exited.
//!
//! The file, as `torch.distributed.elastic.multiprocessing.errors` writes it:
//! `{"message": {"message": "ValueError: ...", "extraInfo": {"py_callstack":
//! "Traceback ...", "timestamp": "1733100000"}}}`, or (an error from
//! outside Python) `{"message": "...", "timestamp": 1733100000}`.

use std::path::{Path, PathBuf};

use cohort_proto::v1::{FailureInfo, RecordedError};
use serde_json::Value;

/// The error file of global rank `rank` in attempt directory `attempt`.
pub fn error_file(attempt: &Path, rank: u32) -> PathBuf {
    attempt.join(format!("rank_{rank}.error.json"))
}

/// The error recorded in `path`; `None` when there is no file (yet) or it
/// is not (yet) a complete error file.
pub fn read(path: &Path) -> Option<Box<RecordedError>> {
    let text = std::fs::read_to_string(path).ok()?;
    let data: Value = serde_json::from_str(&text).ok()?;
    let number = |v: &Value| match v {
        Value::String(s) => s.trim().parse::<f64>().ok(),
        v => v.as_f64(),
    };
    let (message, traceback, timestamp) = match data.get("message")? {
        Value::String(message) => (
            message.clone(),
            String::new(),
            data.get("timestamp").and_then(number),
        ),
        message => {
            let extra = message.get("extraInfo");
            (
                message.get("message")?.as_str()?.to_owned(),
                extra
                    .and_then(|e| e.get("py_callstack"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                extra.and_then(|e| e.get("timestamp")).and_then(number),
            )
        }
    };
    Some(Box::new(RecordedError {
        timestamp: timestamp.unwrap_or(0.0).max(0.0) as u64,
        message,
        traceback,
        path: path.display().to_string(),
    }))
}

/// The failure to name as a generation's root cause: the one with the
/// earliest recorded error among `failure` and `recorded` (on a tie,
/// `failure`, then the lowest rank), else `failure` as it is.
pub fn root_cause<'a>(
    failure: &'a FailureInfo,
    recorded: impl IntoIterator<Item = &'a FailureInfo>,
) -> &'a FailureInfo {
    std::iter::once((0, failure))
        .chain(recorded.into_iter().map(|f| (1, f)))
        .filter_map(|(order, f)| f.error.as_ref().map(|e| ((e.timestamp, order, f.rank), f)))
        .min_by_key(|(key, _)| *key)
        .map_or(failure, |(_, f)| f)
}

/// `secs` since the Unix epoch as "2026-12-02 04:54:39 UTC".
pub fn utc(secs: u64) -> String {
    // Days to a civil date: Howard Hinnant's days_from_civil, inverted.
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// "raised ValueError: rank 1 gave up on purpose (recorded in PATH)".
pub fn describe(error: &RecordedError) -> String {
    format!("raised {} (recorded in {})", error.message, error.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = error_file(dir.path(), 1);
        assert!(read(&path).is_none());
        std::fs::write(
            &path,
            r#"{"message": {"message": "ValueError: no", "extraInfo": {"py_callstack": "Traceback (most recent call last):\n  ...\nValueError: no\n", "timestamp": "1733100007"}}}"#,
        )
        .unwrap();
        let e = read(&path).unwrap();
        assert_eq!(
            (e.timestamp, e.message.as_str()),
            (1733100007, "ValueError: no")
        );
        assert!(e.traceback.starts_with("Traceback"));
        assert!(path.ends_with("rank_1.error.json"));
        std::fs::write(&path, r#"{"message": "SIGSEGV in c10d", "timestamp": 5}"#).unwrap();
        let e = read(&path).unwrap();
        assert_eq!((e.timestamp, e.message.as_str()), (5, "SIGSEGV in c10d"));
        std::fs::write(&path, r#"{"message": {"mess"#).unwrap();
        assert!(read(&path).is_none(), "half written");
    }

    #[test]
    fn timestamps_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_187_279), "2026-12-02 04:54:39 UTC");
    }

    fn failure(rank: u32, at: Option<u64>) -> FailureInfo {
        FailureInfo {
            rank: Some(rank),
            error: at.map(|timestamp| {
                Box::new(RecordedError {
                    timestamp,
                    ..RecordedError::default()
                })
            }),
            ..FailureInfo::default()
        }
    }

    #[test]
    fn the_earliest_recorded_error_is_the_root_cause() {
        // Rank 0 exited first, with an error recorded at 14; rank 1 recorded
        // one at 10 and was still running.
        let first_exit = failure(0, Some(14));
        let recorded = [failure(0, Some(14)), failure(1, Some(10))];
        assert_eq!(root_cause(&first_exit, &recorded).rank, Some(1));
        // No error file: the first failure, as before.
        let plain = failure(0, None);
        assert_eq!(root_cause(&plain, &[]).rank, Some(0));
        assert_eq!(root_cause(&plain, &[failure(2, None)]).rank, Some(0));
        assert_eq!(root_cause(&plain, &[failure(2, Some(3))]).rank, Some(2));
        // A tie goes to the failure reported, then to the lowest rank.
        let at_10 = failure(3, Some(10));
        assert_eq!(root_cause(&at_10, &recorded).rank, Some(3));
        let ties = [failure(2, Some(3)), failure(1, Some(3))];
        assert_eq!(root_cause(&plain, &ties).rank, Some(1));
    }
}
