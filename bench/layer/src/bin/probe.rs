//! The concurrency probe of `bench/concurrency-probe.sh`: N clients send the same POST with
//! ONE `Idempotency-Key` at the same moment, each on its own connection, and the probe
//! reports what reached the upstream and what the clients got back.
//!
//! ```sh
//! probe URL STATS_URL [N] [KEY]
//! ```
//!
//! All N connections are opened first; then every client writes its request at once (a
//! barrier), so the requests overlap as far as the target lets them. `STATS_URL` is the
//! upstream's (or the app's) `GET /__stats` (`{"posts":N}`), read before and after. Prints
//! one line of `name=value` fields: `sent`, `runs` (POSTs the upstream counted),
//! `statuses` (`code:count,...`), `replayed` (answers with `Idempotent-Replayed: true` or
//! `Idempotency-Replayed: true`), `bodies` (distinct response bodies), `errors`
//! (connections that failed), `p50_ms` and `max_ms` (time from the barrier to the whole
//! answer), and `then` (what one more request with the key gets once all have answered:
//! `status`, plus `/replayed` if it says so, plus `/ran-again` if the upstream counted it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

/// The bench's request body (bench/new_keys.lua, bench/replay.lua).
const BODY: &str = r#"{"amount":1250,"currency":"EUR","customer":"cus_42","note":"idem bench"}"#;
/// One session for all clients: the one client retrying (axum-idempotent caches per session).
const COOKIE: &str = "session=benchprobe00000000000A";
/// No answer may take longer than this (a stuck target is an error, not a hang).
const TIMEOUT: Duration = Duration::from_secs(60);

struct Target {
    host: String,
    path: String,
}

fn parse(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    Ok(Target {
        host: host.to_owned(),
        path: path.to_owned(),
    })
}

/// Sends one request on a fresh connection (`Connection: close`) and reads the whole answer.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(request).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(answer)
}

struct Answer {
    status: u16,
    replayed: bool,
    body: Vec<u8>,
}

fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut replayed = false;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if (name == "idempotent-replayed" || name == "idempotency-replayed") && value == "true" {
            replayed = true;
        }
        if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    }
    Some(Answer {
        status,
        replayed,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).ok()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

async fn posts(stats: &Target) -> Result<u64, String> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        stats.path, stats.host
    );
    let mut stream = TcpStream::connect(&stats.host)
        .await
        .map_err(|e| format!("{}: {e}", stats.host))?;
    let raw = exchange(&mut stream, request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let answer = parse_answer(&raw).ok_or("unreadable stats answer")?;
    let text = String::from_utf8_lossy(&answer.body);
    text.chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .map_err(|_| format!("no count in {text:?}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, stats, rest @ ..] = args.as_slice() else {
        return Err("usage: probe URL STATS_URL [N] [KEY]".into());
    };
    let target = parse(url)?;
    let stats = parse(stats)?;
    let n: usize = rest.first().map_or(Ok(256), |n| n.parse())?;
    let key = rest.get(1).cloned().unwrap_or_else(|| {
        format!(
            "probe-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        )
    });
    let request: Arc<[u8]> = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Idempotency-Key: {key}\r\nCookie: {COOKIE}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{BODY}",
        target.path,
        target.host,
        BODY.len()
    )
    .into_bytes()
    .into();

    let before = posts(&stats).await?;
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = TcpStream::connect(&target.host).await?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for mut stream in streams {
        let (barrier, request) = (Arc::clone(&barrier), Arc::clone(&request));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let answer = tokio::time::timeout(TIMEOUT, exchange(&mut stream, &request)).await;
            (start.elapsed(), answer)
        }));
    }
    barrier.wait().await;
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut bodies = BTreeMap::<Vec<u8>, usize>::new();
    let (mut replayed, mut errors) = (0, 0);
    let mut times = Vec::with_capacity(n);
    for task in tasks {
        let (elapsed, answer) = task.await?;
        times.push(elapsed);
        match answer
            .ok()
            .and_then(Result::ok)
            .as_deref()
            .and_then(parse_answer)
        {
            Some(answer) => {
                *statuses.entry(answer.status).or_default() += 1;
                *bodies.entry(answer.body).or_default() += 1;
                replayed += usize::from(answer.replayed);
            }
            None => errors += 1,
        }
    }
    // Let a target that finishes work after answering (a detached handler) settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = posts(&stats).await?;
    let mut stream = TcpStream::connect(&target.host).await?;
    let then = match tokio::time::timeout(TIMEOUT, exchange(&mut stream, &request))
        .await
        .ok()
        .and_then(Result::ok)
        .as_deref()
        .and_then(parse_answer)
    {
        Some(answer) if answer.replayed => format!("{}/replayed", answer.status),
        Some(answer) => answer.status.to_string(),
        None => "error".to_owned(),
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let then = if posts(&stats).await? > after {
        format!("{then}/ran-again")
    } else {
        then
    };
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let statuses = statuses
        .iter()
        .map(|(code, count)| format!("{code}:{count}"))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "sent={n} runs={} statuses={statuses} replayed={replayed} bodies={} errors={errors} p50_ms={:.1} max_ms={:.1} then={then} key={key}",
        after - before,
        bodies.len(),
        ms(times[n / 2]),
        ms(times[n - 1]),
    );
    Ok(())
}
