//! The coordinator through real gRPC, in-process: the key-value store as a
//! collectives `Store` (from plain threads, as workers use it), barriers,
//! compare-and-set, and the token check.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use cohort_collectives::store::{Store, StoreError};
use cohort_contract::WorkerEnv;
use cohort_launcher::client::{connect, rpc_error};
use cohort_launcher::coordinator::{CoordinatorConfig, RunningCoordinator};
use cohort_launcher::{CoordinatorStore, LauncherError, NodeRange};
use cohort_proto::v1::{BarrierRequest, KvGetRequest};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn start(rt: &tokio::runtime::Runtime) -> RunningCoordinator {
    let mut config = CoordinatorConfig::new("tok".into());
    config.job_id = Some("job".into());
    config.nnodes = Some(NodeRange::exactly(1));
    rt.block_on(RunningCoordinator::start("127.0.0.1:0", config))
        .unwrap()
}

#[test]
fn store_is_shared_by_ranks_and_scoped_by_generation() {
    let rt = runtime();
    let server = start(&rt);
    let addr = server.addr().to_string();
    let ranks: Vec<_> = (0..4)
        .map(|rank| {
            let addr = addr.clone();
            thread::spawn(move || {
                let store: Arc<dyn Store> =
                    Arc::new(CoordinatorStore::connect(&addr, "tok", "job", 3).unwrap());
                store
                    .set(&format!("addr/{rank}"), format!("host:{rank}").as_bytes())
                    .unwrap();
                let keys: Vec<String> = (0..4).map(|r| format!("addr/{r}")).collect();
                store.wait(&keys, Duration::from_secs(20)).unwrap()
            })
        })
        .collect();
    for rank in ranks {
        let values = rank.join().unwrap();
        let expected: Vec<Vec<u8>> = (0..4).map(|r| format!("host:{r}").into_bytes()).collect();
        assert_eq!(values, expected);
    }
    let next_generation = CoordinatorStore::connect(&addr, "tok", "job", 4).unwrap();
    assert_eq!(next_generation.get("addr/0").unwrap(), None);
    match next_generation.wait(&["addr/0".into()], Duration::from_millis(50)) {
        Err(StoreError::Timeout { missing, .. }) => assert_eq!(missing, vec!["addr/0"]),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(matches!(
        next_generation.set("bad key", b""),
        Err(StoreError::InvalidKey { .. })
    ));
    assert_eq!(
        next_generation
            .compare_and_set("leader", None, b"r0")
            .unwrap(),
        (true, Some(b"r0".to_vec()))
    );
    assert_eq!(
        next_generation
            .compare_and_set("leader", None, b"r1")
            .unwrap(),
        (false, Some(b"r0".to_vec()))
    );
    rt.block_on(server.shutdown());
}

#[test]
fn a_wrong_token_is_refused_and_the_server_goes_on() {
    let rt = runtime();
    let server = start(&rt);
    let addr = server.addr().to_string();
    rt.block_on(async {
        let mut wrong = connect(&addr, "nope", Duration::from_secs(5))
            .await
            .unwrap();
        let status = wrong
            .kv_get(KvGetRequest {
                job_id: "job".into(),
                generation: 0,
                key: "k".into(),
            })
            .await
            .unwrap_err();
        let err = rpc_error(&addr, "KvGet", status);
        assert!(
            matches!(err, LauncherError::Unauthenticated { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("refused our job token"), "{err}");

        let mut right = connect(&addr, "tok", Duration::from_secs(5)).await.unwrap();
        let barrier = right
            .barrier(BarrierRequest {
                job_id: "job".into(),
                generation: 0,
                name: "start".into(),
                participant: "0".into(),
                count: 1,
                timeout_ms: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(barrier.complete);
        let other_job = right
            .kv_get(KvGetRequest {
                job_id: "other".into(),
                generation: 0,
                key: "k".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(other_job.code(), tonic::Code::FailedPrecondition);
    });
    rt.block_on(server.shutdown());
}

#[test]
fn worker_store_names_what_is_missing() {
    // A rank of two not started by `cohort launch`: no coordinator, no store directory.
    let env = WorkerEnv {
        world: 2,
        ..WorkerEnv::default()
    };
    let err = cohort_launcher::worker_store(&env).err().unwrap();
    assert_eq!(
        err.to_string(),
        "COHORT_COORDINATOR is not set: this program must be started by `cohort launch`"
    );
}

#[test]
fn worker_store_is_none_alone_and_the_store_directory_by_hand() {
    assert!(
        cohort_launcher::worker_store(&WorkerEnv::default())
            .unwrap()
            .is_none()
    );
    let dir = tempfile::tempdir().unwrap();
    let env = WorkerEnv {
        world: 2,
        store_dir: Some(dir.path().join("store")),
        ..WorkerEnv::default()
    };
    let store = cohort_launcher::worker_store(&env).unwrap().unwrap();
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, b"").unwrap();
    let env = WorkerEnv {
        store_dir: Some(blocked.join("store")),
        ..env
    };
    let err = cohort_launcher::worker_store(&env)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("COHORT_STORE_DIR=") && err.contains("a-file"),
        "{err}"
    );
}
