//! Serving: the task service behind authentication, gRPC health and reflection, with a
//! graceful drain.

use std::time::Duration;

use taskpod_core::store::Store;
use taskpod_core::telemetry::{Role, exposition};
use taskpod_proto::v1::task_service_server::TaskServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::admission::{Admission, AdmissionLayer};
use crate::auth::Authenticator;
use crate::hub::Hub;
use crate::oversized::OversizedLayer;
use crate::page_token::PageTokens;
use crate::rpc_telemetry::RpcTelemetryLayer;
use crate::service::TaskApi;
use crate::settings::ApiSettings;
use crate::watch::Watches;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot reach the store")]
    Store(#[from] taskpod_core::Error),
    #[error("cannot read TLS {what} from {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Bus(String),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves until `shutdown` is cancelled, then drains: health turns NOT_SERVING at once,
/// watch streams end, in-flight calls get `shutdown_grace_ms` to finish. With
/// `metrics`, serves `GET /metrics` there until the drain ends.
///
/// # Errors
/// When the store is unreachable at start, TLS files cannot be read, or the transport
/// fails.
pub async fn serve(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    settings: ApiSettings,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let store = Store::connect(&settings.store).await?;
    store.ensure_event_partitions().await?;
    let tokens = PageTokens::new(&settings.page_tokens);
    // Owns every task this server starts (watch relays, maintenance, the publisher).
    let tracker = TaskTracker::new();
    taskpod_core::telemetry::metrics::metrics().known_series(Role::Api, None);
    let bus = taskpod_core::bus::Publisher::start(&settings.bus, &tracker)
        .map_err(|e| ServeError::Bus(e.to_string()))?;
    // Every write announces what it committed, through the store.
    let store = store.with_bus(bus.clone());
    if let Some(metrics) = metrics {
        tracker.spawn(exposition::serve(metrics, Role::Api, shutdown.clone()));
    }
    tracker.spawn(prune_idempotency_keys(
        store.clone(),
        Duration::from_secs(settings.idempotency_ttl_secs),
        shutdown.clone(),
    ));

    let hub = Hub::start(
        store.clone(),
        &settings.bus,
        Duration::from_millis(settings.watch.poll_interval_ms),
        Duration::from_millis(settings.watch.repair_interval_ms),
        shutdown.clone(),
        &tracker,
    );
    let admission = Admission::new(&settings.limits, Authenticator::new(&settings.auth));
    tracker.spawn(forget_idle_callers(admission.clone(), shutdown.clone()));
    let watches = Watches::new(
        store.clone(),
        tokens.clone(),
        settings.watch.clone(),
        shutdown.clone(),
        tracker.clone(),
        hub.clone(),
        admission.expensive(),
    );
    let api = TaskApi::new(
        store,
        tokens,
        watches,
        Duration::from_millis(settings.pod_wait_ms),
        hub,
        &tracker,
    )
    .with_max_page_bytes(settings.max_page_bytes);
    let auth = Authenticator::new(&settings.auth);
    let service = TaskServiceServer::new(api)
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes);
    let service = tonic::service::interceptor::InterceptedService::new(service, move |req| {
        auth.intercept(req)
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TaskServiceServer<TaskApi>>().await;
    // Both reflection versions: grpcio's reflection client, Postman and older grpcurl
    // speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(taskpod_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = if settings.reflection {
        (
            Some(reflection().build_v1()?),
            Some(reflection().build_v1alpha()?),
        )
    } else {
        (None, None)
    };

    let limits = &settings.limits;
    let mut builder = Server::builder()
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.http2_max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(limits.http2_max_local_error_reset_streams))
        .http2_keepalive_interval(Some(Duration::from_millis(
            limits.http2_keepalive_interval_ms,
        )))
        .http2_keepalive_timeout(Some(Duration::from_millis(
            limits.http2_keepalive_timeout_ms,
        )))
        .http2_max_header_list_size(limits.http2_max_header_list_bytes)
        // Bounds a call until its response starts: a whole unary call, and only the
        // opening of a stream (streams have their own age limit).
        .timeout(Duration::from_millis(limits.request_timeout_ms))
        .concurrency_limit_per_connection(limits.per_connection_in_flight);
    if let Some(tls) = &settings.tls {
        let read = |what, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ServeError::TlsFile {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        let identity = Identity::from_pem(
            read("certificate", &tls.cert_path)?,
            read("key", &tls.key_path)?,
        );
        builder = builder.tls_config(ServerTlsConfig::new().identity(identity))?;
    }

    let drain = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        async move {
            shutdown.cancelled().await;
            health.set_not_serving::<TaskServiceServer<TaskApi>>().await;
            tracing::info!("draining");
        }
    };
    let grace = Duration::from_millis(settings.shutdown_grace_ms);
    let serving = builder
        .layer(RpcTelemetryLayer)
        .layer(OversizedLayer)
        .layer(AdmissionLayer::new(admission))
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(listener), drain);
    let result = {
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => result,
            // In-flight calls past the grace period are cut off.
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("grace period over, closing remaining calls");
                Ok(())
            }
        }
        // The services go with the server here, and with them the create batcher's
        // last handle: its flushers end once they have answered what queued.
    };
    // Store clones hold the publisher: it stops when told, after what is queued.
    bus.close();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within the grace period");
    }
    Ok(result?)
}

/// Accepted connections with Nagle's algorithm off. tonic sets TCP_NODELAY only on
/// sockets it accepts itself; without it here, a small response written after the
/// client's delayed ACK window waited for it: `taskpod bench list` showed pages at
/// either 5-8 ms or about 48 ms, the extra 40 ms being Linux's delayed-ACK timer.
fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// Forgets request ids past their TTL, hourly. Any replica may run it; the deletes are
/// idempotent.
async fn prune_idempotency_keys(store: Store, ttl: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match store.prune_idempotency_keys(ttl).await {
            Ok(n) if n > 0 => tracing::info!(pruned = n, "idempotency keys pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning idempotency keys failed"),
        }
    }
}

/// Lets the rate limiter forget callers (peer addresses come and go) once a minute.
async fn forget_idle_callers(admission: Admission, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => admission.forget_idle(),
            () = shutdown.cancelled() => return,
        }
    }
}
