//! Arbitrary header bytes as keys: never a panic, and a malformed key never reaches the
//! inner service.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use http::{HeaderValue, Request, Response};
use idem_core::{Key, MemoryStore};
use idem_http::IdempotencyLayer;
use proptest::prelude::*;
use tower::{Layer, ServiceExt};

fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Anything at all.
        proptest::collection::vec(any::<u8>(), 0..300),
        // Mostly printable, with quotes and backslashes to exercise sf-strings.
        proptest::collection::vec(
            prop_oneof![
                4 => 0x20u8..=0x7e,
                1 => Just(b'"'),
                1 => Just(b'\\'),
                1 => any::<u8>(),
            ],
            0..270,
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_key_bytes_never_panic_and_malformed_keys_never_reach_the_inner_service(
        bytes in key_bytes(),
    ) {
        // Only what can be sent as a header value at all.
        let Ok(value) = HeaderValue::from_bytes(&bytes) else {
            return Ok(());
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let inner = tower::service_fn({
            let calls = Arc::clone(&calls);
            move |_: Request<Body>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, std::convert::Infallible>(Response::new(Body::from("ran"))) }
            }
        });
        let service = IdempotencyLayer::new(MemoryStore::new()).layer(inner);
        let request = Request::post("/p")
            .header("idempotency-key", value)
            .body(Body::from("{}"))
            .unwrap();
        let response = runtime.block_on(service.oneshot(request)).unwrap();
        let valid = Key::parse(&bytes).is_ok();
        if valid {
            prop_assert_eq!(response.status(), 200);
            prop_assert_eq!(calls.load(Ordering::SeqCst), 1);
        } else {
            prop_assert_eq!(response.status(), 400);
            prop_assert_eq!(calls.load(Ordering::SeqCst), 0);
        }
    }
}
