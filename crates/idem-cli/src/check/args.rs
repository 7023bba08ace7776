//! `idem check`'s flags, and the settings they make once checked.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::{CheckError, MAX_BODY_LIMIT, MAX_TIMEOUT};

/// The most `--concurrency` accepted: enough to race any server, few enough to stay polite.
const MAX_CONCURRENCY: u32 = 256;

/// `idem check`'s settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct CheckArgs {
    /// The endpoint to probe, e.g. http://127.0.0.1:8080/payments (http or https)
    #[arg(value_name = "URL")]
    pub url: String,
    /// Method of every probe: POST, PATCH or another with effects (not GET, HEAD, OPTIONS,
    /// TRACE)
    #[arg(long, short = 'X', value_name = "METHOD", default_value = "POST")]
    pub method: String,
    /// Body of every probe; JSON bodies also get `Content-Type: application/json` unless
    /// a --header sets one
    #[arg(long, short = 'd', value_name = "BODY", default_value = "{}")]
    pub body: String,
    /// Body of the mismatch probe [default: BODY with one more member when it is a JSON
    /// object, else BODY and one more line]
    #[arg(long, value_name = "BODY")]
    pub other_body: Option<String>,
    /// A header sent with every probe, `Name: value` (repeat for more), e.g.
    /// -H 'Authorization: Bearer sk_test_...'
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// The request header that carries the key
    #[arg(long, value_name = "NAME", default_value = "Idempotency-Key")]
    pub key_header: String,
    /// How keys are written: as the draft's sf-string ("k") or bare (k, as Stripe shows)
    #[arg(long, value_enum, value_name = "FORM", default_value_t = KeyForm::SfString)]
    pub key_form: KeyForm,
    /// Requests sent at once with one key (2 to 256)
    #[arg(long, short = 'c', value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(2..=i64::from(MAX_CONCURRENCY)))]
    pub concurrency: u32,
    /// Deadline of each probe, from connect to the last byte of the answer (at most 10m)
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub timeout: String,
    /// Largest answer body read; a larger one fails its probe (at most 64 MiB)
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Trust only the certificate authorities in this PEM file for an https URL (a private
    /// CA, as curl's --cacert) [default: the system's]
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Expect the endpoint to require a key: a request without one must get 400
    #[arg(long)]
    pub require_key: bool,
    /// What a duplicate of a running request must get: reject (409; seeing none is a
    /// warning), wait (the replay; a 409 fails) or either
    #[arg(long, value_enum, value_name = "MODE", default_value_t = ConflictExpectation::Either)]
    pub on_conflict: ConflictExpectation,
    /// Count warnings (the draft's SHOULDs, Stripe's habits) as failures
    #[arg(long)]
    pub strict: bool,
    /// Print the report as JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// How a probe writes its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyForm {
    /// `Idempotency-Key: "k"`, the draft's structured-field string.
    SfString,
    /// `Idempotency-Key: k`, as Stripe's documentation writes it.
    Bare,
}

/// What a duplicate of a request still running must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConflictExpectation {
    /// `409` at once (the draft, Stripe, idem's default).
    Reject,
    /// The first request's answer once it is done (idem's `on_conflict = "wait"`).
    Wait,
    /// Either of them.
    Either,
}

impl CheckArgs {
    /// The defaults for `url`, as `idem check URL` with no other flag.
    ///
    /// ```
    /// let args = idem_cli::check::CheckArgs::for_url("http://127.0.0.1:8080/pay");
    /// assert_eq!(args.method, "POST");
    /// assert_eq!(args.concurrency, 8);
    /// ```
    pub fn for_url(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            method: "POST".to_owned(),
            body: "{}".to_owned(),
            other_body: None,
            headers: Vec::new(),
            key_header: "Idempotency-Key".to_owned(),
            key_form: KeyForm::SfString,
            concurrency: 8,
            timeout: "10s".to_owned(),
            max_body_bytes: 1 << 20,
            ca_file: None,
            require_key: false,
            on_conflict: ConflictExpectation::Either,
            strict: false,
            json: false,
        }
    }

    /// Checks every flag; the error names the flag at fault.
    pub(super) fn settings(&self) -> Result<Settings, CheckError> {
        let invalid = |flag, message: String| CheckError::InvalidArgs { flag, message };
        let url = reqwest::Url::parse(&self.url).map_err(|e| invalid("URL", e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "URL",
                format!(
                    "scheme {:?}: only http and https can be checked",
                    url.scheme()
                ),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("URL", "has no host".into()));
        }
        let method = Method::from_bytes(self.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| invalid("--method", format!("{:?} is not a method", self.method)))?;
        if method.is_safe() {
            return Err(invalid(
                "--method",
                format!(
                    "{method} is safe: it has no effect to repeat; check a POST or PATCH endpoint"
                ),
            ));
        }
        let key_header = HeaderName::from_bytes(self.key_header.as_bytes()).map_err(|_| {
            invalid(
                "--key-header",
                format!("{:?} is not a header name", self.key_header),
            )
        })?;
        let mut headers = HeaderMap::new();
        for line in &self.headers {
            let (name, value) =
                parse_header(line).map_err(|message| invalid("--header", message))?;
            if name == key_header {
                return Err(invalid(
                    "--header",
                    format!("{name} is the key header: idem check sets it on each probe"),
                ));
            }
            headers.append(name, value);
        }
        let body = Bytes::from(self.body.clone().into_bytes());
        let json_body = serde_json::from_slice::<serde_json::Value>(&body).ok();
        if json_body.is_some() && !headers.contains_key(http::header::CONTENT_TYPE) {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let other_body = match &self.other_body {
            Some(other) => Bytes::from(other.clone().into_bytes()),
            None => other_body(&self.body, json_body),
        };
        if other_body == body {
            return Err(invalid(
                "--other-body",
                "must differ from --body: it probes a key reused for another request".into(),
            ));
        }
        let timeout = humantime_serde::re::humantime::parse_duration(&self.timeout)
            .map_err(|e| invalid("--timeout", format!("{:?}: {e}", self.timeout)))?;
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(invalid(
                "--timeout",
                format!(
                    "must be more than zero and at most {}",
                    humantime_serde::re::humantime::format_duration(MAX_TIMEOUT)
                ),
            ));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_LIMIT {
            return Err(invalid(
                "--max-body-bytes",
                format!("must be 1 to {MAX_BODY_LIMIT}"),
            ));
        }
        if !(2..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(invalid(
                "--concurrency",
                format!("must be 2 to {MAX_CONCURRENCY}"),
            ));
        }
        let trusted = match &self.ca_file {
            None => None,
            Some(path) => Some(read_authorities(path).map_err(|m| invalid("--ca-file", m))?),
        };
        Ok(Settings {
            url,
            method,
            body,
            other_body,
            headers,
            key_header,
            key_form: self.key_form,
            concurrency: self.concurrency as usize,
            timeout,
            max_body_bytes: self.max_body_bytes,
            trusted,
            require_key: self.require_key,
            on_conflict: self.on_conflict,
            strict: self.strict,
        })
    }
}

