//! What a communicator between processes is told: the job token, the
//! addresses, the timeouts, the transport.

use std::time::Duration;

use crate::types::TransportKind;

/// How a rank of a communicator between processes finds and authenticates
/// its peers (through the store and TCP addresses), and which pipes it uses.
#[derive(Clone)]
pub struct TcpConfig {
    /// The job secret every rank proves on connect.
    pub token: Vec<u8>,
    /// The address the listener binds.
    pub bind_host: String,
    /// The address published to peers.
    pub advertise_host: String,
    /// How long bootstrap (store wait, connect, handshakes) may take.
    pub connect_timeout: Duration,
    /// Timeout of an op whose `OpOptions::timeout` is `None`.
    pub default_timeout: Duration,
    /// Shared memory or TCP with peers on this host (`parallel.transport`).
    pub transport: TransportKind,
    /// This rank's host identity, when not the one of this process
    /// (hostname, boot id, network namespace): ranks with equal identities
    /// use shared memory. For tests that make one host look like several.
    pub host_id: Option<String>,
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig")
            .field("token", &"<redacted>")
            .field("bind_host", &self.bind_host)
            .field("advertise_host", &self.advertise_host)
            .field("connect_timeout", &self.connect_timeout)
            .field("default_timeout", &self.default_timeout)
            .field("transport", &self.transport)
            .field("host_id", &self.host_id)
            .finish()
    }
}

impl TcpConfig {
    /// A rank that proves `token` to its peers. With `host` (the address
    /// other hosts reach this one at) it binds `0.0.0.0` and advertises
    /// `host`; without, it binds and advertises `127.0.0.1` (one host).
    /// `timeout` is the default op timeout and the bootstrap timeout.
    /// Peers on this host use shared memory (`transport` = `Auto`).
    pub fn new(token: &[u8], host: Option<&str>, timeout: Duration) -> TcpConfig {
        let (bind_host, advertise_host) = match host {
            Some(host) => (String::from("0.0.0.0"), host.to_owned()),
            None => (String::from("127.0.0.1"), String::from("127.0.0.1")),
        };
        TcpConfig {
            token: token.to_vec(),
            bind_host,
            advertise_host,
            connect_timeout: timeout,
            default_timeout: timeout,
            transport: TransportKind::Auto,
            host_id: None,
        }
    }
}
