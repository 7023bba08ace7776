//! The shared conformance suite against a real Redis (`REDIS_URL`, else 127.0.0.1:6379).
//! Every case gets its own key prefix, deleted when the case ends.

mod common;

use idem_core::testing::Subject;
use idem_redis::RedisStore;

async fn redis() -> Subject<RedisStore> {
    common::single_node_subject().await
}

idem_core::conformance_suite!(redis);
