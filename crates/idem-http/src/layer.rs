//! [`IdempotencyLayer`]: builds the [`Idempotency`] service.

use std::fmt;
use std::sync::Arc;

use idem_core::{Store, TimeoutStore};
use tower::Layer;

use crate::budget::BodyBudget;
use crate::extract::{ExtractKey, KeyFromHeader, MakeScope, ScopeFromRequest};
use crate::policy::{Config, IdempotencyPolicy, PolicyError, ValidPolicy};
use crate::service::{Idempotency, Shared};
use crate::stats::{IdempotencyStats, Throttle};

/// A tower [`Layer`] that gives the service it wraps the idempotency semantics described in
/// the [crate docs](crate): a retried request with the same key gets the first response
/// back instead of running again.
///
/// Every service the layer makes shares its store, policy and [`IdempotencyStats`].
///
/// ```
/// use std::time::Duration;
/// use idem_core::MemoryStore;
/// use idem_http::{IdempotencyLayer, IdempotencyPolicy, OnConflict};
///
/// let policy = IdempotencyPolicy {
///     key_required: true,
///     on_conflict: OnConflict::Wait,
///     wait_timeout: Duration::from_secs(5),
///     ..IdempotencyPolicy::default()
/// };
/// let layer = IdempotencyLayer::with_policy(MemoryStore::new(), policy)?;
/// assert_eq!(layer.stats().executed(), 0);
/// # Ok::<(), idem_http::PolicyError>(())
/// ```
pub struct IdempotencyLayer<St> {
    store: Arc<St>,
    config: Arc<Config>,
    make_scope: Arc<dyn MakeScope>,
    /// Whether `make_scope` is the caller's own (then `scope_secret` does not replace it).
    custom_scope: bool,
    extract_key: Arc<dyn ExtractKey>,
    stats: Arc<IdempotencyStats>,
    budget: BodyBudget,
}

impl<St: Store> IdempotencyLayer<St> {
    /// A layer with the default [`IdempotencyPolicy`].
    pub fn new(store: St) -> Self {
        Self::validated(store, ValidPolicy::default())
    }

    /// A layer with `policy`, once it [validates](IdempotencyPolicy::validate).
    pub fn with_policy(store: St, policy: IdempotencyPolicy) -> Result<Self, PolicyError> {
        Ok(Self::validated(store, policy.validated()?))
    }

    /// A layer with a policy validated beforehand (by a configuration loader, say), which
    /// is not checked again.
    pub fn validated(store: St, policy: ValidPolicy) -> Self {
        Self::from_config(Arc::new(store), Arc::clone(policy.config()))
    }

    fn from_config(store: Arc<St>, config: Arc<Config>) -> Self {
        let extract_key = Arc::new(KeyFromHeader::new(
            config.header.clone(),
            config.policy.max_key_len,
        ));
        Self {
            store,
            make_scope: Arc::new(ScopeFromRequest::from_config(&config, None)),
            custom_scope: false,
            config,
            extract_key,
            stats: Arc::default(),
            budget: BodyBudget::default(),
        }
    }

    /// Shares `budget`, the cap on buffered keyed request bodies, with other layers (every
    /// route of a gateway shares one). Default: a budget of this layer's own,
    /// [`DEFAULT_BODY_BUDGET`](crate::DEFAULT_BODY_BUDGET) bytes.
    pub fn body_budget(mut self, budget: BodyBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Keys the scope digest with `secret` (at least 16 bytes of it should be random), so
    /// that a dump of the store does not let anyone test guessed credentials against the
    /// stored scopes offline. Every process sharing a store must use the same secret, or
    /// they will not find each other's keys.
    ///
    /// It has no effect once [`make_scope`](Self::make_scope) replaced the default scope.
    pub fn scope_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        if !self.custom_scope {
            self.make_scope = Arc::new(ScopeFromRequest::from_config(
                &self.config,
                Some(secret.as_ref()),
            ));
        }
        self
    }

    /// Replaces how a request's scope is decided (default [`ScopeFromRequest`], from the
    /// policy's `scope_sources`).
    pub fn make_scope(mut self, make_scope: impl MakeScope) -> Self {
        self.make_scope = Arc::new(make_scope);
        self.custom_scope = true;
        self
    }

    /// Replaces how a request's key is found (default [`KeyFromHeader`] with the policy's
    /// `header` and `max_key_len`). The policy's `header` still names the header in a
    /// `missing-key` problem.
    pub fn extract_key(mut self, extract_key: impl ExtractKey) -> Self {
        self.extract_key = Arc::new(extract_key);
        self
    }

    /// The counters shared by every service this layer made.
    pub fn stats(&self) -> Arc<IdempotencyStats> {
        Arc::clone(&self.stats)
    }

    /// The policy in force.
    pub fn policy(&self) -> &IdempotencyPolicy {
        &self.config.policy
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
            make_scope: Arc::clone(&self.make_scope),
            custom_scope: self.custom_scope,
            extract_key: Arc::clone(&self.extract_key),
            stats: Arc::clone(&self.stats),
            budget: self.budget.clone(),
        }
    }
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("policy", &self.config.policy)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_shared(
            inner,
            Arc::new(Shared {
                store: TimeoutStore::new(Arc::clone(&self.store), self.config.policy.store_timeout),
                config: Arc::clone(&self.config),
                make_scope: Arc::clone(&self.make_scope),
                extract_key: Arc::clone(&self.extract_key),
                stats: Arc::clone(&self.stats),
                budget: self.budget.clone(),
                store_warnings: Throttle::default(),
            }),
        )
    }
}
