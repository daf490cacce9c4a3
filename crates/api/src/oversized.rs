//! A request larger than `max_message_bytes` is RESOURCE_EXHAUSTED, as the gRPC spec
//! says of a message over the receiver's limit. tonic answers OUT_OF_RANGE, which
//! clients read as a bad argument about a value; this layer rewrites that one answer,
//! wherever it is (the headers of a trailers-only response, or the trailers after
//! them), and leaves every other status alone. tests/tests/api.rs sends an oversized
//! request through the server, so a tonic upgrade that words the refusal differently
//! is caught there.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body::Frame;
use tonic::body::Body;
use tonic::{Code, Status};

/// How tonic begins the message of a request over the decoding limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

#[derive(Clone, Copy, Debug, Default)]
pub struct OversizedLayer;

impl<S> tower::Layer<S> for OversizedLayer {
    type Service = Oversized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversized { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Oversized<S> {
    inner: S,
}

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for Oversized<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            let mut response = call.await?;
            rewrite(response.headers_mut());
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Body::new(RewrittenTrailers { inner: body }),
            ))
        })
    }
}

/// A response body whose trailers go through [`rewrite`].
struct RewrittenTrailers {
    inner: Body,
}

impl http_body::Body for RewrittenTrailers {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite(&mut trailers);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Turns tonic's OUT_OF_RANGE for an oversized request into RESOURCE_EXHAUSTED.
fn rewrite(headers: &mut http::HeaderMap) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() != Code::OutOfRange || !status.message().starts_with(TONIC_TOO_LARGE) {
        return;
    }
    // "…: found N bytes, the limit is: M bytes" becomes the reason a client reads.
    let detail = status
        .message()
        .strip_prefix(TONIC_TOO_LARGE)
        .unwrap_or_default()
        .trim_start_matches(':')
        .trim();
    let exhausted = Status::resource_exhausted(format!(
        "the request message is too large ({detail}); send less per call (max_message_bytes)"
    ));
    // Writing a status into headers fails only on bytes a header cannot hold; the
    // message above is ASCII, so the original answer stays only in that impossible case.
    let _ = exhausted.add_header(headers);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers_of(status: &Status) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        status.add_header(&mut h).unwrap();
        h
    }

    #[test]
    fn tonics_oversized_refusal_becomes_resource_exhausted() {
        let mut h = headers_of(&Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        ));
        rewrite(&mut h);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message().contains("found 5000000 bytes"),
            "{}",
            s.message()
        );
    }

    #[test]
    fn every_other_status_is_left_alone() {
        for status in [
            Status::out_of_range("page beyond the end"),
            Status::invalid_argument("Error, decoded message length too large"),
            Status::ok(""),
        ] {
            let mut h = headers_of(&status);
            let before = h.clone();
            rewrite(&mut h);
            assert_eq!(h, before);
        }
        let mut empty = http::HeaderMap::new();
        rewrite(&mut empty);
        assert!(empty.is_empty());
    }
}
