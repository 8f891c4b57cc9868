//! The coordinator's key-value store and barriers, one namespace per
//! generation (a coordinator runs one job; the service checks the job id).
//!
//! Waiting is event-driven: a waiter registers a [`Notify`] under each key it
//! still misses and sleeps; `set` wakes only the waiters of that key, so
//! thousands of ranks waiting on different keys cost nothing while they wait.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Default)]
struct Namespace {
    values: HashMap<String, Vec<u8>>,
    waiters: HashMap<String, Vec<Arc<Notify>>>,
    barriers: HashMap<String, BarrierState>,
}

#[derive(Default)]
struct BarrierState {
    arrived: HashSet<String>,
    waiters: Vec<Arc<Notify>>,
}

impl Namespace {
    fn wake(&mut self, key: &str) {
        for waiter in self.waiters.remove(key).unwrap_or_default() {
            waiter.notify_one();
        }
    }
}

/// Generation-scoped key-value namespaces.
#[derive(Default)]
pub(crate) struct KvStore {
    namespaces: Mutex<HashMap<u64, Namespace>>,
}

/// What [`KvStore::barrier`] reports when it returns.
pub(crate) struct BarrierOutcome {
    pub complete: bool,
    pub arrived: u32,
}

impl KvStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Namespace>> {
        self.namespaces.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets every generation before `generation` (their ranks are gone).
    pub fn retain_from(&self, generation: u64) {
        let mut spaces = self.lock();
        spaces.retain(|g, _| *g >= generation);
    }

    pub fn set(&self, generation: u64, key: &str, value: Vec<u8>) {
        let mut spaces = self.lock();
        let ns = spaces.entry(generation).or_default();
        ns.values.insert(key.to_owned(), value);
        ns.wake(key);
    }

    /// The values of `generation` (for the coordinator's state file).
    pub fn values(&self, generation: u64) -> HashMap<String, Vec<u8>> {
        self.lock()
            .get(&generation)
            .map(|ns| ns.values.clone())
            .unwrap_or_default()
    }

    /// Puts back the values of `generation` a restarted coordinator read
    /// from its state file.
    pub fn restore(&self, generation: u64, values: HashMap<String, Vec<u8>>) {
        self.lock().entry(generation).or_default().values = values;
    }

    pub fn get(&self, generation: u64, key: &str) -> Option<Vec<u8>> {
        self.lock()
            .get(&generation)
            .and_then(|ns| ns.values.get(key).cloned())
    }

    /// Sets `key` to `desired` if its value is `expected` (`None`: not set).
    /// Returns whether it swapped and the value after the call.
    pub fn compare_and_set(
        &self,
        generation: u64,
        key: &str,
        expected: Option<&[u8]>,
        desired: Vec<u8>,
    ) -> (bool, Option<Vec<u8>>) {
        let mut spaces = self.lock();
        let ns = spaces.entry(generation).or_default();
        if ns.values.get(key).map(Vec::as_slice) == expected {
            ns.values.insert(key.to_owned(), desired.clone());
            ns.wake(key);
            (true, Some(desired))
        } else {
            (false, ns.values.get(key).cloned())
        }
    }

    /// The values of `keys` once all are set, or the keys still missing
    /// when `timeout` passes.
    pub async fn wait(
        &self,
        generation: u64,
        keys: &[String],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let notify = Arc::new(Notify::new());
            let missing = {
                let mut spaces = self.lock();
                let ns = spaces.entry(generation).or_default();
                let missing: Vec<String> = keys
                    .iter()
                    .filter(|k| !ns.values.contains_key(k.as_str()))
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    return Ok(keys.iter().map(|k| ns.values[k.as_str()].clone()).collect());
                }
                for key in &missing {
                    ns.waiters
                        .entry(key.clone())
                        .or_default()
                        .push(notify.clone());
                }
                missing
            };
            if tokio::time::timeout_at(deadline, notify.notified())
                .await
                .is_err()
            {
                return Err(missing);
            }
        }
    }

    /// Registers `participant` at barrier `name` and waits until `count`
    /// distinct participants arrived, or `timeout` passes.
    pub async fn barrier(
        &self,
        generation: u64,
        name: &str,
        participant: &str,
        count: u32,
        timeout: Duration,
    ) -> BarrierOutcome {
        let deadline = Instant::now() + timeout;
        let mut first = true;
        loop {
            let notify = Arc::new(Notify::new());
            {
                let mut spaces = self.lock();
                let ns = spaces.entry(generation).or_default();
                let barrier = ns.barriers.entry(name.to_owned()).or_default();
                if first {
                    barrier.arrived.insert(participant.to_owned());
                    first = false;
                }
                let arrived = barrier.arrived.len() as u32;
                if arrived >= count {
                    for waiter in barrier.waiters.drain(..) {
                        waiter.notify_one();
                    }
                    return BarrierOutcome {
                        complete: true,
                        arrived,
                    };
                }
                barrier.waiters.push(notify.clone());
            }
            if tokio::time::timeout_at(deadline, notify.notified())
                .await
                .is_err()
            {
                let arrived = self
                    .lock()
                    .get(&generation)
                    .and_then(|ns| ns.barriers.get(name))
                    .map_or(0, |b| b.arrived.len() as u32);
                return BarrierOutcome {
                    complete: arrived >= count,
                    arrived,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_wakes_on_set_and_times_out_with_missing() {
        let kv = Arc::new(KvStore::default());
        let waiter = {
            let kv = kv.clone();
            tokio::spawn(async move {
                kv.wait(0, &["a".into(), "b".into()], Duration::from_secs(10))
                    .await
            })
        };
        kv.set(0, "a", b"1".to_vec());
        kv.set(0, "b", b"2".to_vec());
        assert_eq!(
            waiter.await.unwrap().unwrap(),
            vec![b"1".to_vec(), b"2".to_vec()]
        );
        // Another generation does not see these keys.
        assert_eq!(
            kv.wait(1, &["a".into()], Duration::from_millis(10)).await,
            Err(vec!["a".to_owned()])
        );
        kv.retain_from(1);
        assert_eq!(kv.get(0, "a"), None);
    }

    #[tokio::test]
    async fn compare_and_set_swaps_only_on_match() {
        let kv = KvStore::default();
        assert_eq!(
            kv.compare_and_set(0, "k", None, b"x".to_vec()),
            (true, Some(b"x".to_vec()))
        );
        assert_eq!(
            kv.compare_and_set(0, "k", None, b"y".to_vec()),
            (false, Some(b"x".to_vec()))
        );
        assert_eq!(
            kv.compare_and_set(0, "k", Some(b"x"), b"z".to_vec()),
            (true, Some(b"z".to_vec()))
        );
    }

    #[tokio::test]
    async fn barrier_releases_all_participants() {
        let kv = Arc::new(KvStore::default());
        let tasks: Vec<_> = (0..3)
            .map(|i| {
                let kv = kv.clone();
                tokio::spawn(async move {
                    kv.barrier(0, "b", &format!("p{i}"), 3, Duration::from_secs(10))
                        .await
                        .complete
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap());
        }
        let late = kv
            .barrier(0, "other", "p0", 2, Duration::from_millis(10))
            .await;
        assert!(!late.complete);
        assert_eq!(late.arrived, 1);
    }
}
