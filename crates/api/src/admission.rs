//! Admission: whether the replica takes a call on, decided before a handler runs or a
//! store connection is spent on it.
//!
//! - Per caller (a token's principal; a caller without a valid token, or any caller
//!   while authentication is off, by its peer address): a rate (GCRA, `governor`) and
//!   a number of unary calls in flight.
//! - Per replica: a number of unary calls in flight, so load is shed before the store
//!   pool's queue grows without bound, and a separate, smaller budget for expensive
//!   reads (CountTasks; WatchTasks snapshots take it in the relay) so they cannot
//!   starve cheap ones.
//! - Streams (WatchTask, WatchTasks, health Watch, reflection) are counted apart from
//!   calls: a number open per caller, and an age after which the stream ends with
//!   UNAVAILABLE so its client resumes (from its last version or token), possibly on
//!   another replica.
//!
//! A refusal is RESOURCE_EXHAUSTED with RetryInfo, answered before the request's body
//! is read. HTTP/2 limits (streams per connection, reset floods, keepalive, header
//! size) and the unary request timeout are the transport's, set in `server.rs`.

use std::collections::HashMap;
use std::future::Future as _;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body::Frame;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::auth::Authenticator;
use crate::errors::DOMAIN;

/// The limits, all finite; `docs/api.md` lists them with their defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// HTTP/2 streams one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub http2_max_concurrent_streams: u32,
    /// Streams a client may open and reset before the server reads them; past it the
    /// connection is closed (the "rapid reset" flood, CVE-2023-44487).
    pub http2_max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for a client's protocol errors before it closes
    /// the connection (RUSTSEC-2024-0003; tonic leaves it unlimited).
    pub http2_max_local_error_reset_streams: usize,
    /// HTTP/2 PING interval, and how long an answer may take before the connection is
    /// closed: a silent peer's streams end instead of living on.
    pub http2_keepalive_interval_ms: u64,
    pub http2_keepalive_timeout_ms: u64,
    /// The largest header list a request may send.
    pub http2_max_header_list_bytes: u32,
    /// A unary call's longest run (streams have their own age limit below).
    pub request_timeout_ms: u64,
    /// Unary calls one connection may run at once; more wait for a slot.
    pub per_connection_in_flight: usize,
    /// Unary calls the replica runs at once; past it calls are refused at once.
    pub max_in_flight: usize,
    /// Expensive reads (CountTasks, WatchTasks snapshots) the replica runs at once.
    pub expensive_in_flight: usize,
    /// Calls per second each caller may start, and how many at once above that rate.
    pub per_caller_rate: u32,
    pub per_caller_burst: u32,
    /// Unary calls each caller may have in flight.
    pub per_caller_in_flight: usize,
    /// Streams each caller may have open.
    pub per_caller_streams: usize,
    /// A stream's longest life; it then ends with UNAVAILABLE and its client resumes.
    pub stream_max_age_secs: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            http2_max_concurrent_streams: 1024,
            http2_max_pending_accept_reset_streams: 20,
            http2_max_local_error_reset_streams: 1024,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 10_000,
            http2_max_header_list_bytes: 16 * 1024,
            request_timeout_ms: 60_000,
            per_connection_in_flight: 512,
            max_in_flight: 2048,
            expensive_in_flight: 4,
            per_caller_rate: 20_000,
            per_caller_burst: 2_000,
            per_caller_in_flight: 1024,
            per_caller_streams: 2048,
            stream_max_age_secs: 3600,
        }
    }
}

