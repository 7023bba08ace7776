//! The response body of the layer's service.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of a response from [`Idempotency`](crate::Idempotency): the inner service's
    /// body untouched (pass-through), a body the layer holds in full (a fresh response that
    /// was stored, a replay, a problem), or a stored-too-large response streamed on after
    /// the part that was read.
    ///
    /// Its errors are the inner body's. Trailers are passed on only for pass-through
    /// responses and the streamed rest of an over-large one; a body held in full has none.
    pub struct IdempotencyBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B>
    where
        B: Body,
    {
        Passthrough { #[pin] body: B },
        Full { data: Option<Bytes> },
        Rest { prefix: Option<Bytes>, rest: Pin<Box<B>> },
        Failed { prefix: Option<Bytes>, error: Option<B::Error> },
    }
}

impl<B: Body> IdempotencyBody<B> {
    /// The inner service's body, untouched.
    pub fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Passthrough { body },
        }
    }

    /// A body of exactly these bytes.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// The bytes already read, then the rest of `rest`.
    pub(crate) fn rest(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Rest {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }

    /// The bytes read before the inner body failed, then its error.
    pub(crate) fn failed(prefix: Bytes, error: B::Error) -> Self {
        Self {
            kind: Kind::Failed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                error: Some(error),
            },
        }
    }
}

impl<B> Body for IdempotencyBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { body } => body.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Rest { prefix, rest } => match prefix.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => rest.as_mut().poll_frame(cx),
            },
            KindProj::Failed { prefix, error } => match prefix.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Ready(error.take().map(Err)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Rest { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Kind::Failed { prefix, error } => prefix.is_none() && error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let prefix_len = |prefix: &Option<Bytes>| prefix.as_ref().map_or(0, |p| p.len() as u64);
        match &self.kind {
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Full { data } => SizeHint::with_exact(prefix_len(data)),
            Kind::Rest { prefix, rest } => {
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + prefix_len(prefix));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + prefix_len(prefix));
                }
                hint
            }
            Kind::Failed { prefix, .. } => {
                // The error ends the body early; promise no more than the bytes in hand.
                let mut hint = SizeHint::new();
                hint.set_lower(prefix_len(prefix));
                hint
            }
        }
    }
}

impl<B: Body> fmt::Debug for IdempotencyBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Full { .. } => "Full",
            Kind::Rest { .. } => "Rest",
            Kind::Failed { .. } => "Failed",
        };
        f.debug_struct("IdempotencyBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}
