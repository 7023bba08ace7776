//! Pluggable parts: where the key comes from ([`ExtractKey`]) and whose namespace it lives in
//! ([`MakeScope`]).

use http::HeaderName;
use http::HeaderValue;
use http::header::COOKIE;
use http::request::Parts;
use idem_core::{Key, Scope};

use crate::IdempotencyError;
use crate::policy::ScopeSource;

/// Decides the tenant namespace of a keyed request. Keys in different scopes never meet, so
/// one tenant can never be given another tenant's stored response.
///
/// Any `Fn(&Parts) -> Scope + Send + Sync + 'static` is one, which makes it easy to scope by
/// something an authentication layer put in the request's extensions:
///
/// ```
/// use http::request::Parts;
/// use idem_core::{MemoryStore, Scope};
/// use idem_http::IdempotencyLayer;
///
/// #[derive(Clone)]
/// struct TenantId(String);
///
/// let layer = IdempotencyLayer::new(MemoryStore::new()).make_scope(|parts: &Parts| {
///     match parts.extensions.get::<TenantId>() {
///         Some(tenant) => Scope::new(tenant.0.clone()),
///         None => Scope::anonymous(),
///     }
/// });
/// # drop(layer);
/// ```
pub trait MakeScope: Send + Sync + 'static {
    /// The scope of this request.
    fn make_scope(&self, parts: &Parts) -> Scope;
}

impl<F> MakeScope for F
where
    F: Fn(&Parts) -> Scope + Send + Sync + 'static,
{
    fn make_scope(&self, parts: &Parts) -> Scope {
        self(parts)
    }
}

/// The default scope: the caller's identity read from the policy's
/// [`scope_sources`](crate::IdempotencyPolicy::scope_sources) (by default `Authorization`,
/// then `X-Api-Key`, then `Cookie`; the first present wins), hashed, else
/// [`Scope::anonymous`]. The credential itself is never stored (see
/// [`Scope::from_keyed_secret`]); with a secret
/// ([`IdempotencyLayer::scope_secret`](crate::IdempotencyLayer::scope_secret)) the hash is
/// keyed, so a dump of the store does not let anyone test guessed credentials offline.
///
/// Every value of the source counts, and the source's name is hashed with them, so the same
/// string sent as `Authorization` and as `X-Api-Key` gives two scopes. A caller whose
/// credential changes (a rotated token, a new session cookie) changes scope: its earlier
/// keys are not found.
///
/// ```
/// use idem_core::Scope;
/// use idem_http::{IdempotencyPolicy, MakeScope, ScopeFromRequest};
///
/// let parts = |name: &str, value: &str| {
///     http::Request::builder().header(name, value).body(()).unwrap().into_parts().0
/// };
/// let scope = ScopeFromRequest::new(&IdempotencyPolicy::default(), Some(b"a secret of 16+ bytes")).unwrap();
/// let by_token = scope.make_scope(&parts("authorization", "Bearer a"));
/// assert_ne!(by_token, scope.make_scope(&parts("authorization", "Bearer b")));
/// assert_ne!(by_token, scope.make_scope(&parts("x-api-key", "Bearer a")));
/// assert_ne!(scope.make_scope(&parts("cookie", "session=u1")), Scope::anonymous());
/// assert_eq!(scope.make_scope(&parts("accept", "*/*")), Scope::anonymous());
/// ```
#[derive(Clone)]
pub struct ScopeFromRequest {
    sources: Vec<ScopeSource>,
    key: [u8; 32],
}

impl std::fmt::Debug for ScopeFromRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeFromRequest")
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

impl ScopeFromRequest {
    /// Reads the policy's scope sources; hashes with `secret` when given.
    pub fn new(
        policy: &crate::IdempotencyPolicy,
        secret: Option<&[u8]>,
    ) -> Result<Self, crate::PolicyError> {
        Ok(Self::from_config(&policy.compile()?, secret))
    }

    pub(crate) fn from_config(config: &crate::policy::Config, secret: Option<&[u8]>) -> Self {
        Self {
            sources: config.scope_sources.clone(),
            key: Scope::key_from_secret(secret.unwrap_or_default()),
        }
    }

