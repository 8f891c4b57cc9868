//! The tonic service: checks arguments, converts, delegates to the
//! [`Coordinator`] (the job state) and its key-value store.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_proto::v1::coordinator_server::Coordinator as CoordinatorRpc;
use cohort_proto::v1::{
    BarrierRequest, BarrierResponse, EventKind, HeartbeatRequest, HeartbeatResponse, JobEvent,
    JoinRequest, JoinResponse, KvCompareAndSetRequest, KvCompareAndSetResponse, KvGetRequest,
    KvGetResponse, KvSetRequest, KvSetResponse, KvWaitRequest, KvWaitResponse, LeaveRequest,
    LeaveResponse, ReportDoneRequest, ReportDoneResponse, ReportFailureRequest,
    ReportFailureResponse, WatchEventsRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Coordinator;
use super::state::Refusal;

/// The gRPC face of a [`Coordinator`].
#[derive(Clone)]
pub(super) struct Service(pub(super) Arc<Coordinator>);

fn status(refusal: Refusal) -> Status {
    match refusal {
        Refusal::InvalidArgument(_) => Status::invalid_argument(refusal.to_string()),
        Refusal::WrongJob { .. } => Status::failed_precondition(refusal.to_string()),
    }
}

fn check_key(key: &str) -> Result<(), Status> {
    cohort_collectives::store::validate_key(key)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

impl Service {
    fn job(&self, job_id: &str) -> Result<(), Status> {
        self.0
            .apply(|st| st.check_job(job_id))
            .map(drop)
            .map_err(status)
    }
}

/// Removes a node from the rendezvous if its `Join` is dropped (the node
/// went away) before the generation formed.
struct PendingGuard {
    coordinator: Arc<Coordinator>,
    node_id: Option<String>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Some(node_id) = self.node_id.take() {
            self.coordinator.apply(|st| st.unregister_pending(&node_id));
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = request.into_inner();
        let mut changed = self.0.changed.subscribe();
        self.0
            .apply(|st| st.register(Instant::now(), &req))
            .map_err(status)?;
        let mut guard = PendingGuard {
            coordinator: self.0.clone(),
            node_id: Some(req.node_id.clone()),
        };
        loop {
            if let Some(response) = self.0.lock().poll_join(&req.node_id) {
                guard.node_id = None;
                return Ok(Response::new(response));
            }
            if changed.changed().await.is_err() {
                return Err(Status::unavailable("the coordinator is shutting down"));
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        let directive = self.0.apply(|st| st.heartbeat(Instant::now(), req));
        Ok(Response::new(HeartbeatResponse {
            directive: Some(directive),
        }))
    }

    async fn report_failure(
        &self,
        request: Request<ReportFailureRequest>,
    ) -> Result<Response<ReportFailureResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        Ok(Response::new(ReportFailureResponse {
            directive: Some(self.0.apply(|st| st.report_failure(Instant::now(), req))),
        }))
    }

    async fn report_done(
        &self,
        request: Request<ReportDoneRequest>,
    ) -> Result<Response<ReportDoneResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        Ok(Response::new(ReportDoneResponse {
            directive: Some(self.0.apply(|st| st.report_done(req))),
        }))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        self.0.apply(|st| st.leave(&req.node_id));
        Ok(Response::new(LeaveResponse {}))
    }

    async fn kv_set(
        &self,
        request: Request<KvSetRequest>,
    ) -> Result<Response<KvSetResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        check_key(&req.key)?;
        self.0.kv.set(req.generation, &req.key, req.value);
        self.0.save();
        Ok(Response::new(KvSetResponse {}))
    }

    async fn kv_get(
        &self,
        request: Request<KvGetRequest>,
    ) -> Result<Response<KvGetResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        check_key(&req.key)?;
        Ok(Response::new(KvGetResponse {
            value: self.0.kv.get(req.generation, &req.key),
        }))
    }

    async fn kv_wait(
        &self,
        request: Request<KvWaitRequest>,
    ) -> Result<Response<KvWaitResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        for key in &req.keys {
            check_key(key)?;
        }
        let timeout = Duration::from_millis(req.timeout_ms);
        let response = match self.0.kv.wait(req.generation, &req.keys, timeout).await {
            Ok(values) => KvWaitResponse {
                complete: true,
                values,
                missing: Vec::new(),
            },
            Err(missing) => KvWaitResponse {
                complete: false,
                values: Vec::new(),
                missing,
            },
        };
        Ok(Response::new(response))
    }

    async fn kv_compare_and_set(
        &self,
        request: Request<KvCompareAndSetRequest>,
    ) -> Result<Response<KvCompareAndSetResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        check_key(&req.key)?;
        let (swapped, current) = self.0.kv.compare_and_set(
            req.generation,
            &req.key,
            req.expected.as_deref(),
            req.desired,
        );
        self.0.save();
        Ok(Response::new(KvCompareAndSetResponse { swapped, current }))
    }

    async fn barrier(
        &self,
        request: Request<BarrierRequest>,
    ) -> Result<Response<BarrierResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        check_key(&req.name)?;
        let outcome = self
            .0
            .kv
            .barrier(
                req.generation,
                &req.name,
                &req.participant,
                req.count,
                Duration::from_millis(req.timeout_ms),
            )
            .await;
        Ok(Response::new(BarrierResponse {
            complete: outcome.complete,
            arrived: outcome.arrived,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.job(&request.into_inner().job_id)?;
        let mut events = self.0.subscribe();
        let first = self.0.snapshot();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let done = first.kind == EventKind::Finished as i32;
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let done = event.kind == EventKind::Finished as i32;
                        if tx.send(Ok(event)).await.is_err() || done {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
