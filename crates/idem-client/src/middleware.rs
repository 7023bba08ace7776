//! [`IdempotentRetry`]: the retry loop as a `reqwest-middleware` middleware.

use std::sync::Arc;

use http::{Extensions, Method};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use tracing::Instrument;

use crate::retry::{Attempt, Judged, Retrier};
use crate::{Delivery, Error, OperationKey, RetrySettings, SettingsError};

/// Retries a request with one idempotency key across every attempt, as a
/// [`reqwest_middleware`] middleware.
///
/// The key of a request is, in this order: the key header the request already carries
/// (checked as the server will check it), an [`OperationKey`] given with
/// [`RequestBuilder::with_extension`](reqwest_middleware::RequestBuilder::with_extension),
/// or a new one ([`OperationKey::generate`]). Safe methods (`GET`, `HEAD`, `OPTIONS`,
/// `TRACE`) get no generated key: they are retried as they are.
///
/// The response carries a [`Delivery`] in its extensions (see [`DeliveryExt`]): the key,
/// how many attempts it took, and whether the answer was a replay. When every attempt
/// failed, the error is a [`reqwest_middleware::Error::Middleware`] holding
/// [`Error::GaveUp`]. Bodies must be in memory: a streaming body is refused before
/// anything is sent ([`Error::BodyNotReplayable`]).
///
/// Put it last among your middlewares (nearest the network) so that each attempt is sent
/// as one request.
///
/// ```no_run
/// use idem_client::{DeliveryExt, IdempotentRetry, OperationKey};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = reqwest_middleware::ClientBuilder::new(idem_client::reqwest_client()?)
///     .with(IdempotentRetry::default())
///     .build();
/// let key = OperationKey::new("order-7")?;
/// let response = client
///     .post("https://api.example.com/payments")
///     .with_extension(key.clone())
///     .body(r#"{"cents": 100}"#)
///     .send()
///     .await?;
/// let delivery = response.delivery().expect("set by IdempotentRetry");
/// assert_eq!(delivery.key(), Some(&key));
/// println!("{} after {} attempts, replayed: {}", response.status(), delivery.attempts(), delivery.replayed());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct IdempotentRetry {
    settings: Arc<RetrySettings>,
}

impl IdempotentRetry {
    /// With these settings, once they are [validated](RetrySettings::validate).
    pub fn new(settings: RetrySettings) -> Result<Self, SettingsError> {
        settings.validate()?;
        Ok(Self {
            settings: Arc::new(settings),
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &RetrySettings {
        &self.settings
    }
}

/// The key for `request`: its own header, else the one given, else a new one for a method
/// that is not safe.
pub(crate) fn key_for(
    settings: &RetrySettings,
    request: &Request,
    given: Option<&OperationKey>,
) -> Result<Option<OperationKey>, Error> {
    let mut sent = request.headers().get_all(&settings.key_header).iter();
    if let Some(value) = sent.next() {
        let header = settings.key_header.clone();
        if sent.next().is_some() {
            return Err(Error::RepeatedKey { header });
        }
        return OperationKey::from_header(value)
            .map(Some)
            .map_err(|source| Error::InvalidKey { header, source });
    }
    if let Some(key) = given {
        return Ok(Some(key.clone()));
    }
    let safe = [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE];
    Ok((!safe.contains(request.method())).then(OperationKey::generate))
}

#[async_trait::async_trait]
impl Middleware for IdempotentRetry {
    async fn handle(
        &self,
        request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let key = key_for(&self.settings, &request, extensions.get::<OperationKey>())
            .map_err(reqwest_middleware::Error::middleware)?;
        let mut retrier = Retrier::new(&self.settings, key, request)
            .map_err(reqwest_middleware::Error::middleware)?;
        loop {
            let Attempt {
                request,
                span,
                limit,
            } = retrier.attempt();
            let sent = next.clone().run(request, extensions);
            let result = tokio::time::timeout(limit, sent)
                .instrument(span.clone())
                .await;
            match retrier.judge(&span, limit, result).await {
                Judged::Answered(mut response, delivery) => {
                    response.extensions_mut().insert(delivery);
                    return Ok(response);
                }
                Judged::Failed(error) => return Err(error),
                Judged::GaveUp(error) => return Err(reqwest_middleware::Error::middleware(error)),
                Judged::Again => {}
            }
        }
    }
}

/// Reads the [`Delivery`] that [`IdempotentRetry`] leaves on a response.
pub trait DeliveryExt {
    /// The key, attempts and replay mark of this answer; `None` when the response did not
    /// come through [`IdempotentRetry`].
    fn delivery(&self) -> Option<&Delivery>;
}

impl DeliveryExt for Response {
    fn delivery(&self) -> Option<&Delivery> {
        self.extensions().get::<Delivery>()
    }
}
