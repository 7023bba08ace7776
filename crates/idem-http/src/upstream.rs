//! How an inner service says that a request never left: [`NotSent`].

use std::error::Error as StdError;
use std::fmt;

use idem_core::BoxError;

/// An inner-service error that proves the request never reached its destination: the
/// connection was refused or never opened within its timeout, so no byte of the request
/// was written. Only such an error lets the layer release the key (answer `502`, a retry
/// may run); any other error from the inner service is an *unknown outcome* (the request
/// may have been processed) and is never run again automatically.
///
/// Wrap the error where you know it; the layer finds a `NotSent` anywhere in the error's
/// source chain.
///
/// ```
/// use idem_http::NotSent;
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// let error: Box<dyn std::error::Error + Send + Sync> = Box::new(NotSent::new(refused));
/// assert!(NotSent::is_in(&*error));
/// let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
/// assert!(!NotSent::is_in(&reset));
/// ```
#[derive(Debug)]
pub struct NotSent(BoxError);

impl NotSent {
    /// Marks `source` as a failure before anything was sent.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self(source.into())
    }

    /// Whether `error`, or any error in its source chain, is a `NotSent`.
    pub fn is_in(error: &(dyn StdError + 'static)) -> bool {
        let mut current = Some(error);
        while let Some(error) = current {
            if error.is::<NotSent>() {
                return true;
            }
            current = error.source();
        }
        false
    }
}

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request was not sent: {}", self.0)
    }
}

impl StdError for NotSent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}
