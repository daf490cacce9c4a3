//! `taskpod health`: asks a server's `grpc.health.v1.Health/Check` whether it serves.
//!
//! Container healthchecks and the Helm test Job run it, against an API replica's main
//! port or a worker's `health_listen` port. Health is served outside authentication, so
//! no token is sent and none is needed. It prints the status (`SERVING`, `NOT_SERVING`,
//! ...) and exits 0 only for SERVING: 13 for any other answer, 3 when the server does not
//! know the service, 7 when it cannot be reached in time (`docs/cli.md`).

use std::time::Duration;

use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::output::{self, Format};
use taskpod_client::config::GlobalArgs;
use taskpod_client::error::CliError;

/// The deadline of the check when `--timeout` is not given: shorter than other commands',
/// because a probe that waits long has its answer already.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The service to ask about (e.g. taskpod.v1.TaskService); empty means the whole
    /// server
    #[arg(long, default_value = "", value_name = "NAME")]
    pub service: String,
}

/// What `-o json` prints.
#[derive(Debug, Serialize)]
struct HealthView<'a> {
    address: &'a str,
    service: &'a str,
    status: &'a str,
}

/// Checks the configured address and prints the answer.
///
/// # Errors
/// [`CliError::NotServing`] for an answer other than SERVING, the RPC's error when the
/// call fails, a usage error for a bad address or configuration.
pub async fn run(global: &GlobalArgs, args: &HealthArgs) -> Result<(), CliError> {
    let settings = global.settings()?;
    let timeout = global.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let status = check(&settings.address, &args.service, timeout).await?;
    let name = status.as_str_name();
    let view = HealthView {
        address: &settings.address,
        service: &args.service,
        status: name,
    };
    match global.output {
        Format::Table | Format::Wide => output::emit_line(name)?,
        Format::Json => output::emit_line(&output::pretty(&view))?,
        Format::Jsonl => output::emit_line(&output::compact(&view))?,
    }
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(CliError::NotServing {
            service: args.service.clone(),
            status: name.to_owned(),
        })
    }
}

/// One `Health/Check` call with `timeout` as both the connect timeout and the call's
/// deadline. A status number this client does not know reads as UNKNOWN.
///
/// # Errors
/// A malformed address (usage), or the call's error status (unreachable: UNAVAILABLE;
/// too slow: DEADLINE_EXCEEDED; an unknown service: NOT_FOUND).
pub async fn check(
    address: &str,
    service: &str,
    timeout: Duration,
) -> Result<ServingStatus, CliError> {
    let channel = taskpod_client::client::endpoint(address, timeout)?.connect_lazy();
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    request.set_timeout(timeout);
    let response = HealthClient::new(channel).check(request).await?;
    Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::wrappers::TcpListenerStream;

    /// A health server on a free loopback port: the whole server SERVING, `busy`
    /// NOT_SERVING. It stops when the test's runtime ends.
    async fn serve() -> String {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("busy", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Keeps the reporter alive as long as the server.
            let _reporter = reporter;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn every_answer_maps_to_its_status_or_exit_code() {
        let address = serve().await;
        let timeout = Duration::from_secs(5);
        let status = check(&address, "", timeout).await.unwrap();
        assert_eq!(status, ServingStatus::Serving);
        let status = check(&address, "busy", timeout).await.unwrap();
        assert_eq!(status, ServingStatus::NotServing);
        let err = check(&address, "nobody", timeout).await.unwrap_err();
        assert_eq!(
            err.exit_code(),
            taskpod_client::error::exit::NOT_FOUND,
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_unavailable() {
        let err = check("http://127.0.0.1:1", "", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(
            err.exit_code(),
            taskpod_client::error::exit::UNAVAILABLE,
            "{err}"
        );
        let err = check("ftp://x", "", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), taskpod_client::error::exit::USAGE, "{err}");
    }
}
