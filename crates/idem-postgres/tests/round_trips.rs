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

/// The flights since the last call: (round trips the caller waited for, the pool's ping on
/// release, which sqlx runs in the background after the caller has its answer).
async fn take(turns: &Mutex<Turns>) -> (usize, usize) {
    // Wait until the background ping of the call just made has been answered, so it is
    // counted with that call.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        {
            let mut turns = turns.lock().unwrap();
            let pinged = turns.flights.last().is_some_and(|f| f == "S");
            if (pinged && !turns.client_spoke_last) || tokio::time::Instant::now() > deadline {
                let flights = std::mem::take(&mut turns.flights);
                let pings = flights.iter().filter(|f| f.as_str() == "S").count();
                return (flights.len() - pings, pings);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_and_complete_cost_one_round_trip_each_on_a_warm_connection() {
    let guard = SchemaGuard::new();
    let url = database_url();
    let direct: idem_postgres::sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let (port, turns) = proxy((direct.get_host().to_owned(), direct.get_port())).await;
    // The proxy reads the protocol's message tags, so the bytes must not be encrypted (with
    // TLS built in, the default `prefer` would use it against a server that offers it).
    let proxied = format!(
        "postgres://{}@127.0.0.1:{port}/{}?sslmode=disable",
        direct.get_username(),
        direct.get_database().unwrap_or("test")
    );
    let options = PostgresOptions::new()
        .table(guard.table("idem_records"))
        .max_connections(1)
        .min_connections(1);
    let store = PostgresStore::connect_with(&proxied, &options)
        .await
        .unwrap();
    let fp = Fingerprint::builder().part("body", b"x").finish();
    let key = |name: &str| ScopedKey::new(Scope::new("rtt"), Key::new(name).unwrap());
    let lease = Duration::from_secs(60);

    // Setup (connecting, migrating) is not counted.
    take(&turns).await;
    let measure = async |name: &str| {
        let Begin::Acquired(claim) = store.begin(&key(name), &fp, lease).await.unwrap() else {
            panic!("not acquired")
        };
        let begin = take(&turns).await;
        store
            .complete(&key(name), claim.token, &Stored::new(200), lease)
            .await
            .unwrap();
        let complete = take(&turns).await;
        let replay = store.begin(&key(name), &fp, lease).await.unwrap();
        assert!(matches!(replay, Begin::Completed { .. }));
        [begin, complete, take(&turns).await]
    };
    let cold = measure("cold").await;
    let warm = measure("warm").await;
    println!(
        "(round trips awaited, background pings) for [begin, complete, replaying begin]: \
         first use on a connection {cold:?}, then {warm:?}"
    );
    assert_eq!(warm, [(1, 1); 3], "one round trip per call once prepared");
    assert_eq!(cold, [(2, 1), (2, 1), (1, 1)], "first use also prepares");
}