impl LimitSettings {
    /// The setting (`limits.*`) of the first limit that is zero, which would refuse
    /// everything.
    pub fn zero(&self) -> Option<&'static str> {
        [
            (
                "limits.http2_max_concurrent_streams",
                self.http2_max_concurrent_streams as u64,
            ),
            (
                "limits.http2_max_pending_accept_reset_streams",
                self.http2_max_pending_accept_reset_streams as u64,
            ),
            (
                "limits.http2_max_local_error_reset_streams",
                self.http2_max_local_error_reset_streams as u64,
            ),
            (
                "limits.http2_keepalive_interval_ms",
                self.http2_keepalive_interval_ms,
            ),
            (
                "limits.http2_keepalive_timeout_ms",
                self.http2_keepalive_timeout_ms,
            ),
            (
                "limits.http2_max_header_list_bytes",
                u64::from(self.http2_max_header_list_bytes),
            ),
            ("limits.request_timeout_ms", self.request_timeout_ms),
            (
                "limits.per_connection_in_flight",
                self.per_connection_in_flight as u64,
            ),
            ("limits.max_in_flight", self.max_in_flight as u64),
            (
                "limits.expensive_in_flight",
                self.expensive_in_flight as u64,
            ),
            ("limits.per_caller_rate", u64::from(self.per_caller_rate)),
            ("limits.per_caller_burst", u64::from(self.per_caller_burst)),
            (
                "limits.per_caller_in_flight",
                self.per_caller_in_flight as u64,
            ),
            ("limits.per_caller_streams", self.per_caller_streams as u64),
            ("limits.stream_max_age_secs", self.stream_max_age_secs),
        ]
        .into_iter()
        .find_map(|(name, v)| (v == 0).then_some(name))
    }
}

/// What a call is, for admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Unary,
    Expensive,
    Stream,
}

fn shape_of(path: &str) -> Shape {
    match path {
        "/taskpod.v1.TaskService/WatchTask"
        | "/taskpod.v1.TaskService/WatchTasks"
        | "/grpc.health.v1.Health/Watch"
        | "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" => Shape::Stream,
        "/taskpod.v1.TaskService/CountTasks" => Shape::Expensive,
        _ => Shape::Unary,
    }
}

/// The replica's admission state; cheap to clone.
#[derive(Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

struct Shared {
    auth: Authenticator,
    rate: DefaultKeyedRateLimiter<String>,
    in_flight: Arc<Semaphore>,
    expensive: Arc<Semaphore>,
    per_caller_in_flight: usize,
    per_caller_streams: usize,
    stream_max_age: Duration,
    /// Unary calls and streams per caller; an entry goes when both reach zero.
    callers: Mutex<HashMap<String, Counts>>,
}

