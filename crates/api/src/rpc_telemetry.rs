//! Every gRPC call as the OpenTelemetry semantic conventions describe a server call: a
//! SERVER span named by the method (`taskpod.v1.TaskService/CreateTask`), continuing
//! the caller's W3C trace context from the request headers, with `rpc.system.name`,
//! `rpc.method`, `rpc.response.status_code`, `server.address` and `server.port`, and
//! the call's duration in `rpc.server.call.duration` (with the span's trace as
//! exemplar). No `rpc.service`: the conventions deprecated it for the fully qualified
//! `rpc.method` (`taskpod.v1.TaskService/CreateTask`), which holds the service.
//!
//! A tower layer around the whole server, not an interceptor, because the status is
//! known only at the end of the response: in the headers of a trailers-only error, or
//! in the trailers after the last message of a success or a stream. The response body
//! is wrapped to read it there; a body dropped before its end (the client went away)
//! ends the call as CANCELLED. Handlers run inside the span, so everything they do
//! (store statements, publishes, the trace context recorded on events) is part of the
//! call's trace.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http_body::{Body, Frame};
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use taskpod_core::telemetry::metrics::metrics;
use taskpod_core::telemetry::{spans, traces_exported};
use tracing::field::Empty;
use tracing::{Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Every method this server answers, fully qualified; anything else is `_OTHER`, so a
/// client probing random paths cannot grow the metric's label set.
pub const METHODS: &[&str] = &[
    "taskpod.v1.TaskService/CreateTask",
    "taskpod.v1.TaskService/CreateTasks",
    "taskpod.v1.TaskService/GetTask",
    "taskpod.v1.TaskService/ListTasks",
    "taskpod.v1.TaskService/CountTasks",
    "taskpod.v1.TaskService/StartPod",
    "taskpod.v1.TaskService/StopPod",
    "taskpod.v1.TaskService/RestartPod",
    "taskpod.v1.TaskService/ListActivePods",
    "taskpod.v1.TaskService/ListNodes",
    "taskpod.v1.TaskService/CompleteTask",
    "taskpod.v1.TaskService/CancelTask",
    "taskpod.v1.TaskService/TransitionPhase",
    "taskpod.v1.TaskService/ListTaskEvents",
    "taskpod.v1.TaskService/WatchTask",
    "taskpod.v1.TaskService/WatchTasks",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Names the task a call is about on its server span (handlers run inside it).
pub fn record_task(task_id: &impl std::fmt::Display) {
    Span::current().record("task_id", tracing::field::display(task_id));
}

/// `rpc.method` for a request path (`/pkg.Service/Method`).
pub fn method_of(path: &str) -> &'static str {
    let name = path.strip_prefix('/').unwrap_or(path);
    METHODS
        .iter()
        .copied()
        .find(|m| *m == name)
        .unwrap_or("_OTHER")
}

/// gRPC status code names, by number.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn code_name(code: usize) -> &'static str {
    CODES.get(code).copied().unwrap_or("UNKNOWN")
}

/// The codes the conventions count as a server's own failure; the others (a missing
/// task, a refused transition, a bad argument) are answers, not errors.
fn is_server_error(code: &str) -> bool {
    matches!(
        code,
        "UNKNOWN"
            | "DEADLINE_EXCEEDED"
            | "UNIMPLEMENTED"
            | "INTERNAL"
            | "UNAVAILABLE"
            | "DATA_LOSS"
    )
}

/// `grpc-status` from headers or trailers.
fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(code_name(value.parse().ok()?))
}

/// Reads the W3C headers of a request.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Wraps every service of the server (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcTelemetryLayer;

impl<S> tower::Layer<S> for RpcTelemetryLayer {
    type Service = RpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTelemetry { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RpcTelemetry<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcTelemetry<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = method_of(request.uri().path());
        let span = if traces_exported() {
            server_span(method, &request)
        } else {
            Span::none()
        };
        let started = Instant::now();
        let call = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let response = call.await?;
            let early = grpc_status(response.headers());
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(
                parts,
                TracedBody {
                    inner: body,
                    call: Some(Call {
                        span,
                        method,
                        started,
                        status: early,
                    }),
                },
            ))
        })
    }
}

/// The SERVER span of a call, continuing the caller's trace context.
fn server_span<B>(method: &'static str, request: &http::Request<B>) -> Span {
    let (address, port) = server_address(request).unzip();
    let span = tracing::info_span!(
        target: spans::TARGET,
        "rpc",
        otel.name = method,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system.name = "grpc",
        rpc.method = method,
        rpc.response.status_code = Empty,
        server.address = address,
        server.port = port,
        task_id = Empty,
    );
    let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
    // A span is built lazily, so the parent set here is the one it starts with.
    let _ = span.set_parent(parent);
    span
}

