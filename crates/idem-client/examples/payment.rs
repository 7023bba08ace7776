//! One payment with one key across its retries (the README's example):
//! `cargo run -p idem-client --example payment -- http://127.0.0.1:8080/payments`
use std::time::Duration;

use idem_client::{DeliveryExt, IdemClient, IdempotentRetry, OperationKey, RetrySettings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or("http://127.0.0.1:8080/payments".into());
    let settings = RetrySettings {
        max_attempts: 5,
        deadline: Duration::from_secs(30),
        ..RetrySettings::default()
    };

    // The thin client: one key for the operation (the order's own, one per step), the
    // answer read whole.
    let client = IdemClient::with_settings(settings.clone())?;
    let order = OperationKey::new("order-7")?;
    let reply = client
        .post(&url)
        .key(order.derive("charge"))
        .json(&serde_json::json!({"order": 7, "cents": 1000}))
        .send()
        .await?;
    println!(
        "charge: {} after {} attempt(s), replayed: {}",
        reply.status(),
        reply.attempts(),
        reply.replayed()
    );

    // The same loop as a reqwest-middleware middleware.
    let client = reqwest_middleware::ClientBuilder::new(idem_client::reqwest_client()?)
        .with(IdempotentRetry::new(settings)?)
        .build();
    let response = client
        .post(&url)
        .with_extension(order.derive("receipt"))
        .body(r#"{"order": 7}"#)
        .send()
        .await?;
    let delivery = response.delivery().expect("IdempotentRetry sets it");
    println!(
        "receipt: {} after {} attempt(s)",
        response.status(),
        delivery.attempts()
    );
    Ok(())
}