#[derive(Default)]
struct Counts {
    calls: usize,
    streams: usize,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

impl Admission {
    pub fn new(settings: &LimitSettings, auth: Authenticator) -> Self {
        let rate = NonZeroU32::new(settings.per_caller_rate).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.per_caller_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            shared: Arc::new(Shared {
                auth,
                rate: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
                in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
                expensive: Arc::new(Semaphore::new(settings.expensive_in_flight)),
                per_caller_in_flight: settings.per_caller_in_flight,
                per_caller_streams: settings.per_caller_streams,
                stream_max_age: Duration::from_secs(settings.stream_max_age_secs),
                callers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The expensive-read budget, for work that runs outside a call (snapshots).
    pub fn expensive(&self) -> Arc<Semaphore> {
        self.shared.expensive.clone()
    }

    /// Forgets the rate state of callers idle long enough to be back at full burst:
    /// peer addresses come and go, and the limiter must not grow with them.
    pub fn forget_idle(&self) {
        self.shared.rate.retain_recent();
        self.shared.rate.shrink_to_fit();
    }

    /// Callers the rate limiter remembers.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.shared.rate.len()
    }

    /// Admits a call from `caller` of `shape`, or says why not.
    fn admit(&self, caller: String, shape: Shape) -> Result<Admitted, Status> {
        let s = &self.shared;
        if let Err(not_until) = s.rate.check_key(&caller) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(exhausted("CALLER_RATE", "this caller's call rate", wait));
        }
        let mut guard = Admitted {
            admission: self.clone(),
            caller: caller.clone(),
            stream: shape == Shape::Stream,
            permits: Vec::new(),
            counted: false,
        };
        {
            let mut callers = s
                .callers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let counts = callers.entry(caller).or_default();
            if guard.stream {
                if counts.streams >= s.per_caller_streams {
                    return Err(exhausted(
                        "CALLER_STREAMS",
                        "this caller's open streams",
                        Duration::from_secs(1),
                    ));
                }
                counts.streams += 1;
            } else {
                if counts.calls >= s.per_caller_in_flight {
                    return Err(exhausted(
                        "CALLER_IN_FLIGHT",
                        "this caller's calls in flight",
                        Duration::from_millis(100),
                    ));
                }
                counts.calls += 1;
            }
            guard.counted = true;
        }
        if !guard.stream {
            let permit = s.in_flight.clone().try_acquire_owned().map_err(|_| {
                exhausted(
                    "REPLICA_IN_FLIGHT",
                    "this replica's calls in flight",
                    Duration::from_millis(100),
                )
            })?;
            guard.permits.push(permit);
        }
        if shape == Shape::Expensive {
            let permit = s.expensive.clone().try_acquire_owned().map_err(|_| {
                exhausted(
                    "EXPENSIVE_IN_FLIGHT",
                    "this replica's expensive reads in flight",
                    Duration::from_millis(500),
                )
            })?;
            guard.permits.push(permit);
        }
        Ok(guard)
    }

    fn caller_of<B>(&self, request: &http::Request<B>) -> String {
        match self.shared.auth.principal(request.headers()) {
            Some(principal) => format!("principal:{principal}"),
            None => {
                let ext = request.extensions();
                let tcp = ext.get::<TcpConnectInfo>().or_else(|| {
                    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                        .map(TlsConnectInfo::get_ref)
                });
                let peer: Option<IpAddr> =
                    tcp.and_then(TcpConnectInfo::remote_addr).map(|a| a.ip());
                peer.map_or_else(|| "peer:unknown".to_owned(), |ip| format!("peer:{ip}"))
            }
        }
    }
}

/// RESOURCE_EXHAUSTED naming the limit, with when to retry.
fn exhausted(reason: &str, what: &str, retry_after: Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(retry_after.max(Duration::from_millis(1))));
    details.set_error_info(reason, DOMAIN, HashMap::new());
    details.add_quota_failure_violation(reason.to_lowercase(), format!("{what} is at its limit"));
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "{what} is at its limit; retry after {} ms",
            retry_after.as_millis().max(1)
        ),
        details,
    )
}

/// What an admitted call holds until its response body is done.
struct Admitted {
    admission: Admission,
    caller: String,
    stream: bool,
    permits: Vec<OwnedSemaphorePermit>,
    /// Whether the caller's count was raised (and must be lowered).
    counted: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let mut callers = self
            .admission
            .shared
            .callers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(counts) = callers.get_mut(&self.caller) {
            if self.stream {
                counts.streams = counts.streams.saturating_sub(1);
            } else {
                counts.calls = counts.calls.saturating_sub(1);
            }
            if counts.calls == 0 && counts.streams == 0 {
                callers.remove(&self.caller);
            }
        }
    }
}

/// Puts [`Admission`] around every service of the server.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    admission: Admission,
}

impl AdmissionLayer {
    pub fn new(admission: Admission) -> Self {
        Self { admission }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit {
            inner,
            admission: self.admission.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Admit<S> {
    inner: S,
    admission: Admission,
}

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for Admit<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let shape = shape_of(request.uri().path());
        let caller = self.admission.caller_of(&request);
        let admitted = match self.admission.admit(caller, shape) {
            Ok(admitted) => admitted,
            Err(status) => {
                let response = status.into_http::<Body>();
                return Box::pin(async move { Ok(response) });
            }
        };
        let max_age = admitted
            .stream
            .then_some(self.admission.shared.stream_max_age);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Body::new(AdmittedBody {
                    inner: body,
                    _admitted: admitted,
                    deadline: max_age.map(|age| Box::pin(tokio::time::sleep(age))),
                    ended: false,
                }),
            ))
        })
    }
}

/// A response body that holds its call's admission until it is done, and ends a stream
/// at its age limit with UNAVAILABLE.
struct AdmittedBody {
    inner: Body,
    _admitted: Admitted,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
}

