//! The payments upstream: a naive API that charges again on every `POST /payments`, and
//! counts the charges per payment.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

/// The upstream's record of charges, per payment.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    charges: Mutex<std::collections::HashMap<String, u64>>,
    next_id: AtomicU64,
}

impl Ledger {
    /// `POST /payments` with a JSON body naming `payment_id` (or else an `Idempotency-Key`):
    /// a new charge, every time.
    pub(super) async fn charge(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != http::Method::POST || request.uri().path() != "/payments" {
            return json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.to_owned());
        }
        let key = request
            .headers()
            .get("idempotency-key")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return json(StatusCode::BAD_REQUEST, r#"{"error":"bad body"}"#.into()),
        };
        let payment = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|doc| doc.get("payment_id")?.as_str().map(str::to_owned))
            .or(key);
        let Some(payment) = payment else {
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"payment_id is required"}"#.into(),
            );
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut charges = self.charges.lock().unwrap_or_else(|e| e.into_inner());
            *charges.entry(payment.clone()).or_default() += 1;
        }
        let answer = serde_json::json!({
            "id": format!("ch_{id:08}"),
            "payment_id": payment,
            "status": "succeeded",
        });
        json(StatusCode::CREATED, answer.to_string())
    }

    /// Charges per charged payment.
    pub(super) fn counts(&self) -> Vec<u64> {
        let charges = self.charges.lock().unwrap_or_else(|e| e.into_inner());
        charges.values().copied().collect()
    }
}

pub(super) fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
