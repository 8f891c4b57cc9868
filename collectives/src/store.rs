//! Bootstrap key-value stores.
//!
//! A communicator needs to learn where its peers listen before it can connect
//! to them. It does that through a [`Store`]: every rank publishes its address
//! under a key and waits for the keys of the others. Three stores exist:
//!
//! - [`MemStore`]: in-process, for tests and the `mem` transport;
//! - [`FileStore`]: a directory shared by the processes of one host
//!   (`cohort bench collectives`, tests running the real binary);
//! - the coordinator's key-value store (in `cohort-launcher`), which is what
//!   workers started by `cohort launch` use.
//!
//! [`PrefixStore`] scopes any store under a prefix, so that two communicators
//! (or two generations of a job) never read each other's keys.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Errors of a [`Store`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `wait` gave up: some keys were still missing when the timeout passed.
    #[error(
        "timed out after {waited:?} waiting for store keys {missing:?} \
         (are all ranks started, with the same job id and world size?)"
    )]
    Timeout {
        missing: Vec<String>,
        waited: Duration,
    },
    /// A file store could not read or write a file.
    #[error("store file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key that can't be stored (empty, or with characters the store refuses).
    #[error("invalid store key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// Any other failure of a store's backend (for example the coordinator
    /// being unreachable), with its message.
    #[error("store backend: {0}")]
    Backend(String),
}

/// A key-value store shared by the ranks of one communicator.
///
/// Keys are UTF-8 strings of `[A-Za-z0-9._/-]`; values are bytes. Values are
/// written once per key in normal use; a second `set` overwrites.
pub trait Store: Send + Sync {
    /// Sets `key` to `value`, overwriting.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// The value of `key`, or `None` if it is not set.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Blocks until every key in `keys` is set, then returns their values in
    /// the order of `keys`. Fails with [`StoreError::Timeout`] naming the keys
    /// still missing when `timeout` passes.
    fn wait(&self, keys: &[String], timeout: Duration) -> Result<Vec<Vec<u8>>, StoreError>;
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        (**self).set(key, value)
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(key)
    }
    fn wait(&self, keys: &[String], timeout: Duration) -> Result<Vec<Vec<u8>>, StoreError> {
        (**self).wait(keys, timeout)
    }
}

/// Checks that `key` is non-empty and uses only `[A-Za-z0-9._/-]`.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "empty",
        });
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
    {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "only letters, digits and . _ / - are allowed",
        });
    }
    Ok(())
}

