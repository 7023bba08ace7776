//! [`FaultProxy`]: a TCP relay whose failure mode a test switches at run time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::wait::PATIENCE;

/// How a [`FaultProxy`] treats its connections.
///
/// A mode applies to every connection, open or new, from the moment it is set: the relay
/// looks at it each time bytes arrive from the client. Bytes inside a connection are never
/// lost or reordered (as TCP guarantees); they are held, cut off, or answered with a reset.
///
/// The "after the request" modes forward what the client sent, then wait until the target
/// starts to answer (it has done the work) before they strike, for at most
/// [`PATIENCE`](crate::PATIENCE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relay both ways.
    Pass,
    /// Forward the request, then reset the client's connection (RST, via `SO_LINGER` 0)
    /// without answering.
    ResetAfterRequest,
    /// Forward the request, then close the client's connection (FIN) without answering.
    DropAfterRequest,
    /// Relay both ways, but hold every chunk of the target's answer this long first.
    Delay(Duration),
    /// Accept and keep every connection, relay nothing either way, never close: a network
    /// partition. Held bytes flow again once the mode changes (the partition heals).
    BlackHole,
    /// Forward the request, then shut down the write half towards the client (it reads
    /// end-of-stream) and never answer nor close.
    HalfOpen,
    /// Stop listening (new connections are refused: the target is down) and close every
    /// open connection. Listening resumes on the same port when the mode changes.
    Refuse,
    /// A lossy hop: relay both ways, but lose the answer to every `n`-th request (counted
    /// over every connection since the mode was set; 0 loses none). A lost answer goes as
    /// in [`DropAfterRequest`](Self::DropAfterRequest): the request is forwarded, and once
    /// the target starts to answer (it did the work) the client's connection is closed.
    /// Each chunk the client sends counts as a request, which it is for small requests.
    LoseEvery(u32),
}

/// A TCP relay on 127.0.0.1:0 in front of `target`, whose [`Fault`] can be switched while
/// connections are open. It counts the connections it accepts.
///
/// ```
/// use idem_testkit::{Fault, FaultProxy, Upstream, client, keyed, send};
///
/// # #[tokio::main] async fn main() {
/// let upstream = Upstream::start().await;
/// let proxy = FaultProxy::start(upstream.addr()).await;
/// let url = format!("http://{}/pay", proxy.addr());
///
/// assert_eq!(send(&client(), keyed(&url, "a", "{}")).await.status, 201);
///
/// proxy.set(Fault::ResetAfterRequest).await;
/// let failed = client().request(keyed(&url, "b", "{}")).await;
/// assert!(failed.is_err(), "reset");
/// assert_eq!(upstream.count("b"), 1, "but the upstream did the work");
///
/// proxy.set(Fault::Refuse).await;
/// assert!(tokio::net::TcpStream::connect(proxy.addr()).await.is_err());
/// proxy.set(Fault::Pass).await;
/// assert!(proxy.connections() >= 2);
/// # }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<Fault>,
    /// Bumped to close every open connection.
    generation: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
    tally: Arc<Tally>,
    /// The accept loop (it owns the listener); `None` while refusing.
    accepting: Mutex<Option<JoinHandle<()>>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 in [`Fault::Pass`].
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            target,
            mode: watch::Sender::new(Fault::Pass),
            generation: watch::Sender::new(0),
            connections: Arc::default(),
            tally: Arc::default(),
            accepting: Mutex::new(None),
        };
        *proxy.accepting.lock().await = Some(proxy.accept_on(listener));
        proxy
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it relays to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Answers kept from the client so far by the modes that strike after the request
    /// ([`ResetAfterRequest`](Fault::ResetAfterRequest),
    /// [`DropAfterRequest`](Fault::DropAfterRequest), [`HalfOpen`](Fault::HalfOpen),
    /// [`LoseEvery`](Fault::LoseEvery)).
    pub fn lost_answers(&self) -> u64 {
        self.tally.lost.load(Ordering::SeqCst)
    }

    /// The current mode.
    pub fn fault(&self) -> Fault {
        *self.mode.borrow()
    }

    /// Switches the mode for every connection, open or new. Leaving [`Fault::Refuse`]
    /// listens again on the same port before this returns; entering it has stopped
    /// listening and closed every connection before this returns.
    pub async fn set(&self, fault: Fault) {
        let mut accepting = self.accepting.lock().await;
        if fault == Fault::Refuse {
            self.mode.send_replace(fault);
            if let Some(task) = accepting.take() {
                task.abort();
                let _ = task.await; // the listener is closed once the task is gone
            }
            self.cut();
        } else {
            if accepting.is_none() {
                let listener = TcpListener::bind(self.addr)
                    .await
                    .expect("the fault proxy could not listen on its port again");
                *accepting = Some(self.accept_on(listener));
            }
            self.tally.requests.store(0, Ordering::SeqCst);
            self.mode.send_replace(fault);
        }
    }

    /// Closes every open connection (FIN), whatever the mode; new ones are accepted as the
    /// mode says.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn accept_on(&self, listener: TcpListener) -> JoinHandle<()> {
        let (target, connections) = (self.target, Arc::clone(&self.connections));
        let tally = Arc::clone(&self.tally);
        let (mode, generation) = (self.mode.subscribe(), self.generation.subscribe());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *mode.borrow() == Fault::Refuse {
                    continue; // raced with `set(Refuse)`: as good as refused
                }
                connections.fetch_add(1, Ordering::SeqCst);
                let (mut mode, mut generation) = (mode.clone(), generation.clone());
                mode.mark_unchanged();
                generation.mark_unchanged();
                let tally = Arc::clone(&tally);
                tokio::spawn(async move {
                    let _ = relay(client, target, mode, generation, &tally).await;
                });
            }
        })
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Ok(mut accepting) = self.accepting.try_lock()
            && let Some(task) = accepting.take()
        {
            task.abort();
        }
        // Open connections see the senders go and close.
    }
}