impl http_body::Body for AdmittedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.ended = true;
            let mut trailers = http::HeaderMap::new();
            let status = Status::unavailable(
                "the stream reached its age limit (stream_max_age_secs): resume it",
            );
            return Poll::Ready(Some(match status.add_header(&mut trailers) {
                Ok(()) => Ok(Frame::trailers(trailers)),
                Err(e) => Err(e),
            }));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.deadline.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::settings::AuthSettings;

    fn admission(change: impl FnOnce(&mut LimitSettings)) -> Admission {
        let mut s = LimitSettings::default();
        change(&mut s);
        Admission::new(&s, Authenticator::new(&AuthSettings::default()))
    }

    #[test]
    fn streams_are_counted_apart_from_calls_and_released_when_done() {
        let a = admission(|s| {
            s.per_caller_in_flight = 2;
            s.per_caller_streams = 1;
        });
        let c1 = a.admit("alice".into(), Shape::Unary).unwrap();
        let _c2 = a.admit("alice".into(), Shape::Unary).unwrap();
        let refused = a.admit("alice".into(), Shape::Unary).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.get_error_details().retry_info().is_some());
        // Another caller is not affected, and a stream is not a call.
        let _b = a.admit("bob".into(), Shape::Unary).unwrap();
        let s1 = a.admit("alice".into(), Shape::Stream).unwrap();
        assert!(a.admit("alice".into(), Shape::Stream).is_err());
        drop(c1);
        let _c3 = a.admit("alice".into(), Shape::Unary).unwrap();
        drop(s1);
        let _s2 = a.admit("alice".into(), Shape::Stream).unwrap();
    }

    #[test]
    fn the_replica_budget_and_the_expensive_budget_are_shared_by_callers() {
        let a = admission(|s| {
            s.max_in_flight = 3;
            s.expensive_in_flight = 1;
        });
        let _e = a.admit("alice".into(), Shape::Expensive).unwrap();
        let refused = a.admit("bob".into(), Shape::Expensive).err().unwrap();
        assert!(refused.message().contains("expensive"), "{refused:?}");
        let _u1 = a.admit("bob".into(), Shape::Unary).unwrap();
        let _u2 = a.admit("carol".into(), Shape::Unary).unwrap();
        let refused = a.admit("dave".into(), Shape::Unary).err().unwrap();
        assert!(refused.message().contains("replica"), "{refused:?}");
        // Streams do not take the replica's call budget.
        let _s = a.admit("dave".into(), Shape::Stream).unwrap();
    }

    #[test]
    fn a_caller_over_its_rate_is_refused_with_when_to_retry() {
        let a = admission(|s| {
            s.per_caller_rate = 1;
            s.per_caller_burst = 3;
        });
        for _ in 0..3 {
            drop(a.admit("alice".into(), Shape::Unary).unwrap());
        }
        let refused = a.admit("alice".into(), Shape::Unary).err().unwrap();
        let retry = refused
            .get_error_details()
            .retry_info()
            .unwrap()
            .retry_delay
            .unwrap();
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_secs(1),
            "{retry:?}"
        );
        drop(a.admit("bob".into(), Shape::Unary).unwrap());
        // Counts are dropped with the last call; rate state stays until forgotten.
        assert!(a.shared.callers.lock().unwrap().is_empty());
        assert_eq!(a.remembered(), 2);
    }

    #[test]
    fn methods_have_their_shapes() {
        assert_eq!(
            shape_of("/taskpod.v1.TaskService/WatchTasks"),
            Shape::Stream
        );
        assert_eq!(
            shape_of("/taskpod.v1.TaskService/CountTasks"),
            Shape::Expensive
        );
        assert_eq!(shape_of("/taskpod.v1.TaskService/CreateTask"), Shape::Unary);
        assert_eq!(shape_of("/anything/else"), Shape::Unary);
        assert_eq!(LimitSettings::default().zero(), None);
        let zero = LimitSettings {
            per_caller_rate: 0,
            ..LimitSettings::default()
        };
        assert_eq!(zero.zero(), Some("limits.per_caller_rate"));
    }
}