/// An in-process store: a map behind a mutex, with a condition variable so
/// that `wait` sleeps until a `set` instead of polling.
#[derive(Default)]
pub struct MemStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        validate_key(key)?;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        validate_key(key)?;
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.get(key).cloned())
    }

    fn wait(&self, keys: &[String], timeout: Duration) -> Result<Vec<Vec<u8>>, StoreError> {
        for key in keys {
            validate_key(key)?;
        }
        let start = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let missing: Vec<String> = keys
                .iter()
                .filter(|k| !map.contains_key(k.as_str()))
                .cloned()
                .collect();
            if missing.is_empty() {
                return Ok(keys.iter().map(|k| map[k.as_str()].clone()).collect());
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(StoreError::Timeout { missing, waited });
            }
            map = self
                .changed
                .wait_timeout(map, timeout - waited)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A store in a directory shared by the processes of one host: one file per
/// key, written to a temporary name and renamed into place, so a reader sees
/// either no value or the whole value. `wait` polls with a growing interval
/// (1 ms up to 20 ms), which is cheap next to process start-up.
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// A store in `dir`, created if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// The directory holding the keys.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        // '/' separates scopes in keys; keep one flat directory of files.
        Ok(self.dir.join(key.replace('/', "%")))
    }
}

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}-{}",
            std::process::id(),
            unique_suffix(),
            key.replace('/', "%")
        ));
        let io = |source| StoreError::Io {
            path: tmp.clone(),
            source,
        };
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(value).map_err(io)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path_of(key)?;
        match fs::read(&path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    fn wait(&self, keys: &[String], timeout: Duration) -> Result<Vec<Vec<u8>>, StoreError> {
        let start = Instant::now();
        let mut values: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        let mut pause = Duration::from_millis(1);
        loop {
            for (key, slot) in keys.iter().zip(values.iter_mut()) {
                if slot.is_none() {
                    *slot = self.get(key)?;
                }
            }
            if values.iter().all(Option::is_some) {
                return Ok(values.into_iter().flatten().collect());
            }
            let waited = start.elapsed();
            if waited >= timeout {
                let missing = keys
                    .iter()
                    .zip(&values)
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| k.clone())
                    .collect();
                return Err(StoreError::Timeout { missing, waited });
            }
            std::thread::sleep(pause.min(timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A view of another store with every key put under `prefix/`.
pub struct PrefixStore<S> {
    prefix: String,
    inner: S,
}

impl<S: Store> PrefixStore<S> {
    /// Scopes `inner` under `prefix` (which must itself be a valid key).
    pub fn new(prefix: impl Into<String>, inner: S) -> Result<Self, StoreError> {
        let prefix = prefix.into();
        validate_key(&prefix)?;
        Ok(Self { prefix, inner })
    }

    fn full(&self, key: &str) -> String {
        format!("{}/{}", self.prefix, key)
    }
}

impl<S: Store> Store for PrefixStore<S> {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(&self.full(key), value)
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(&self.full(key))
    }
    fn wait(&self, keys: &[String], timeout: Duration) -> Result<Vec<Vec<u8>>, StoreError> {
        let full: Vec<String> = keys.iter().map(|k| self.full(k)).collect();
        self.inner.wait(&full, timeout).map_err(|e| match e {
            StoreError::Timeout { missing, waited } => StoreError::Timeout {
                missing: missing
                    .into_iter()
                    .map(|k| {
                        k.strip_prefix(&format!("{}/", self.prefix))
                            .map(str::to_owned)
                            .unwrap_or(k)
                    })
                    .collect(),
                waited,
            },
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(store: &dyn Store) {
        assert_eq!(store.get("a/b").unwrap(), None);
        store.set("a/b", b"one").unwrap();
        assert_eq!(store.get("a/b").unwrap().as_deref(), Some(&b"one"[..]));
        store.set("a/b", b"two").unwrap();
        assert_eq!(store.get("a/b").unwrap().as_deref(), Some(&b"two"[..]));
        let err = store
            .wait(&["a/b".into(), "c".into()], Duration::from_millis(30))
            .unwrap_err();
        match err {
            StoreError::Timeout { missing, .. } => assert_eq!(missing, vec!["c".to_owned()]),
            other => panic!("expected a timeout, got {other}"),
        }
        assert!(matches!(
            store.set("bad key", b""),
            Err(StoreError::InvalidKey { .. })
        ));
    }

    fn wait_across_threads(store: Arc<dyn Store>) {
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..4 {
                    store.set(&format!("k{i}"), &[i as u8]).unwrap();
                }
            })
        };
        let keys: Vec<String> = (0..4).map(|i| format!("k{i}")).collect();
        let values = store.wait(&keys, Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
        assert_eq!(values, vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn mem_store() {
        roundtrip(&MemStore::new());
        wait_across_threads(Arc::new(MemStore::new()));
    }

    #[test]
    fn file_store() {
        let dir = tempfile::tempdir().unwrap();
        roundtrip(&FileStore::new(dir.path()).unwrap());
        wait_across_threads(Arc::new(FileStore::new(dir.path().join("w")).unwrap()));
    }

    #[test]
    fn prefix_store_scopes_keys() {
        let inner = Arc::new(MemStore::new());
        let a = PrefixStore::new("job1/gen0", inner.clone()).unwrap();
        let b = PrefixStore::new("job1/gen1", inner.clone()).unwrap();
        a.set("addr/0", b"x").unwrap();
        assert_eq!(b.get("addr/0").unwrap(), None);
        assert_eq!(inner.get("job1/gen0/addr/0").unwrap().unwrap(), b"x");
        match b.wait(&["addr/0".into()], Duration::from_millis(5)) {
            Err(StoreError::Timeout { missing, .. }) => assert_eq!(missing, vec!["addr/0"]),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}