/// The longest `:authority` host taken as `server.address` (a DNS name is at most 253
/// characters): a client's header is not copied onto every span at any length.
const MAX_HOST: usize = 253;

/// `server.address` and `server.port`: the authority the client called (its name for
/// this server, behind a load balancer too), else the socket the call came in on.
fn server_address<B>(request: &http::Request<B>) -> Option<(String, u16)> {
    let local = local_addr(request.extensions());
    match request.uri().authority() {
        Some(a) if a.host().len() <= MAX_HOST => {
            let default = if request.uri().scheme_str() == Some("https") {
                443
            } else {
                80
            };
            let port = a.port_u16().or(local.map(|l| l.port())).unwrap_or(default);
            Some((a.host().to_owned(), port))
        }
        _ => local.map(|l| (l.ip().to_string(), l.port())),
    }
}

/// The local end of the call's connection, plain or TLS.
fn local_addr(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::local_addr)
}

/// What is left to record when the response ends.
#[derive(Debug)]
struct Call {
    span: Span,
    method: &'static str,
    started: Instant,
    /// A trailers-only response's status, read from its headers.
    status: Option<&'static str>,
}

impl Call {
    fn end(self, status: &'static str) {
        let _in_span = self.span.enter();
        self.span.record("rpc.response.status_code", status);
        if is_server_error(status) {
            self.span.record("otel.status_code", "ERROR");
        }
        metrics().rpc_call(self.method, status, self.started.elapsed().as_secs_f64());
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its call's span when the status is known.
    pub struct TracedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for TracedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its end: the client cancelled (or the server cut the call
            // off at the end of a drain).
            if let Some(call) = this.project().call.take() {
                let status = call.status.unwrap_or("CANCELLED");
                call.end(status);
            }
        }
    }
}

impl<B: Body> Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let _in_span = this.call.as_ref().map(|c| c.span.enter());
        let polled = this.inner.poll_frame(cx);
        let status = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                frame.trailers_ref().map(|t| grpc_status(t).unwrap_or("OK"))
            }
            Poll::Ready(Some(Err(_))) => Some("INTERNAL"),
            Poll::Ready(None) => Some(this.call.as_ref().and_then(|c| c.status).unwrap_or("OK")),
            Poll::Pending => None,
        };
        drop(_in_span);
        if let Some(status) = status
            && let Some(call) = this.call.take()
        {
            call.end(status);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn every_method_the_contract_defines_has_its_name_and_others_are_other() {
        let set = prost_types::FileDescriptorSet::decode(taskpod_proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes");
        let mut defined = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let name = format!("{}.{}/{}", file.package(), service.name(), method.name());
                    assert_eq!(method_of(&format!("/{name}")), name);
                    defined += 1;
                }
            }
        }
        assert_eq!(defined, 16);
        assert_eq!(
            method_of("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(method_of("/taskpod.v1.TaskService/DropTables"), "_OTHER");
        assert_eq!(method_of("/"), "_OTHER");
    }

    #[test]
    fn the_server_address_is_the_called_authority_else_the_local_socket() {
        let called = http::Request::get("http://api.example:50051/taskpod.v1.TaskService/GetTask")
            .body(())
            .unwrap();
        assert_eq!(
            server_address(&called),
            Some(("api.example".to_owned(), 50051))
        );
        let tls = http::Request::get("https://api.example/x")
            .body(())
            .unwrap();
        assert_eq!(server_address(&tls), Some(("api.example".to_owned(), 443)));
        let mut bare = http::Request::get("/x").body(()).unwrap();
        assert_eq!(server_address(&bare), None);
        let local = "10.0.0.7:50051".parse().unwrap();
        bare.extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: Some(local),
                remote_addr: None,
            });
        assert_eq!(server_address(&bare), Some(("10.0.0.7".to_owned(), 50051)));
        let long = format!("http://{}.example/x", "a".repeat(300));
        let mut long = http::Request::get(long).body(()).unwrap();
        long.extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: Some(local),
                remote_addr: None,
            });
        assert_eq!(server_address(&long), Some(("10.0.0.7".to_owned(), 50051)));
    }

    #[test]
    fn statuses_are_named_and_only_server_failures_are_errors() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&h), Some("NOT_FOUND"));
        h.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(grpc_status(&h), Some("UNKNOWN"));
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&h), None);
        assert!(!is_server_error("NOT_FOUND"));
        assert!(!is_server_error("FAILED_PRECONDITION"));
        assert!(is_server_error("UNAVAILABLE"));
        assert!(is_server_error("INTERNAL"));
    }
}
