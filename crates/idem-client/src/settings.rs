//! [`RetrySettings`]: how often, how long and how patiently an operation is retried.

use std::time::Duration;

use http::HeaderName;

/// The header that carries the attempt number (1 for the original, 2 for the first
/// retry, …), so a server can tell a retry from an original.
pub const IDEMPOTENCY_ATTEMPT: HeaderName = HeaderName::from_static("idempotency-attempt");

/// The header that carries the key, as the IETF draft and Stripe name it.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How an operation is retried. Every field has a safe default; start from
/// `RetrySettings::default()` and change what you need.
///
/// The wait before attempt *n + 1* is the server's `Retry-After-Ms` or `Retry-After`, if it
/// sent one (at most [`max_retry_after`](Self::max_retry_after)), else a random duration
/// between zero and `min(max_delay, base_delay × 2ⁿ⁻¹)` ("full jitter", so that clients
/// that failed together do not retry together).
///
/// ```
/// use std::time::Duration;
/// use idem_client::RetrySettings;
///
/// let settings = RetrySettings {
///     max_attempts: 3,
///     deadline: Duration::from_secs(10),
///     ..RetrySettings::default()
/// };
/// assert!(settings.validate().is_ok());
/// assert!(RetrySettings { max_attempts: 0, ..settings }.validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySettings {
    /// Attempts in all, the original included. Default 4.
    pub max_attempts: u32,
    /// The backoff before the first retry is drawn from zero up to this. Default 200 ms.
    pub base_delay: Duration,
    /// The largest backoff drawn, however many attempts came before. Default 5 s.
    pub max_delay: Duration,
    /// The longest server-requested wait (`Retry-After`, `Retry-After-Ms`) honoured; a
    /// longer one is shortened to this. Default 30 s.
    pub max_retry_after: Duration,
    /// How long one attempt may take (connect, send, and for
    /// [`IdemClient`](crate::IdemClient) the whole answer) before it counts as timed out
    /// and is retried. Default 30 s.
    pub attempt_timeout: Duration,
    /// How long the whole operation may take, waits included: no attempt starts, and no
    /// wait is begun, that would end after it. Default 60 s.
    pub deadline: Duration,
    /// The header that carries the key. Default `Idempotency-Key`.
    pub key_header: HeaderName,
    /// The header that carries the attempt number ([`IDEMPOTENCY_ATTEMPT`] by default);
    /// `None` sends none.
    pub attempt_header: Option<HeaderName>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(30),
            deadline: Duration::from_secs(60),
            key_header: IDEMPOTENCY_KEY,
            attempt_header: Some(IDEMPOTENCY_ATTEMPT),
        }
    }
}

/// Why [`RetrySettings`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// `max_attempts` is 0: not even the original would be sent.
    #[error("max_attempts must be at least 1 (the original attempt)")]
    NoAttempts,
    /// A duration that must be positive is zero.
    #[error("{field} must be longer than zero")]
    Zero {
        /// The setting.
        field: &'static str,
    },
    /// `base_delay` is longer than `max_delay`.
    #[error("base_delay ({base:?}) must not be longer than max_delay ({max:?})")]
    BaseOverMax {
        /// `base_delay`.
        base: Duration,
        /// `max_delay`.
        max: Duration,
    },
    /// The attempt header is the key header.
    #[error("attempt_header and key_header must be different headers")]
    SameHeader,
}

impl RetrySettings {
    /// Checks that these settings make sense.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.max_attempts == 0 {
            return Err(SettingsError::NoAttempts);
        }
        for (field, value) in [
            ("attempt_timeout", self.attempt_timeout),
            ("deadline", self.deadline),
        ] {
            if value.is_zero() {
                return Err(SettingsError::Zero { field });
            }
        }
        if self.base_delay > self.max_delay {
            return Err(SettingsError::BaseOverMax {
                base: self.base_delay,
                max: self.max_delay,
            });
        }
        if self.attempt_header.as_ref() == Some(&self.key_header) {
            return Err(SettingsError::SameHeader);
        }
        Ok(())
    }

    /// The randomized backoff after failed attempt `attempt` (1-based): uniform in
    /// `0..=min(max_delay, base_delay × 2^(attempt-1))`.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let doubled = 2u32
            .checked_pow(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        let ceiling = self
            .base_delay
            .checked_mul(doubled)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(RetrySettings::default().validate(), Ok(()));
    }

    #[test]
    fn nonsense_is_refused_with_the_reason() {
        let ok = RetrySettings::default();
        let cases = [
            (
                RetrySettings {
                    max_attempts: 0,
                    ..ok.clone()
                },
                SettingsError::NoAttempts,
            ),
            (
                RetrySettings {
                    deadline: Duration::ZERO,
                    ..ok.clone()
                },
                SettingsError::Zero { field: "deadline" },
            ),
            (
                RetrySettings {
                    attempt_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                SettingsError::Zero {
                    field: "attempt_timeout",
                },
            ),
            (
                RetrySettings {
                    base_delay: Duration::from_secs(2),
                    max_delay: Duration::from_secs(1),
                    ..ok.clone()
                },
                SettingsError::BaseOverMax {
                    base: Duration::from_secs(2),
                    max: Duration::from_secs(1),
                },
            ),
            (
                RetrySettings {
                    attempt_header: Some(IDEMPOTENCY_KEY),
                    ..ok.clone()
                },
                SettingsError::SameHeader,
            ),
        ];
        for (settings, expected) in cases {
            assert_eq!(settings.validate(), Err(expected));
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_ceiling_and_the_cap() {
        let settings = RetrySettings {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            ..RetrySettings::default()
        };
        for (attempt, ceiling) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (60, 1000),
        ] {
            let draws: Vec<Duration> = (0..2000).map(|_| settings.backoff(attempt)).collect();
            let ceiling = Duration::from_millis(ceiling);
            assert!(draws.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            // Full jitter spreads over the whole range, not only near the ceiling.
            assert!(draws.iter().any(|d| *d < ceiling / 4), "attempt {attempt}");
            assert!(
                draws.iter().any(|d| *d > ceiling * 3 / 4),
                "attempt {attempt}"
            );
        }
    }
}
