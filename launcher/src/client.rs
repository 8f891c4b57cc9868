//! gRPC client of the coordinator: connection with retries and backoff, the
//! token on every call, and `Status` turned into [`LauncherError`].

use std::time::{Duration, Instant};

use cohort_proto::v1::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::LauncherError;
use crate::auth::BearerToken;

/// A coordinator client that sends the job token with every call.
pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// An endpoint for `addr` (HOST:PORT) with the launcher's HTTP/2 settings.
pub fn endpoint(addr: &str) -> Result<Endpoint, LauncherError> {
    if addr
        .rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        return Err(LauncherError::InvalidAddress {
            addr: addr.to_owned(),
            reason: "no port".to_owned(),
        });
    }
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| LauncherError::InvalidAddress {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })
        .map(|e| {
            e.connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
        })
}

/// Connects to the coordinator at `addr`, retrying with exponential backoff
/// (100 ms doubling up to 2 s) for up to `retry_for`.
pub async fn connect(
    addr: &str,
    token: &str,
    retry_for: Duration,
) -> Result<Client, LauncherError> {
    let endpoint = endpoint(addr)?;
    let auth = BearerToken::new(token)?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(CoordinatorClient::with_interceptor(channel, auth));
            }
            Err(e) => {
                let waited = start.elapsed();
                if waited >= retry_for {
                    return Err(LauncherError::Unreachable {
                        addr: addr.to_owned(),
                        attempts,
                        waited,
                        last_error: error_chain(&e),
                    });
                }
                tracing::debug!(
                    "coordinator {addr} not reachable yet ({e}); retrying in {pause:?}"
                );
                tokio::time::sleep(pause.min(retry_for - waited)).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

pub use cohort_contract::error_chain;

/// A failed call as a [`LauncherError`]; a refused token says so.
pub fn rpc_error(addr: &str, call: &'static str, status: tonic::Status) -> LauncherError {
    if status.code() == tonic::Code::Unauthenticated {
        LauncherError::Unauthenticated {
            addr: addr.to_owned(),
            message: status.message().to_owned(),
        }
    } else {
        LauncherError::Rpc {
            addr: addr.to_owned(),
            call,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}
