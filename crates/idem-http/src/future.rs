//! [`ResponseFuture`]: the future the [`Idempotency`](crate::Idempotency) service returns.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use crate::IdempotencyBody;

pub(crate) type Managed<B> =
    Pin<Box<dyn Future<Output = Response<IdempotencyBody<B>>> + Send + 'static>>;

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// A pass-through request polls the inner service's future in place (no allocation); a
    /// keyed request runs a boxed future that never fails: every outcome, inner errors
    /// included, is a response. Dropping it (a client that went away) does not cancel the
    /// inner call of a keyed request, which runs on its own task.
    pub struct ResponseFuture<F, B, E>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E>
    where
        B: Body,
    {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<IdempotencyBody<B>>> },
        Managed { future: Managed<B>, error: PhantomData<fn() -> E> },
    }
}

impl<F, B: Body, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn ready(response: Response<IdempotencyBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn managed(future: Managed<B>) -> Self {
        Self {
            kind: Kind::Managed {
                future,
                error: PhantomData,
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<IdempotencyBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future
                .poll(cx)
                .map_ok(|response| response.map(IdempotencyBody::passthrough)),
            KindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            KindProj::Managed { future, .. } => future.as_mut().poll(cx).map(Ok),
        }
    }
}

impl<F, B: Body, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Managed { .. } => "Managed",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}
