//! The exit statuses a worker and its launcher agree on.

/// The status a worker exits with when a restart cannot help: the job's
/// configuration or input is wrong (a data file that is not there, a
/// checkpoint saved by another model, a config value that can't work) or
/// its disk is full. `cohort launch` then stops the job at once, without
/// restarting it, and exits 2. It is sysexits' `EX_CONFIG`; a program of
/// your own run by `cohort launch -- PROGRAM` may exit with it too. A worker
/// killed by a signal, or failing any other way, is restarted as before.
pub const PERMANENT_FAILURE: i32 = 78;

/// The status a worker of the built-in trainer exits with when it gave up
/// on recovering in place (no replacement came within
/// `recovery.rejoin_timeout_s`, the state could not be recovered from the
/// peers, or the path it runs cannot recover in place): its agent then
/// reports an ordinary failure and the job restarts from the newest
/// checkpoint on disk. sysexits' `EX_TEMPFAIL`.
pub const RECOVERY_FAILED: i32 = 75;
