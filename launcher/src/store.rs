//! The coordinator's key-value store as a [`cohort_collectives::Store`], for
//! workers: blocking calls on a small private runtime, scoped to the worker's
//! job and generation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_collectives::store::{Store, StoreError, validate_key};
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

fn env_var(name: &'static str) -> Result<String, LauncherError> {
    std::env::var(name).map_err(|_| LauncherError::MissingEnv { name })
}

/// The store of the job this worker belongs to, from the environment
/// `cohort launch` sets (`COHORT_COORDINATOR`, `COHORT_TOKEN`,
/// `COHORT_JOB_ID`, `COHORT_GENERATION`).
pub fn store_from_env() -> Result<Arc<dyn Store>, LauncherError> {
    let addr = env_var("COHORT_COORDINATOR")?;
    let token = env_var("COHORT_TOKEN")?;
    let job_id = env_var("COHORT_JOB_ID")?;
    let generation = env_var("COHORT_GENERATION")?;
    let generation = generation
        .parse::<u64>()
        .map_err(|e| LauncherError::InvalidEnv {
            name: "COHORT_GENERATION",
            value: generation.clone(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(CoordinatorStore::connect(
        &addr, &token, &job_id, generation,
    )?))
}