    /// The identity the request presents, if any: the source's name and its values.
    fn identity(&self, parts: &Parts) -> Option<Vec<u8>> {
        for source in &self.sources {
            let mut identity = Vec::new();
            match source {
                ScopeSource::Header(name) => {
                    let mut values = parts.headers.get_all(name).iter().peekable();
                    if values.peek().is_none() {
                        continue;
                    }
                    identity.extend_from_slice(name.as_str().as_bytes());
                    for value in values {
                        identity.push(b'\n');
                        identity.extend_from_slice(value.as_bytes());
                    }
                }
                ScopeSource::Cookie(wanted) => {
                    let Some(value) = cookie(parts, wanted) else {
                        continue;
                    };
                    identity.extend_from_slice(b"cookie:");
                    identity.extend_from_slice(wanted.as_bytes());
                    identity.push(b'\n');
                    identity.extend_from_slice(value);
                }
            }
            return Some(identity);
        }
        None
    }
}

/// The value of the first cookie called `wanted`, from every `Cookie` header.
fn cookie<'a>(parts: &'a Parts, wanted: &str) -> Option<&'a [u8]> {
    parts
        .headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let at = pair.iter().position(|&b| b == b'=')?;
            (pair[..at].trim_ascii() == wanted.as_bytes()).then(|| pair[at + 1..].trim_ascii())
        })
}

impl MakeScope for ScopeFromRequest {
    fn make_scope(&self, parts: &Parts) -> Scope {
        match self.identity(parts) {
            Some(identity) => Scope::from_keyed_secret(&self.key, &identity),
            None => Scope::anonymous(),
        }
    }
}

/// Finds the idempotency key of a request: `Ok(None)` when it has none,
/// `Err` (a `400` answer) when it has an unusable one.
///
/// Any `Fn(&Parts) -> Result<Option<Key>, IdempotencyError> + Send + Sync + 'static` is one.
/// The default is [`KeyFromHeader`], built from the policy's `header` and `max_key_len`.
pub trait ExtractKey: Send + Sync + 'static {
    /// The request's key, if it has one.
    fn extract_key(&self, parts: &Parts) -> Result<Option<Key>, IdempotencyError>;
}

impl<F> ExtractKey for F
where
    F: Fn(&Parts) -> Result<Option<Key>, IdempotencyError> + Send + Sync + 'static,
{
    fn extract_key(&self, parts: &Parts) -> Result<Option<Key>, IdempotencyError> {
        self(parts)
    }
}

/// Reads the key from one header, in either form the draft and Stripe use: an sf-string
/// (`"abc"`) or a bare value (`abc`); both are the same key (see [`Key::parse`]). A header
/// sent twice is refused rather than guessed at.
///
/// ```
/// use http::HeaderName;
/// use idem_http::{ExtractKey, IdempotencyError, KeyFromHeader};
///
/// let extract = KeyFromHeader::new(HeaderName::from_static("idempotency-key"), 255);
/// let parts = |value: &[u8]| {
///     http::Request::builder().header("idempotency-key", value).body(()).unwrap().into_parts().0
/// };
/// let quoted = extract.extract_key(&parts(br#""k-1""#)).unwrap().unwrap();
/// let bare = extract.extract_key(&parts(b"k-1")).unwrap().unwrap();
/// assert_eq!(quoted, bare);
/// assert!(matches!(
///     extract.extract_key(&parts(b"")),
///     Err(IdempotencyError::MalformedKey { .. })
/// ));
/// ```
#[derive(Debug, Clone)]
pub struct KeyFromHeader {
    name: HeaderName,
    max_len: usize,
}

impl KeyFromHeader {
    /// Reads keys of up to `max_len` characters from the header `name`.
    pub fn new(name: HeaderName, max_len: usize) -> Self {
        Self { name, max_len }
    }

    fn parse(&self, value: &HeaderValue) -> Result<Key, IdempotencyError> {
        Key::parse_with_max_len(value.as_bytes(), self.max_len).map_err(|source| {
            IdempotencyError::MalformedKey {
                header: self.name.clone(),
                source,
            }
        })
    }
}

impl ExtractKey for KeyFromHeader {
    fn extract_key(&self, parts: &Parts) -> Result<Option<Key>, IdempotencyError> {
        let mut values = parts.headers.get_all(&self.name).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(IdempotencyError::RepeatedKey {
                header: self.name.clone(),
            });
        }
        self.parse(value).map(Some)
    }
}
