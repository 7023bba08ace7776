//! What path a request is for, as the framework behind the layer will see it.

use std::borrow::Cow;

/// Why a request path is refused on a protected method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the request path is ambiguous: {reason}")]
pub struct PathError {
    reason: &'static str,
}

impl PathError {
    /// What makes the path ambiguous.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// The percent-decoded path that routing and fingerprints use.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    // Placeholder until the real normalisation lands.
    let _ = PathError { reason: "" };
    Ok(Cow::Borrowed(raw))
}