/// Why a relay ended early: cut, or the proxy is gone.
struct Closed;

/// What the relays count together.
#[derive(Default)]
struct Tally {
    /// Requests seen under [`Fault::LoseEvery`] since it was set.
    requests: AtomicU64,
    /// Answers kept from the client.
    lost: AtomicU64,
}

impl Tally {
    /// The fate of a request arriving under `mode`: `LoseEvery` becomes `DropAfterRequest`
    /// for every n-th request, `Pass` for the others.
    fn strike(&self, mode: Fault) -> Fault {
        match mode {
            Fault::LoseEvery(n) => {
                let seen = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
                if n > 0 && seen.is_multiple_of(u64::from(n)) {
                    Fault::DropAfterRequest
                } else {
                    Fault::Pass
                }
            }
            other => other,
        }
    }
}

/// Waits while the mode is [`Fault::BlackHole`]; `Err` when the connection is to close.
async fn while_black_hole(
    mode: &mut watch::Receiver<Fault>,
    generation: &mut watch::Receiver<u64>,
) -> Result<Fault, Closed> {
    loop {
        let current = *mode.borrow_and_update();
        if current != Fault::BlackHole {
            return Ok(current);
        }
        tokio::select! {
            changed = mode.changed() => changed.map_err(|_| Closed)?,
            _ = generation.changed() => return Err(Closed),
        }
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<Fault>,
    mut generation: watch::Receiver<u64>,
    tally: &Tally,
) -> Result<(), Closed> {
    // A partition before the first byte: the target is not even dialled until it heals.
    while_black_hole(&mut mode, &mut generation).await?;
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return Ok(()); // the target is down: so is this connection
    };
    let (mut from_client, mut from_target) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let (mut client_open, mut target_open) = (true, true);
    loop {
        let current = while_black_hole(&mut mode, &mut generation).await?;
        if current == Fault::Refuse {
            return Ok(());
        }
        tokio::select! {
            _ = generation.changed() => return Err(Closed),
            changed = mode.changed() => changed.map_err(|_| Closed)?,
            read = client.read(&mut from_client), if client_open => {
                let n = read.unwrap_or(0);
                if n == 0 {
                    client_open = false;
                    let _ = upstream.shutdown().await;
                    if !target_open { return Ok(()); }
                    continue;
                }
                if upstream.write_all(&from_client[..n]).await.is_err() {
                    return Ok(());
                }
                // The mode when the request arrived decides its fate.
                let strike = tally.strike(*mode.borrow());
                if matches!(
                    strike,
                    Fault::ResetAfterRequest | Fault::DropAfterRequest | Fault::HalfOpen
                ) {
                    target_answering(&mut client, &mut upstream, &mut generation).await?;
                    tally.lost.fetch_add(1, Ordering::SeqCst);
                    return strike_after_request(strike, client, upstream, &mut generation).await;
                }
            }
            read = upstream.read(&mut from_target), if target_open => {
                let n = read.unwrap_or(0);
                if n == 0 {
                    target_open = false;
                    let _ = client.shutdown().await;
                    if !client_open { return Ok(()); }
                    continue;
                }
                let delay = *mode.borrow();
                if let Fault::Delay(hold) = delay {
                    tokio::time::sleep(hold).await;
                }
                if client.write_all(&from_target[..n]).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Relays the rest of the request while waiting for the target's first answer bytes
/// (dropped: the client never sees them), for at most [`PATIENCE`].
async fn target_answering(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    generation: &mut watch::Receiver<u64>,
) -> Result<(), Closed> {
    let (mut from_client, mut from_target) = (vec![0u8; 64 * 1024], [0u8; 1]);
    let mut client_open = true;
    let deadline = tokio::time::sleep(PATIENCE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = generation.changed() => return Err(Closed),
            () = &mut deadline => return Ok(()),
            read = upstream.read(&mut from_target) => {
                let _ = read;
                return Ok(());
            }
            read = client.read(&mut from_client), if client_open => match read {
                Ok(n) if n > 0 => {
                    if upstream.write_all(&from_client[..n]).await.is_err() {
                        return Ok(());
                    }
                }
                _ => client_open = false,
            },
        }
    }
}

async fn strike_after_request(
    strike: Fault,
    mut client: TcpStream,
    upstream: TcpStream,
    generation: &mut watch::Receiver<u64>,
) -> Result<(), Closed> {
    match strike {
        Fault::ResetAfterRequest => {
            // SO_LINGER 0: closing sends RST instead of FIN. Dropping at once is the point,
            // so the blocking close the option warns of cannot happen here.
            let _ = client.set_zero_linger();
            drop(client);
            drop(upstream);
            Ok(())
        }
        Fault::HalfOpen => {
            drop(upstream);
            let _ = client.shutdown().await;
            // Never answer, never close: swallow whatever the client still sends until it
            // goes, or the connection is cut.
            let mut sink = vec![0u8; 64 * 1024];
            loop {
                tokio::select! {
                    _ = generation.changed() => return Err(Closed),
                    read = client.read(&mut sink) => match read {
                        Ok(n) if n > 0 => {}
                        _ => return Ok(()),
                    },
                }
            }
        }
        _ => Ok(()), // DropAfterRequest: both dropped, the client reads end-of-stream
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A target that counts requests (one read each) and echoes them back, upper-cased.
    async fn echo() -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&served);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let served = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(n) if n > 0 => {
                                served.fetch_add(1, Ordering::SeqCst);
                                let answer = buf[..n].to_ascii_uppercase();
                                if stream.write_all(&answer).await.is_err() {
                                    return;
                                }
                            }
                            _ => return,
                        }
                    }
                });
            }
        });
        (addr, served)
    }

    async fn exchange(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut buf = vec![0u8; message.len()];
        stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    /// What the client reads after sending: bytes, end-of-stream, an error, or nothing yet.
    async fn outcome(stream: &mut TcpStream, within: Duration) -> Result<usize, String> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(format!("{:?}", e.kind())),
            Err(_) => Err("silence".to_owned()),
        }
    }

    #[tokio::test]
    async fn pass_relays_both_ways_and_counts_connections() {
        let (target, served) = echo().await;
        let proxy = FaultProxy::start(target).await;
        for _ in 0..2 {
            let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
            assert_eq!(exchange(&mut stream, b"ping").await.unwrap(), b"PING");
        }
        assert_eq!(served.load(Ordering::SeqCst), 2);
        assert_eq!(proxy.connections(), 2);
        assert_eq!(proxy.fault(), Fault::Pass);
        assert_eq!(proxy.target(), target);
    }

    #[tokio::test]
    async fn reset_after_request_forwards_then_resets() {
        let (target, served) = echo().await;
        let proxy = FaultProxy::start(target).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(exchange(&mut stream, b"one").await.unwrap(), b"ONE");

        // The mode reaches a connection that is already open.
        proxy.set(Fault::ResetAfterRequest).await;
        stream.write_all(b"two").await.unwrap();
        assert_eq!(
            outcome(&mut stream, PATIENCE).await,
            Err("ConnectionReset".to_owned())
        );
        assert_eq!(
            served.load(Ordering::SeqCst),
            2,
            "the target got the request"
        );
    }

    #[tokio::test]
    async fn drop_after_request_forwards_then_closes_without_an_answer() {
        let (target, served) = echo().await;
        let proxy = FaultProxy::start(target).await;
        proxy.set(Fault::DropAfterRequest).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(b"req").await.unwrap();
        assert_eq!(outcome(&mut stream, PATIENCE).await, Ok(0), "end of stream");
        assert_eq!(served.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn lose_every_n_loses_every_nth_answer_after_the_target_did_the_work() {
        let (target, served) = echo().await;
        let proxy = FaultProxy::start(target).await;
        proxy.set(Fault::LoseEvery(3)).await;
        let mut fates = Vec::new();
        for i in 0..9u8 {
            // One connection per request, as a client reconnects after a lost answer.
            let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
            stream.write_all(&[b'a' + i]).await.unwrap();
            fates.push(outcome(&mut stream, PATIENCE).await);
        }
        let lost: Vec<usize> = (0..9).filter(|&i| fates[i] == Ok(0)).collect();
        assert_eq!(lost, [2, 5, 8], "the 3rd, 6th and 9th answers: {fates:?}");
        assert_eq!(
            served.load(Ordering::SeqCst),
            9,
            "every request reached the target"
        );
        assert_eq!(proxy.lost_answers(), 3);

        proxy.set(Fault::LoseEvery(0)).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            exchange(&mut stream, b"z").await.unwrap(),
            b"Z",
            "0 loses none"
        );
    }

    #[tokio::test]
    async fn half_open_forwards_then_shuts_the_write_half_and_stays_open() {
        let (target, served) = echo().await;
        let proxy = FaultProxy::start(target).await;
        proxy.set(Fault::HalfOpen).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(b"req").await.unwrap();
        assert_eq!(outcome(&mut stream, PATIENCE).await, Ok(0), "end of stream");
        assert_eq!(served.load(Ordering::SeqCst), 1);
        // Still open the other way: more writes are accepted, not reset.
        for _ in 0..3 {
            stream.write_all(b"more").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stream.write_all(b"more").await.unwrap();
        assert_eq!(
            served.load(Ordering::SeqCst),
            1,
            "and nothing more is forwarded"
        );
    }

    #[tokio::test]
    async fn delay_holds_the_answer() {
        let (target, _) = echo().await;
        let proxy = FaultProxy::start(target).await;
        proxy.set(Fault::Delay(Duration::from_millis(300))).await;
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let start = Instant::now();
        assert_eq!(exchange(&mut stream, b"slow").await.unwrap(), b"SLOW");
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn black_hole_holds_everything_and_heals_without_losing_bytes() {
        let (target, served) = echo().await;
        let proxy = FaultProxy::start(target).await;
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(exchange(&mut open, b"a").await.unwrap(), b"A");

        proxy.set(Fault::BlackHole).await;
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"b").await.unwrap();
        fresh.write_all(b"c").await.unwrap();
        let quiet = Duration::from_millis(300);
        assert_eq!(outcome(&mut open, quiet).await, Err("silence".to_owned()));
        assert_eq!(outcome(&mut fresh, quiet).await, Err("silence".to_owned()));
        assert_eq!(
            served.load(Ordering::SeqCst),
            1,
            "nothing reached the target"
        );

        proxy.set(Fault::Pass).await;
        let mut buf = [0u8; 1];
        open.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"B");
        fresh.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"C");
    }

    #[tokio::test]
    async fn refuse_stops_listening_closes_what_is_open_and_listens_again() {
        let (target, _) = echo().await;
        let proxy = FaultProxy::start(target).await;
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(exchange(&mut open, b"x").await.unwrap(), b"X");

        proxy.set(Fault::Refuse).await;
        let refused = TcpStream::connect(proxy.addr()).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(outcome(&mut open, PATIENCE).await, Ok(0), "closed");

        proxy.set(Fault::Pass).await;
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(exchange(&mut again, b"y").await.unwrap(), b"Y");
        assert_eq!(proxy.connections(), 2);
    }

    #[tokio::test]
    async fn cut_closes_open_connections_and_accepts_new_ones() {
        let (target, _) = echo().await;
        let proxy = FaultProxy::start(target).await;
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(exchange(&mut open, b"x").await.unwrap(), b"X");
        proxy.cut();
        assert_eq!(outcome(&mut open, PATIENCE).await, Ok(0));
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(exchange(&mut again, b"y").await.unwrap(), b"Y");
    }

    #[tokio::test]
    async fn a_dropped_proxy_closes_its_connections() {
        let (target, _) = echo().await;
        let proxy = FaultProxy::start(target).await;
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(exchange(&mut open, b"x").await.unwrap(), b"X");
        drop(proxy);
        assert_eq!(outcome(&mut open, PATIENCE).await, Ok(0));
    }
}
