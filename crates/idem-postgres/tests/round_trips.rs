//! Counts the network round trips of `begin` + `complete`, through a TCP proxy that counts
//! each time the client speaks after the server did.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::{Begin, Fingerprint, Key, Scope, ScopedKey, Store, Stored};
use idem_postgres::{PostgresOptions, PostgresStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{SchemaGuard, database_url};

/// What the client sent, one entry per flight: the tags of the protocol messages it sent
/// before the server answered (`B`ind, `E`xecute, `S`ync, `P`arse, `D`escribe, …).
#[derive(Debug, Default)]
struct Turns {
    client_spoke_last: bool,
    flights: Vec<String>,
}

fn tags(mut bytes: &[u8]) -> String {
    let mut out = String::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        out.push(bytes[0] as char);
        bytes = &bytes[(1 + len).min(bytes.len())..];
    }
    out
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    turns: Arc<Mutex<Turns>>,
    client: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        {
            let mut turns = turns.lock().unwrap();
            if client {
                // Large messages (a 1 MiB outcome) arrive in pieces; only the first piece
                // of a flight starts with a message header, which is all we need here.
                if !turns.client_spoke_last {
                    turns.flights.push(tags(&buf[..n]));
                }
            }
            turns.client_spoke_last = client;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A proxy to the database; returns its port and the shared turn counter.
async fn proxy(target: (String, u16)) -> (u16, Arc<Mutex<Turns>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let turns = Arc::new(Mutex::new(Turns::default()));
    let shared = turns.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect((target.0.as_str(), target.1))
                .await
                .unwrap();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pipe(client_read, server_write, shared.clone(), true));
            tokio::spawn(pipe(server_read, client_write, shared.clone(), false));
        }
    });
    (port, turns)
}

/// The flights since the last call, once the connection has been quiet for 50 ms (so that a
/// ping sent in the background after the caller had its answer, as sqlx's pool does when it
/// takes a connection back, is counted with the call that caused it): (round trips, pings).
async fn take(turns: &Mutex<Turns>) -> (usize, usize) {
    let mut seen = usize::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let turns = turns.lock().unwrap();
        if turns.flights.len() == seen && !turns.client_spoke_last {
            break;
        }
        seen = turns.flights.len();
    }
    let flights = std::mem::take(&mut turns.lock().unwrap().flights);
    let pings = flights.iter().filter(|f| f.as_str() == "S").count();
    (flights.len() - pings, pings)
}

/// A proxied URL to the test database: the proxy reads the protocol's message tags, so the
/// bytes must not be encrypted (with TLS built in, the default `prefer` would use it
/// against a server that offers it).
async fn proxied() -> (String, Arc<Mutex<Turns>>) {
    let direct: idem_postgres::sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
    let (port, turns) = proxy((direct.get_host().to_owned(), direct.get_port())).await;
    let url = format!(
        "postgres://{}@127.0.0.1:{port}/{}?sslmode=disable",
        direct.get_username(),
        direct.get_database().unwrap_or("test")
    );
    (url, turns)
}

/// (round trips, pings) of [begin, complete, replaying begin] of a new key, twice: on the
/// first use of the statements on the connection, then once they are prepared.
async fn measure(store: &PostgresStore, turns: &Mutex<Turns>) -> [[(usize, usize); 3]; 2] {
    let fp = Fingerprint::builder().part("body", b"x").finish();
    let key = |name: &str| ScopedKey::new(Scope::new("rtt"), Key::new(name).unwrap());
    let lease = Duration::from_secs(60);
    // Setup (connecting, migrating) is not counted.
    take(turns).await;
    let mut out = [[(0, 0); 3]; 2];
    for (name, calls) in ["cold", "warm"].into_iter().zip(&mut out) {
        let Begin::Acquired(claim) = store.begin(&key(name), &fp, lease).await.unwrap() else {
            panic!("not acquired")
        };
        calls[0] = take(turns).await;
        store
            .complete(&key(name), claim.token, &Stored::new(200), lease)
            .await
            .unwrap();
        calls[1] = take(turns).await;
        let replay = store.begin(&key(name), &fp, lease).await.unwrap();
        assert!(matches!(replay, Begin::Completed { .. }));
        calls[2] = take(turns).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_and_complete_cost_one_round_trip_each_on_a_warm_connection() {
    let guard = SchemaGuard::new();
    let (url, turns) = proxied().await;
    let options = PostgresOptions::new()
        .table(guard.table("idem_records"))
        .max_connections(1)
        .min_connections(1);
    let store = PostgresStore::connect_with(&url, &options).await.unwrap();
    let [cold, warm] = measure(&store, &turns).await;
    println!(
        "(round trips awaited, pings) for [begin, complete, replaying begin]: \
         first use on a connection {cold:?}, then {warm:?}"
    );
    // No ping when a connection goes back to the store's pool (sqlx's pool sends one).
    assert_eq!(warm, [(1, 0); 3], "one round trip per call once prepared");
    assert_eq!(cold, [(2, 0), (2, 0), (1, 0)], "first use also prepares");
    store.close().await;
}

/// A pool passed to `from_pool` keeps sqlx's ways, its ping on release included, as the
/// crate docs say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_your_own_keeps_sqlx_s_ping_on_release() {
    let guard = SchemaGuard::new();
    let (url, turns) = proxied().await;
    let pool = idem_postgres::sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .unwrap();
    let options = PostgresOptions::new().table(guard.table("idem_records"));
    let store = PostgresStore::from_pool(pool, &options).await.unwrap();
    let [_, warm] = measure(&store, &turns).await;
    assert_eq!(
        warm,
        [(1, 1); 3],
        "one round trip per call, and sqlx's ping"
    );
    store.close().await;
}
