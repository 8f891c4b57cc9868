//! The coordinator's key-value store as a [`cohort_collectives::Store`], for
//! workers: blocking calls on a small private runtime, scoped to the worker's
//! job and generation; and [`worker_store`], the store a worker bootstraps
//! through, chosen from its environment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_collectives::FileStore;
use cohort_collectives::store::{Store, StoreError, validate_key};
use cohort_contract::WorkerEnv;
use cohort_proto::v1::{KvCompareAndSetRequest, KvGetRequest, KvSetRequest, KvWaitRequest};

use crate::LauncherError;
use crate::client::{Client, connect, rpc_error};

/// How long a worker retries reaching the coordinator before giving up.
const CONNECT_RETRY: Duration = Duration::from_secs(15);

/// A blocking client of the coordinator's key-value store, scoped to one job
/// and generation. Call it from plain threads, never from inside a tokio
/// runtime (it runs its own).
pub struct CoordinatorStore {
    runtime: tokio::runtime::Runtime,
    client: Client,
    addr: String,
    job_id: String,
    generation: u64,
}

impl CoordinatorStore {
    /// Connects to the coordinator at `addr` (retrying for a while).
    pub fn connect(
        addr: &str,
        token: &str,
        job_id: &str,
        generation: u64,
    ) -> Result<Self, LauncherError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cohort-store")
            .enable_all()
            .build()
            .map_err(LauncherError::Runtime)?;
        let client = runtime.block_on(connect(addr, token, CONNECT_RETRY))?;
        Ok(Self {
            runtime,
            client,
            addr: addr.to_owned(),
            job_id: job_id.to_owned(),
            generation,
        })
    }

    fn backend(&self, call: &'static str, status: tonic::Status) -> StoreError {
        StoreError::Backend(rpc_error(&self.addr, call, status).to_string())
    }

    /// Sets `key` to `desired` if its value is `expected` (`None`: not set);
    /// returns whether it swapped and the value after the call.
    pub fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        desired: &[u8],
    ) -> Result<(bool, Option<Vec<u8>>), StoreError> {
        validate_key(key)?;
        let request = KvCompareAndSetRequest {
            job_id: self.job_id.clone(),
            generation: self.generation,
            key: key.to_owned(),
            expected: expected.map(<[u8]>::to_vec),
            desired: desired.to_vec(),
        };
        let mut client = self.client.clone();
        let response = self
            .runtime
            .block_on(client.kv_compare_and_set(request))
            .map_err(|s| self.backend("KvCompareAndSet", s))?
            .into_inner();
        Ok((response.swapped, response.current))
    }
}

impl Store for CoordinatorStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        validate_key(key)?;
        let request = KvSetRequest {
            job_id: self.job_id.clone(),
            generation: self.generation,
            key: key.to_owned(),
            value: value.to_vec(),
        };
        let mut client = self.client.clone();
        self.runtime
            .block_on(client.kv_set(request))
            .map_err(|s| self.backend("KvSet", s))?;
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        validate_key(key)?;
        let request = KvGetRequest {
            job_id: self.job_id.clone(),
            generation: self.generation,
            key: key.to_owned(),
        };
        let mut client = self.client.clone();
        Ok(self
            .runtime
            .block_on(client.kv_get(request))
            .map_err(|s| self.backend("KvGet", s))?
            .into_inner()
            .value)
    }

    fn wait(&self, keys: &[String], timeout: Duration) -> Result<Vec<Vec<u8>>, StoreError> {
        for key in keys {
            validate_key(key)?;
        }
        let start = Instant::now();
        let mut request = tonic::Request::new(KvWaitRequest {
            job_id: self.job_id.clone(),
            generation: self.generation,
            keys: keys.to_vec(),
            timeout_ms: timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        });
        // The server answers at `timeout`; the deadline only guards against
        // a coordinator that stopped answering.
        request.set_timeout(timeout.saturating_add(Duration::from_secs(30)));
        let mut client = self.client.clone();
        let response = self
            .runtime
            .block_on(client.kv_wait(request))
            .map_err(|s| self.backend("KvWait", s))?
            .into_inner();
        if response.complete {
            Ok(response.values)
        } else {
            Err(StoreError::Timeout {
                missing: response.missing,
                waited: start.elapsed(),
            })
        }
    }
}

/// The store through which the ranks of `env`'s job find each other: none
/// for a world of one; with `COHORT_STORE_DIR` (ranks started by hand) a
/// [`FileStore`] in that directory; else the coordinator's store of the job
/// and generation `cohort launch` gave the worker.
///
/// With [`WorkerEnv::from_env`], all a program needs to join its job:
///
/// ```no_run
/// let env = cohort_contract::WorkerEnv::from_env()?;
/// let store = cohort_launcher::worker_store(&env)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn worker_store(env: &WorkerEnv) -> Result<Option<Arc<dyn Store>>, LauncherError> {
    if env.world == 1 {
        return Ok(None);
    }
    if let Some(dir) = &env.store_dir {
        let store = FileStore::new(dir).map_err(|error| LauncherError::StoreDir {
            path: dir.clone(),
            error,
        })?;
        return Ok(Some(Arc::new(store)));
    }
    let job = env.coordinator_job()?;
    Ok(Some(Arc::new(CoordinatorStore::connect(
        job.addr,
        job.token,
        job.job_id,
        job.generation,
    )?)))
}
