//! Pluggable parts: where the key comes from ([`ExtractKey`]) and whose namespace it lives in
//! ([`MakeScope`]).

use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderName, HeaderValue};
use idem::{Key, Scope};

use crate::IdempotencyError;

/// Decides the tenant namespace of a keyed request. Keys in different scopes never meet, so
/// one tenant can never be given another tenant's stored response.
///
/// Any `Fn(&Parts) -> Scope + Send + Sync + 'static` is one, which makes it easy to scope by
/// something an authentication layer put in the request's extensions:
///
/// ```
/// use http::request::Parts;
/// use idem::{MemoryStore, Scope};
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

/// The default scope: a hash of the `Authorization` header, else of `X-Api-Key`, else
/// [`Scope::anonymous`]. The credential itself is never stored (see [`Scope::from_secret`]).
///
/// All values of the header count, and the header's name is hashed with them, so the same
/// string sent as `Authorization` and as `X-Api-Key` gives two scopes. A client whose
/// credential changes (a rotated token) changes scope: its earlier keys are not found.
///
/// ```
/// use idem::Scope;
/// use idem_http::{MakeScope, ScopeFromCredentials};
///
/// let parts = |name: &str, value: &str| {
///     http::Request::builder().header(name, value).body(()).unwrap().into_parts().0
/// };
/// let by_token = ScopeFromCredentials.make_scope(&parts("authorization", "Bearer a"));
/// let by_other_token = ScopeFromCredentials.make_scope(&parts("authorization", "Bearer b"));
/// let by_api_key = ScopeFromCredentials.make_scope(&parts("x-api-key", "Bearer a"));
/// assert_ne!(by_token, by_other_token);
/// assert_ne!(by_token, by_api_key);
/// assert_eq!(ScopeFromCredentials.make_scope(&parts("accept", "*/*")), Scope::anonymous());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ScopeFromCredentials;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

impl MakeScope for ScopeFromCredentials {
    fn make_scope(&self, parts: &Parts) -> Scope {
        for name in [AUTHORIZATION, X_API_KEY] {
            let mut values = parts.headers.get_all(&name).iter().peekable();
            if values.peek().is_none() {
                continue;
            }
            let mut secret = name.as_str().as_bytes().to_vec();
            for value in values {
                secret.push(b'\n');
                secret.extend_from_slice(value.as_bytes());
            }
            return Scope::from_secret(&secret);
        }
        Scope::anonymous()
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
