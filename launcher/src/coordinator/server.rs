//! A coordinator on a socket: bind, serve the service behind the token check,
//! run the clock that drives the time-based decisions, shut down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_proto::v1::coordinator_server::CoordinatorServer;
use tokio::sync::oneshot;

use super::service::Service;
use super::{Coordinator, CoordinatorConfig};
use crate::LauncherError;
use crate::auth::TokenCheck;

/// A coordinator serving on a socket, with its clock task.
pub struct RunningCoordinator {
    addr: SocketAddr,
    coordinator: Arc<Coordinator>,
    restored: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    clock: tokio::task::JoinHandle<()>,
}

impl RunningCoordinator {
    /// Binds `bind` (port 0: any free port) and serves. Must run inside a
    /// tokio runtime.
    pub async fn start(bind: &str, config: CoordinatorConfig) -> Result<Self, LauncherError> {
        let (coordinator, restored) = Coordinator::open(&config)?;
        let bind_error = |source| LauncherError::Bind {
            addr: bind.to_owned(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let token = TokenCheck::new(&config.token);
        let service =
            CoordinatorServer::with_interceptor(Service(coordinator.clone()), move |req| {
                token.check(req)
            });
        let (shutdown, signal) = oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(1 << 20))
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = signal.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!("coordinator server on {addr} stopped: {e}");
            }
        });
        let clock = {
            let coordinator = coordinator.clone();
            let tick = config.tick;
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(tick);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    coordinator.tick(Instant::now());
                }
            })
        };
        Ok(Self {
            addr,
            coordinator,
            restored,
            shutdown: Some(shutdown),
            server,
            clock,
        })
    }

    /// The address it listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// With `--state-dir` holding a saved job: the line that says which
    /// job this coordinator carries on, and where it was.
    pub fn restored(&self) -> Option<&str> {
        self.restored.as_deref()
    }

    /// The job state.
    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    /// Stops serving.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.clock.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.server).await;
        self.server.abort();
    }
}
