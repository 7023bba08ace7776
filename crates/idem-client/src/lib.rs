//! A retrying HTTP client that keeps one `Idempotency-Key` per logical operation.
