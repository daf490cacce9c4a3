//! How every bus connection reaches Redis: one place for the socket settings the
//! publisher and the subscriptions share.
//!
//! Timeouts bound each connect and each reply where the connection is used; what the
//! socket adds is for a peer that vanished from the network: TCP keepalive probes an
//! idle connection, and `TCP_USER_TIMEOUT` ends one whose sent bytes go unacknowledged,
//! so the kernel closes it in seconds instead of retransmitting for about 15 minutes. A
//! peer whose kernel still acknowledges (a paused Redis, a proxy that holds the bytes)
//! is found by the publisher's reply timeout and the subscriptions' pings.

use std::time::Duration;

use redis::IntoConnectionInfo as _;
use redis::io::tcp::TcpSettings;

use super::{BusError, BusSettings};

/// Idle time before the first keepalive probe, the time between probes, and how many
/// unanswered probes end the connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_PROBES: u32 = 3;
/// How long sent bytes may go unacknowledged before the kernel ends the connection.
const USER_TIMEOUT: Duration = Duration::from_secs(15);

/// A client for `settings.url` whose connections use the settings above.
///
/// # Errors
/// [`BusError::InvalidUrl`].
pub(super) fn client(settings: &BusSettings) -> Result<redis::Client, BusError> {
    let invalid = |e: redis::RedisError| BusError::InvalidUrl(e.to_string());
    let info = settings
        .url
        .expose()
        .into_connection_info()
        .map_err(invalid)?;
    redis::Client::open(info.set_tcp_settings(tcp_settings())).map_err(invalid)
}

fn tcp_settings() -> TcpSettings {
    let tcp = TcpSettings::default().set_nodelay(true);
    #[cfg(target_os = "linux")]
    let tcp = tcp
        .set_keepalive(
            redis::io::tcp::socket2::TcpKeepalive::new()
                .with_time(KEEPALIVE_IDLE)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(KEEPALIVE_PROBES),
        )
        .set_user_timeout(USER_TIMEOUT);
    tcp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Secret;

    #[test]
    fn a_client_carries_the_socket_settings_and_bad_urls_are_refused() {
        let settings = BusSettings::with_url("redis://127.0.0.1:6379");
        let made = client(&settings).unwrap_or_else(|e| panic!("{e}"));
        let tcp = made.get_connection_info().tcp_settings();
        assert!(tcp.nodelay());
        #[cfg(target_os = "linux")]
        {
            assert!(tcp.keepalive().is_some());
            assert_eq!(tcp.user_timeout(), Some(USER_TIMEOUT));
        }
        let bad = BusSettings {
            url: Secret::new("http://nope"),
            ..settings
        };
        assert!(matches!(client(&bad), Err(BusError::InvalidUrl(_))));
    }
}
