//! Errors: a handler's [`HandlerError`] (transient or permanent) and the deduplicator's
//! own [`DedupError`].

use std::error::Error as StdError;
use std::fmt;

use idem_core::{BoxError, KeyError, StoreError};

#[cfg(doc)]
use crate::{DedupOptions, Held, Outcome};

/// A handler's failure, and whether retrying could help.
///
/// Any error converts into a *transient* one with `?`: the claim is released and the broker
/// redelivers. Mark an error [permanent](HandlerError::permanent) when retrying cannot help
/// (a malformed message, a rejected business rule): the message is then completed with a
/// failure outcome, dead-lettered and never run again.
///
/// ```
/// use idem_queue::{HandlerError, ResultExt};
///
/// fn parse(payload: &[u8]) -> Result<u64, HandlerError> {
///     let text = std::str::from_utf8(payload).permanent()?;
///     Ok(text.parse::<u64>().permanent()?)
/// }
/// assert!(parse(b"x").unwrap_err().is_permanent());
/// assert!(!HandlerError::transient("database busy").is_permanent());
/// ```
pub struct HandlerError {
    source: BoxError,
    permanent: bool,
}

impl HandlerError {
    /// A failure that may go away: the message is retried.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
            permanent: false,
        }
    }

    /// A failure that retrying cannot fix: the message is dead-lettered.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
            permanent: true,
        }
    }

    /// Whether the handler marked this failure permanent.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error, owned.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::transient(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "transient"
        };
        write!(f, "{kind} handler error: {}", self.source)
    }
}

/// Marks a `Result`'s error as a permanent or transient [`HandlerError`].
pub trait ResultExt<T> {
    /// The error, if any, becomes a permanent [`HandlerError`].
    fn permanent(self) -> Result<T, HandlerError>;
    /// The error, if any, becomes a transient [`HandlerError`].
    fn transient(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }
}

/// Why the deduplicator could not decide or record a message's fate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// The message id is empty.
    #[error("message id is not usable as a key")]
    InvalidId(#[source] KeyError),
    /// The store failed or missed its deadline ([`DedupOptions::store_timeout`]) before
    /// anything ran; the message may be retried.
    #[error("the idempotency store failed; the handler did not run")]
    Store(#[source] StoreError),
    /// [`Held::complete`] could not store the outcome, even retried for
    /// [`DedupOptions::complete_for`]. The claim was not released: it stays held until its
    /// lease ends, so redeliveries meanwhile are [in flight](Outcome::InFlight).
    #[error("the outcome could not be stored; the message stays claimed until its lease ends")]
    Unrecorded(#[source] StoreError),
}
