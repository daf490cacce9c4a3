//! The connection every client command uses: one lazily connected channel, the bearer
//! token on every call, the actor on every change, and the per-call deadline.

use std::time::Duration;

use taskpod_proto::v1;
use taskpod_proto::v1::task_service_client::TaskServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::config::Settings;
use crate::error::CliError;

/// The generated client with the bearer token attached.
pub type Grpc = TaskServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Debug, Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connected (lazily) client with the caller's identity and deadline.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: Grpc,
    actor: String,
    timeout: Duration,
}

/// `host:port` means `http://host:port`.
pub fn normalize_address(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

/// The endpoint for `address` (`host:port` means plain `http://`; `https://` uses TLS
/// with the system's roots), with `timeout` as its connect timeout.
///
/// # Errors
/// A malformed address or a scheme other than http and https (usage errors).
pub fn endpoint(address: &str, timeout: Duration) -> Result<Endpoint, CliError> {
    let address = normalize_address(address);
    let bad_address =
        |reason: String| CliError::Usage(format!("invalid address {address:?}: {reason}"));
    let mut endpoint = Endpoint::from_shared(address.clone())
        .map_err(|e| bad_address(e.to_string()))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    if address.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_native_roots())
            .map_err(|e| bad_address(e.to_string()))?;
    } else if !address.starts_with("http://") {
        return Err(bad_address("the scheme must be http or https".into()));
    }
    Ok(endpoint)
}

impl Client {
    /// Prepares a channel to the configured address; nothing is sent until the first
    /// call, whose error then says why the server cannot be reached.
    ///
    /// # Errors
    /// A malformed address or a token that cannot be sent as a header (usage errors).
    pub fn connect(settings: &Settings, timeout: Duration) -> Result<Self, CliError> {
        let endpoint = endpoint(&settings.address, timeout)?
            // Watch streams sit idle for long stretches: pings find a dead peer (or a
            // NAT that forgot us) so the stream can resume elsewhere.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let token = settings
            .token
            .as_deref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        CliError::Usage(
                            "the token contains characters a header cannot carry".into(),
                        )
                    })
            })
            .transpose()?;
        let channel = endpoint.connect_lazy();
        Ok(Self {
            grpc: TaskServiceClient::with_interceptor(channel, BearerToken(token)),
            actor: settings.actor.clone().unwrap_or_default(),
            timeout,
        })
    }

    /// The generated client (cheap to clone: it shares the channel).
    pub fn grpc(&self) -> Grpc {
        self.grpc.clone()
    }

    /// A unary request with the per-call deadline, sent to the server as
    /// `grpc-timeout` and enforced here too.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// A streaming request: no deadline, it lives as long as the stream.
    pub fn stream_request<T>(&self, message: T) -> Request<T> {
        Request::new(message)
    }

    /// Attribution for a change: the configured actor (empty lets the server use the
    /// token's principal) and an optional AIP-155 request id.
    pub fn meta(&self, request_id: Option<&str>) -> Option<v1::RequestMeta> {
        Some(v1::RequestMeta {
            actor_id: self.actor.clone(),
            correlation_id: String::new(),
            request_id: request_id.unwrap_or_default().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(address: &str, token: Option<&str>) -> Settings {
        Settings {
            address: address.into(),
            token: token.map(str::to_owned),
            actor: Some("alice".into()),
            profile: None,
        }
    }

    #[tokio::test]
    async fn addresses_without_a_scheme_are_plain_http() {
        assert_eq!(normalize_address("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(normalize_address("https://h:1"), "https://h:1");
        let client =
            Client::connect(&settings("127.0.0.1:1", None), Duration::from_secs(1)).unwrap();
        assert_eq!(client.meta(Some("r1")).unwrap().actor_id, "alice");
    }

    #[tokio::test]
    async fn bad_addresses_and_tokens_are_usage_errors() {
        let err = Client::connect(&settings("ftp://x", None), Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Client::connect(&settings("http://x", Some("a\nb")), Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn the_token_travels_as_a_bearer_header() {
        let value = "Bearer s3cret".parse().unwrap();
        let mut auth = BearerToken(Some(value));
        let request = auth.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let request = BearerToken(None).call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let client = Client::connect(
            &settings("http://127.0.0.1:1", None),
            Duration::from_secs(2),
        )
        .unwrap();
        let status = client
            .grpc()
            .get_task(client.request(v1::GetTaskRequest {
                task_id: "x".into(),
            }))
            .await
            .unwrap_err();
        let err = CliError::from(status);
        assert_eq!(err.exit_code(), 7, "{err}");
    }
}