/// The flags, checked.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) url: reqwest::Url,
    pub(super) method: Method,
    pub(super) body: Bytes,
    pub(super) other_body: Bytes,
    /// Every probe's headers, the key header excepted.
    pub(super) headers: HeaderMap,
    pub(super) key_header: HeaderName,
    pub(super) key_form: KeyForm,
    pub(super) concurrency: usize,
    pub(super) timeout: Duration,
    pub(super) max_body_bytes: usize,
    /// `--ca-file`'s authorities, trusted instead of the system's.
    pub(super) trusted: Option<Vec<reqwest::Certificate>>,
    pub(super) require_key: bool,
    pub(super) on_conflict: ConflictExpectation,
    pub(super) strict: bool,
}

/// The certificates of a PEM file; at least one.
fn read_authorities(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certificates)
}

/// `Name: value`, as curl's `-H` takes it.
fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| format!("{line:?} is not `Name: value`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{:?} is not a header name", name.trim()))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of {name} has a character a header cannot carry"))?;
    Ok((name, value))
}

/// A body the endpoint must not take for `body`: one more JSON member when it is an
/// object (so a server that canonicalises JSON still sees a difference), else one more
/// line.
fn other_body(body: &str, json: Option<serde_json::Value>) -> Bytes {
    if let Some(serde_json::Value::Object(mut object)) = json {
        object.insert("idem_check_variant".to_owned(), serde_json::Value::from(2));
        return Bytes::from(serde_json::Value::Object(object).to_string());
    }
    Bytes::from(format!("{body}\nidem-check-variant"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(edit: impl FnOnce(&mut CheckArgs)) -> Result<Settings, String> {
        let mut args = CheckArgs::for_url("http://127.0.0.1:1/pay");
        edit(&mut args);
        args.settings().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid() {
        let settings = settings(|_| {}).unwrap();
        assert_eq!(settings.method, Method::POST);
        assert_eq!(settings.headers["content-type"], "application/json");
        assert_eq!(settings.other_body, r#"{"idem_check_variant":2}"#);
        assert_eq!(settings.timeout, Duration::from_secs(10));
    }

    /// A change to the defaults, and the start of the error it must cause.
    type BadCase = (fn(&mut CheckArgs), &'static str);

    #[test]
    fn bad_values_name_their_flag() {
        let cases: [BadCase; 10] = [
            (|a| a.url = "not a url".into(), "URL: "),
            (
                |a| a.url = "ftp://example.com/x".into(),
                "URL: scheme \"ftp\"",
            ),
            (|a| a.method = "GET".into(), "--method: GET is safe"),
            (|a| a.method = "P O".into(), "--method: "),
            (
                |a| a.headers = vec!["no colon".into()],
                "--header: \"no colon\"",
            ),
            (
                |a| a.headers = vec!["idempotency-key: x".into()],
                "--header: idempotency-key is the key header",
            ),
            (
                |a| a.timeout = "0s".into(),
                "--timeout: must be more than zero",
            ),
            (|a| a.timeout = "soon".into(), "--timeout: \"soon\""),
            (|a| a.max_body_bytes = 0, "--max-body-bytes: must be"),
            (
                |a| a.other_body = Some("{}".into()),
                "--other-body: must differ",
            ),
        ];
        for (edit, expected) in cases {
            let error = settings(edit).unwrap_err();
            assert!(
                error.starts_with(expected),
                "{error:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn headers_and_bodies() {
        let settings = settings(|a| {
            a.headers = vec![
                "Authorization: Bearer t".into(),
                "content-type: text/plain".into(),
            ];
            a.body = "plain".into();
        })
        .unwrap();
        assert_eq!(settings.headers["authorization"], "Bearer t");
        assert_eq!(settings.headers["content-type"], "text/plain");
        assert_eq!(settings.other_body, "plain\nidem-check-variant");
    }
}
