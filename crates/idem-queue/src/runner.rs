//! The consumer loop, written once: [`jetstream::run`] and [`rabbitmq::run`] (and their
//! inbox-backed twins `run_inbox`) fetch, handle and settle messages until shutdown.
//!
//! What a runner does that a hand-written `while let Some(m) = messages.next()` loop does
//! not:
//!
//! - **Bounded concurrency.** At most [`RunOptions::concurrency`] handlers run at once,
//!   each on a task of its own; at most [`RunOptions::max_in_flight`] messages are taken
//!   from the broker and not yet settled (for RabbitMQ this is the channel's `basic.qos`
//!   prefetch; for JetStream the pull batch). Fetching stops while that many are out.
//! - **Retry delays that do not block other messages.** A message whose settlement is a
//!   delayed retry does not hold a handler slot while it waits: on JetStream the delay is
//!   the server's (`-NAK` with a delay); on RabbitMQ, which has no delayed requeue, the
//!   delivery is held (at most [`RabbitOptions::max_hold`](crate::rabbitmq::RabbitOptions))
//!   in one of the `max_in_flight` slots, so keep `max_in_flight` above `concurrency`
//!   (the default is twice it).
//! - **Graceful drain.** When the `shutdown` future completes, the runner stops fetching
//!   (RabbitMQ: `basic.cancel`; JetStream: the pull subscription is dropped) and hands
//!   back at once what the client had received but no handler had taken (`basic.nack`
//!   with requeue, `-NAK`), lets the handlers in flight finish and settles them, then
//!   closes what it opened and returns.
//!   Handlers still running after [`RunOptions::drain_timeout`] are aborted unsettled:
//!   the broker redelivers them (after `AckWait`, or when the channel closes) and the
//!   deduplicator or inbox keeps their effects single.
//! - **Reconnection with backoff.** When the connection or the subscription fails, the
//!   runner calls your `connect` function again, after a delay doubling from
//!   [`RunOptions::reconnect_initial`] to [`RunOptions::reconnect_max`] (with jitter),
//!   until it succeeds or shutdown is asked for. Messages that were in flight on the
//!   broken connection are redelivered by the broker and deduplicated.
//! - **Settle errors are survived.** An ack that cannot be sent (the connection broke
//!   after the outcome was stored) is logged and counted in [`RunReport::settle_errors`];
//!   the broker redelivers the message and it is answered as a duplicate.
//!
//! ```no_run
//! use idem_core::{MemoryStore, Scope};
//! use idem_queue::Deduplicator;
//! use idem_queue::jetstream::{JetStreamConsumer, JetStreamOptions};
//! use idem_queue::runner::{self, RunOptions};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("ORDERS/billing"));
//! let adapter = JetStreamConsumer::new(dedup, JetStreamOptions::default());
//! let (_stop_sender, stop) = tokio::sync::oneshot::channel::<()>();
//! let report = runner::jetstream::run(
//!     adapter,
//!     move || {
//!         let js = js.clone();
//!         async move { Ok(js.get_stream("ORDERS").await?.get_consumer("billing").await?) }
//!     },
//!     RunOptions::default(),
//!     async { let _ = stop.await; }, // e.g. tokio::signal::ctrl_c()
//!     |message, context| async move {
//!         // context.id(), context.attempt(), context.cancellation() ...
//!         // charge the order in message.payload ...
//!         Ok(format!("charged {} bytes", message.payload.len()))
//!     },
//! )
//! .await;
//! println!("drained: {report:?}");
//! # Ok(()) }
//! ```

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::settle::Settlement;

/// A boxed error from a `connect` function or a subscription.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a runner fetches, bounds and reconnects.
///
/// | field | default | meaning |
/// |---|---|---|
/// | `concurrency` | 16 | handlers running at once |
/// | `max_in_flight` | `2 × concurrency` | messages taken and not yet settled (RabbitMQ prefetch, JetStream batch) |
/// | `drain_timeout` | 30 s | how long shutdown waits for running handlers before aborting them unsettled |
/// | `reconnect_initial` / `reconnect_max` | 100 ms / 30 s | delay before reconnecting, doubling per failure, with jitter |
///
/// ```
/// use idem_queue::runner::RunOptions;
///
/// let options = RunOptions::with_concurrency(4);
/// assert_eq!((options.concurrency, options.max_in_flight), (4, 8));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// Handlers running at once (at least 1).
    pub concurrency: usize,
    /// Messages taken from the broker and not yet settled (at least `concurrency`).
    pub max_in_flight: usize,
    /// How long shutdown waits for running handlers.
    pub drain_timeout: Duration,
    /// The first delay before reconnecting.
    pub reconnect_initial: Duration,
    /// The longest delay before reconnecting.
    pub reconnect_max: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self::with_concurrency(16)
    }
}

impl RunOptions {
    /// Defaults, with `concurrency` handlers and twice as many messages in flight.
    pub fn with_concurrency(concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            concurrency,
            max_in_flight: concurrency.saturating_mul(2),
            drain_timeout: Duration::from_secs(30),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
        }
    }

    fn handler_slots(&self) -> usize {
        self.concurrency.max(1)
    }

    fn in_flight_slots(&self) -> usize {
        self.max_in_flight.max(self.handler_slots())
    }

    /// The delay before reconnect number `failures` (from 1), with up to 25 % jitter so
    /// that many consumers do not reconnect in step.
    fn reconnect_delay(&self, failures: u32) -> Duration {
        let base = self
            .reconnect_initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.reconnect_max);
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(failures);
        let jitter = (hasher.finish() % 1_000) as f64 / 4_000.0;
        base.mul_f64(1.0 - jitter)
    }
}

/// What a runner did, returned when it has drained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Messages acknowledged (processed, or duplicates).
    pub acked: u64,
    /// Messages handed back after a failed run, for another one ([`Settlement::Retry`]).
    pub retried: u64,
    /// Messages handed back without a failed run: held elsewhere, store or database
    /// unavailable ([`Settlement::Defer`]).
    pub deferred: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Messages whose settlement could not be sent (the broker redelivers them).
    pub settle_errors: u64,
    /// Handlers aborted unsettled at the drain timeout, or whose task panicked.
    pub abandoned: u64,
    /// Connections (or subscriptions) established, the first one included.
    pub connects: u64,
}

impl RunReport {
    fn count(&mut self, done: Done) {
        match done {
            Done::Settled(Settlement::Ack) => self.acked += 1,
            Done::Settled(Settlement::Retry { .. }) => self.retried += 1,
            Done::Settled(Settlement::Defer { .. }) => self.deferred += 1,
            Done::Settled(Settlement::DeadLetter { .. }) => self.dead_lettered += 1,
            Done::SettleFailed => self.settle_errors += 1,
        }
    }
}

/// How one message ended, as a task reports it.
enum Done {
    Settled(Settlement),
    SettleFailed,
}

impl Done {
    /// What telling the broker `settlement` came to; a failure is logged as `failure`
    /// (which says what the broker does next) and is not fatal to the runner.
    fn after_settling(
        settlement: Result<Settlement, &(dyn std::error::Error + 'static)>,
        failure: &str,
    ) -> Self {
        match settlement {
            Ok(settlement) => Self::Settled(settlement),
            Err(error) => {
                tracing::warn!(error, "consumer runner: {failure}");
                Self::SettleFailed
            }
        }
    }
}

/// A subscription the runner fetches from.
trait Source: Send {
    type Item: Send + 'static;

    /// The next message; `None` or an error: the subscription is over (reconnect).
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Item, BoxError>>> + Send;

    /// Stops the broker sending more (before the drain).
    fn stop(&mut self) -> impl Future<Output = ()> + Send;

    /// Closes what the runner opened (after the drain: every settlement has been sent).
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// The loop both brokers share: connect (with backoff), fetch within the bounds, spawn one
/// task per message, drain on shutdown.
async fn drive<Src, Connect, ConnectFut, Process, ProcessFut>(
    options: RunOptions,
    mut connect: Connect,
    shutdown: impl Future<Output = ()> + Send,
    process: Process,
) -> RunReport
where
    Src: Source,
    Connect: FnMut() -> ConnectFut + Send,
    ConnectFut: Future<Output = Result<Src, BoxError>> + Send,
    Process: Fn(Src::Item) -> ProcessFut + Send + Sync,
    ProcessFut: Future<Output = Done> + Send + 'static,
{
    let mut report = RunReport::default();
    let in_flight = Arc::new(Semaphore::new(options.in_flight_slots()));
    let mut tasks: JoinSet<Done> = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown.fuse());
    let mut failures = 0u32;
    let mut source: Option<Src> = None;

    'run: loop {
        let current = match source.as_mut() {
            Some(current) => current,
            None => {
                let connected = tokio::select! {
                    biased;
                    () = &mut shutdown => break 'run,
                    connected = connect() => connected,
                };
                match connected {
                    Ok(connected) => {
                        report.connects += 1;
                        source.insert(connected)
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let delay = options.reconnect_delay(failures);
                        log_failure("consumer runner: connecting failed", &error, delay);
                        drop(error);
                        tokio::select! {
                            biased;
                            () = &mut shutdown => break 'run,
                            () = tokio::time::sleep(delay) => continue 'run,
                        }
                    }
                }
            }
        };
        while let Some(finished) = tasks.try_join_next() {
            tally(&mut report, finished);
        }
        // Stop fetching while `max_in_flight` messages are out.
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break 'run,
            permit = Arc::clone(&in_flight).acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break 'run }; // never closed
        let next = tokio::select! {
            biased;
            () = &mut shutdown => break 'run,
            next = current.next() => next,
        };
        match next {
            Some(Ok(item)) => {
                // The subscription works: the next failure starts the backoff afresh.
                failures = 0;
                let work = process(item);
                tasks.spawn(async move {
                    let done = work.await;
                    drop(permit);
                    done
                });
            }
            Some(Err(error)) => {
                failures = failures.saturating_add(1);
                let delay = options.reconnect_delay(failures);
                log_failure(
                    "consumer runner: the subscription failed; reconnecting",
                    &error,
                    delay,
                );
                drop(error);
                if let Some(broken) = source.take() {
                    broken.close().await;
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'run,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            None => {
                tracing::warn!("consumer runner: the subscription ended; reconnecting");
                if let Some(ended) = source.take() {
                    ended.close().await;
                }
                failures = failures.saturating_add(1);
                let delay = options.reconnect_delay(failures);
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'run,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    // Drain: stop fetching, let the running handlers finish and settle, then close.
    if let Some(current) = source.as_mut() {
        current.stop().await;
    }
    let drained = tokio::time::timeout(options.drain_timeout, async {
        while let Some(finished) = tasks.join_next().await {
            tally(&mut report, finished);
        }
    })
    .await;
    if drained.is_err() {
        let left = tasks.len() as u64;
        tracing::warn!(
            left,
            timeout = ?options.drain_timeout,
            "consumer runner: handlers still running at the drain timeout were aborted unsettled; the broker redelivers them"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        report.abandoned += left;
    }
    if let Some(current) = source {
        current.close().await;
    }
    report
}

/// An inbox error with the handler's own error in it.
#[cfg(feature = "postgres")]
fn describe(error: &crate::inbox::InboxError<crate::HandlerError>) -> String {
    match error {
        crate::inbox::InboxError::Handler(handler) => format!("{error}: {handler}"),
        other => other.to_string(),
    }
}

fn log_failure(what: &'static str, error: &BoxError, delay: Duration) {
    let error: &dyn std::error::Error = &**error;
    tracing::warn!(error, ?delay, "{what}");
}

fn tally(report: &mut RunReport, finished: Result<Done, tokio::task::JoinError>) {
    match finished {
        Ok(done) => report.count(done),
        Err(error) => {
            tracing::error!(%error, "consumer runner: a message task panicked; its message is redelivered");
            report.abandoned += 1;
        }
    }
}

/// Bounds the handlers running at once: a permit is held while the handler's own future
/// runs, not while the delivery waits to be settled.
#[derive(Clone)]
struct HandlerSlots(Arc<Semaphore>);

impl HandlerSlots {
    fn new(options: &RunOptions) -> Self {
        Self(Arc::new(Semaphore::new(options.handler_slots())))
    }

    async fn run<F: Future>(&self, handler: F) -> F::Output {
        let _permit = self.0.acquire().await;
        handler.await
    }
}

#[cfg(feature = "jetstream")]
pub mod jetstream {
    //! The runner for NATS JetStream pull consumers.
    //!
    //! `connect` returns the [`PullConsumer`] to fetch from (typically
    //! `js.get_stream(..).await?.get_consumer(..).await?`); the runner pulls in batches of
    //! at most [`RunOptions::max_in_flight`] messages. The NATS client reconnects its
    //! connection by itself; when the pull subscription fails (missed heartbeats, the
    //! consumer deleted) the runner calls `connect` again, with backoff.
    //!
    //! Delayed retries are `-NAK` with a delay: the server redelivers later and nothing
    //! waits on this side.

    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use async_nats::jetstream::Message;
    use async_nats::jetstream::consumer::PullConsumer;
    use async_nats::jetstream::consumer::pull::Stream as PullStream;
    use async_nats::jetstream::message::AckKind;
    use bytes::Bytes;
    use futures_util::{FutureExt, StreamExt};
    use idem_core::Store;

    use super::{BoxError, Done, HandlerSlots, RunOptions, RunReport, Source, drive};
    use crate::jetstream::JetStreamConsumer;
    use crate::{HandlerError, MessageContext};

    struct Pull {
        messages: PullStream,
        /// The client the acks go out on, to flush them before returning.
        client: Option<async_nats::Client>,
    }

    impl Source for Pull {
        type Item = Message;

        async fn next(&mut self) -> Option<Result<Message, BoxError>> {
            let next = self.messages.next().await?;
            if let (Ok(message), None) = (&next, &self.client) {
                self.client = Some(message.context.client());
            }
            Some(next.map_err(|error| Box::new(error) as BoxError))
        }

        async fn stop(&mut self) {
            // Hand back at once what the client holds but the runner has not taken, so
            // another consumer gets it now rather than after `AckWait`. Dropping the
            // subscription (in `close`) stops the pulls; a message still on the wire then
            // is redelivered after `AckWait`.
            while let Some(Some(Ok(message))) = self.messages.next().now_or_never() {
                if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!(%error, "consumer runner: handing back a message failed");
                }
            }
        }

        async fn close(self) {
            // Acks are buffered by the client: send them before the runner returns (and
            // the process, perhaps, exits).
            if let Some(client) = self.client
                && let Err(error) = client.flush().await
            {
                tracing::warn!(%error, "consumer runner: flushing the last acks failed");
            }
        }
    }

    async fn subscribe<CF>(consumer: CF, batch: usize) -> Result<Pull, BoxError>
    where
        CF: Future<Output = Result<PullConsumer, BoxError>>,
    {
        let consumer = consumer.await?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        Ok(Pull {
            messages,
            client: None,
        })
    }

    /// Runs `handler` for every message of the consumer `connect` returns, through
    /// `adapter` (deduplicated, settled as [`JetStreamConsumer::handle`] settles), until
    /// `shutdown` completes; then drains and returns what it did. See the
    /// [runner docs](super).
    pub async fn run<S, C, CF, H, HF, T>(
        adapter: JetStreamConsumer<S>,
        mut connect: C,
        options: RunOptions,
        shutdown: impl Future<Output = ()> + Send,
        handler: H,
    ) -> RunReport
    where
        S: Store + Send + Sync + 'static,
        C: FnMut() -> CF + Send,
        CF: Future<Output = Result<PullConsumer, BoxError>> + Send,
        H: Fn(Message, MessageContext) -> HF + Send + Sync + 'static,
        HF: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: Into<Bytes> + Send + 'static,
    {
        let adapter = Arc::new(adapter);
        let handler = Arc::new(handler);
        let slots = HandlerSlots::new(&options);
        let batch = options.in_flight_slots();
        drive(
            options,
            move || subscribe(connect(), batch),
            shutdown,
            move |message: Message| {
                let (adapter, handler, slots) =
                    (Arc::clone(&adapter), Arc::clone(&handler), slots.clone());
                async move {
                    let handled = adapter
                        .handle(&message, |message, context| {
                            let work = handler(message.clone(), context);
                            async move { slots.run(work).await }
                        })
                        .await;
                    let settled = handled.as_ref().map(|handled| handled.settlement);
                    Done::after_settling(
                        settled.map_err(|error| error as _),
                        "settling a message failed; the server redelivers it",
                    )
                }
            },
        )
        .await
    }

    /// Tells the server `settlement` for `message`: `+ACK`, `-NAK` with the delay, or
    /// `+TERM`, and waits for the server's reply, so an `Ok` means the server has it. For
    /// messages handled outside a [`JetStreamConsumer`] (an
    /// [`Inbox`](crate::inbox::Inbox)); a dead letter here writes no record.
    pub async fn settle(
        message: &Message,
        settlement: crate::Settlement,
    ) -> Result<(), async_nats::Error> {
        let kind = match settlement {
            crate::Settlement::Ack => AckKind::Ack,
            crate::Settlement::Retry { delay } | crate::Settlement::Defer { delay } => {
                AckKind::Nak(Some(delay))
            }
            crate::Settlement::DeadLetter { .. } => AckKind::Term,
        };
        message.double_ack_with(kind).await
    }

    /// Like [`run`], with the message's effects in a Postgres transaction through `inbox`
    /// (exactly once for them): the handler runs inside [`Inbox::process`], and the
    /// message is acknowledged only after the transaction committed. Ids come from `id`
    /// (for example `|m| idem_queue::jetstream::message_id(m, &IdSource::default()).ok()`);
    /// a message without one is terminated. Settlements follow
    /// [`inbox::settlement`](crate::inbox::settlement) under `retry`; `+WPI` progress is
    /// sent every `progress_every` while the transaction runs.
    ///
    /// [`Inbox::process`]: crate::inbox::Inbox::process
    #[cfg(feature = "postgres")]
    #[allow(clippy::too_many_arguments)]
    pub async fn run_inbox<C, CF, I, H, T>(
        inbox: crate::inbox::Inbox,
        retry: crate::RetryPolicy,
        progress_every: Option<Duration>,
        mut connect: C,
        options: RunOptions,
        shutdown: impl Future<Output = ()> + Send,
        id: I,
        handler: H,
    ) -> RunReport
    where
        C: FnMut() -> CF + Send,
        CF: Future<Output = Result<PullConsumer, BoxError>> + Send,
        I: Fn(&Message) -> Option<String> + Send + Sync + 'static,
        H: for<'c> Fn(
                Message,
                &'c mut sqlx::PgConnection,
            ) -> futures_util::future::BoxFuture<'c, Result<T, HandlerError>>
            + Send
            + Sync
            + 'static,
        T: Send + 'static,
    {
        let shared = Arc::new((inbox, retry, id, handler));
        let slots = HandlerSlots::new(&options);
        let batch = options.in_flight_slots();
        drive(
            options,
            move || subscribe(connect(), batch),
            shutdown,
            move |message: Message| {
                let (shared, slots) = (Arc::clone(&shared), slots.clone());
                async move {
                    let (inbox, retry, id, handler) = &*shared;
                    let delivered = message
                        .info()
                        .map(|info| u64::try_from(info.delivered).unwrap_or(1))
                        .unwrap_or(1);
                    let attempt = crate::DeliveryAttempt::new(delivered, retry.max_attempts);
                    let outcome = match id(&message) {
                        Some(id) => {
                            let _progress = Progress::start(&message, progress_every);
                            slots
                                .run(inbox.process(&id, |tx| handler(message.clone(), tx)))
                                .await
                        }
                        None => Err(crate::inbox::InboxError::EmptyId),
                    };
                    let settlement = crate::inbox::settlement(retry, attempt, &outcome);
                    if let Err(error) = &outcome {
                        let error = super::describe(error);
                        tracing::warn!(
                            error,
                            ?settlement,
                            "consumer runner: inbox message not processed"
                        );
                    }
                    let settled = settle(&message, settlement).await;
                    let settled = settled.as_ref().map(|()| settlement);
                    Done::after_settling(
                        settled.map_err(|error| &**error as _),
                        "settling a message failed; the server redelivers it",
                    )
                }
            },
        )
        .await
    }

    /// `+WPI` every so often from a task of its own until dropped.
    #[cfg(feature = "postgres")]
    struct Progress(Option<tokio::task::JoinHandle<()>>);

    #[cfg(feature = "postgres")]
    impl Progress {
        fn start(message: &Message, every: Option<Duration>) -> Self {
            Self(every.filter(|every| !every.is_zero()).map(|every| {
                let message = message.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(every).await;
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                })
            }))
        }
    }

    #[cfg(feature = "postgres")]
    impl Drop for Progress {
        fn drop(&mut self) {
            if let Some(task) = self.0.take() {
                task.abort();
            }
        }
    }
}

#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    //! The runner for RabbitMQ queues.
    //!
    //! `connect` returns a [`Connection`] (declare your topology in it, so a reconnect
    //! declares it again); the runner opens a channel on it, sets `basic.qos` to
    //! [`RunOptions::max_in_flight`], and consumes `queue`. When the connection or the
    //! channel fails the runner calls `connect` again, with backoff; the broker requeues
    //! what was unacked on the old channel and those redeliveries are deduplicated. On
    //! shutdown it sends `basic.cancel`, lets the running handlers finish and settle, and
    //! closes the connection. Deliveries the broker had sent but the runner had not taken
    //! are requeued when the channel closes.
    //!
    //! RabbitMQ has no delayed requeue: a delivery waiting for its retry delay stays in one
    //! of the `max_in_flight` prefetch slots for up to
    //! [`RabbitOptions::max_hold`](crate::rabbitmq::RabbitOptions::max_hold), but not in a
    //! handler slot, so other messages keep being handled.

    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::{FutureExt, StreamExt};
    use idem_core::Store;
    use lapin::message::Delivery;
    use lapin::options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{Channel, Connection, Consumer};

    use super::{BoxError, Done, HandlerSlots, RunOptions, RunReport, Source, drive};
    use crate::rabbitmq::RabbitConsumer;
    use crate::{HandlerError, MessageContext, Settlement};

    struct Subscription {
        connection: Connection,
        channel: Channel,
        consumer: Consumer,
    }

    impl Source for Subscription {
        type Item = Delivery;

        async fn next(&mut self) -> Option<Result<Delivery, BoxError>> {
            Some(
                self.consumer
                    .next()
                    .await?
                    .map_err(|error| Box::new(error) as BoxError),
            )
        }

        async fn stop(&mut self) {
            let tag = self.consumer.tag();
            if let Err(error) = self
                .channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                tracing::warn!(%error, "consumer runner: basic.cancel failed");
            }
            // Requeue at once what lapin holds but the runner has not taken, so another
            // consumer gets it during the drain.
            while let Some(Some(Ok(delivery))) = self.consumer.next().now_or_never() {
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
            }
        }

        async fn close(self) {
            // A broken connection has nothing left to close.
            if self.connection.status().connected() {
                let _ = self
                    .connection
                    .close(200, "consumer runner done".into())
                    .await;
            }
        }
    }

    async fn subscribe<CF>(
        connection: CF,
        queue: Arc<str>,
        tag: Arc<str>,
        prefetch: u16,
    ) -> Result<Subscription, BoxError>
    where
        CF: Future<Output = Result<Connection, BoxError>>,
    {
        let connection = connection.await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                (*queue).into(),
                (*tag).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Subscription {
            connection,
            channel,
            consumer,
        })
    }

    /// Runs `handler` for every delivery from `queue` (consumer tag `tag`), through
    /// `adapter` (deduplicated, settled as [`RabbitConsumer::handle`] settles), on
    /// connections from `connect`, until `shutdown` completes; then drains and returns
    /// what it did. See the [module docs](self).
    #[allow(clippy::too_many_arguments)]
    pub async fn run<S, C, CF, H, HF, T>(
        adapter: RabbitConsumer<S>,
        mut connect: C,
        queue: &str,
        tag: &str,
        options: RunOptions,
        shutdown: impl Future<Output = ()> + Send,
        handler: H,
    ) -> RunReport
    where
        S: Store + Send + Sync + 'static,
        C: FnMut() -> CF + Send,
        CF: Future<Output = Result<Connection, BoxError>> + Send,
        H: Fn(Arc<Delivery>, MessageContext) -> HF + Send + Sync + 'static,
        HF: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: Into<Bytes> + Send + 'static,
    {
        let adapter = Arc::new(adapter);
        let handler = Arc::new(handler);
        let slots = HandlerSlots::new(&options);
        let prefetch = u16::try_from(options.in_flight_slots()).unwrap_or(u16::MAX);
        let (queue, tag): (Arc<str>, Arc<str>) = (queue.into(), tag.into());
        drive(
            options,
            move || subscribe(connect(), Arc::clone(&queue), Arc::clone(&tag), prefetch),
            shutdown,
            move |delivery: Delivery| {
                let (adapter, handler, slots) =
                    (Arc::clone(&adapter), Arc::clone(&handler), slots.clone());
                let delivery = Arc::new(delivery);
                async move {
                    let handled = adapter
                        .handle(&delivery, |_, context| {
                            let work = handler(Arc::clone(&delivery), context);
                            async move { slots.run(work).await }
                        })
                        .await;
                    let settled = handled.as_ref().map(|handled| handled.settlement);
                    Done::after_settling(
                        settled.map_err(|error| error as _),
                        "settling a delivery failed; the broker requeues it",
                    )
                }
            },
        )
        .await
    }

    /// Tells the broker `settlement` for `delivery`: `basic.ack`; held for the delay (at
    /// most `max_hold`) and `basic.nack` with requeue; or `basic.reject` without requeue
    /// (to the queue's dead-letter exchange, if it has one). For deliveries handled
    /// outside a [`RabbitConsumer`] (an [`Inbox`](crate::inbox::Inbox)); a dead letter
    /// here writes no record. A channel that closed (lapin's `Ok(false)`) is an error.
    pub async fn settle(
        delivery: &Delivery,
        settlement: Settlement,
        max_hold: Duration,
    ) -> Result<(), BoxError> {
        let sent = match settlement {
            Settlement::Ack => delivery.acker.ack(BasicAckOptions::default()).await?,
            Settlement::Retry { delay } => {
                tokio::time::sleep(delay.min(max_hold)).await;
                // `reject`: a failed run, which RabbitMQ 4.3+ counts in x-delivery-count.
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: true })
                    .await?
            }
            Settlement::Defer { delay } => {
                tokio::time::sleep(delay.min(max_hold)).await;
                // `nack`: not the message's fault, which RabbitMQ 4.3+ does not count.
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await?
            }
            Settlement::DeadLetter { .. } => {
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?
            }
        };
        if sent {
            Ok(())
        } else {
            Err(format!("{settlement:?} was not sent: the channel is closed").into())
        }
    }

    /// The delivery number from `x-delivery-count` (quorum queues), else the
    /// `redelivered` flag (1 or 2).
    #[cfg(feature = "postgres")]
    fn delivered(delivery: &Delivery) -> u64 {
        use lapin::types::AMQPValue;
        let earlier = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get(crate::rabbitmq::DELIVERY_COUNT_HEADER))
            .and_then(|value| match value {
                AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
                AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
                AMQPValue::LongUInt(n) => Some(u64::from(*n)),
                AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
                AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
                _ => None,
            });
        match earlier {
            Some(earlier) => earlier.saturating_add(1),
            None if delivery.redelivered => 2,
            None => 1,
        }
    }

    /// Like [`run`], with the delivery's effects in a Postgres transaction through `inbox`
    /// (exactly once for them): the handler runs inside
    /// [`Inbox::process`](crate::inbox::Inbox::process), and the delivery is acknowledged
    /// only after the transaction committed. Ids come from the `message_id` property; a
    /// delivery without one is rejected (dead-lettered by the queue's dead-letter exchange,
    /// if any). Settlements follow [`inbox::settlement`](crate::inbox::settlement) under
    /// `retry`; retries are held for at most `max_hold`.
    #[cfg(feature = "postgres")]
    #[allow(clippy::too_many_arguments)]
    pub async fn run_inbox<C, CF, H, T>(
        inbox: crate::inbox::Inbox,
        retry: crate::RetryPolicy,
        max_hold: Duration,
        mut connect: C,
        queue: &str,
        tag: &str,
        options: RunOptions,
        shutdown: impl Future<Output = ()> + Send,
        handler: H,
    ) -> RunReport
    where
        C: FnMut() -> CF + Send,
        CF: Future<Output = Result<Connection, BoxError>> + Send,
        H: for<'c> Fn(
                Arc<Delivery>,
                &'c mut sqlx::PgConnection,
            ) -> futures_util::future::BoxFuture<'c, Result<T, HandlerError>>
            + Send
            + Sync
            + 'static,
        T: Send + 'static,
    {
        let shared = Arc::new((inbox, retry, handler));
        let slots = HandlerSlots::new(&options);
        let prefetch = u16::try_from(options.in_flight_slots()).unwrap_or(u16::MAX);
        let (queue, tag): (Arc<str>, Arc<str>) = (queue.into(), tag.into());
        drive(
            options,
            move || subscribe(connect(), Arc::clone(&queue), Arc::clone(&tag), prefetch),
            shutdown,
            move |delivery: Delivery| {
                let (shared, slots) = (Arc::clone(&shared), slots.clone());
                let delivery = Arc::new(delivery);
                async move {
                    let (inbox, retry, handler) = &*shared;
                    let attempt =
                        crate::DeliveryAttempt::new(delivered(&delivery), retry.max_attempts);
                    let id = delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|id| id.as_str().to_owned())
                        .filter(|id| !id.is_empty());
                    let outcome = match id {
                        Some(id) => {
                            slots
                                .run(inbox.process(&id, |tx| handler(Arc::clone(&delivery), tx)))
                                .await
                        }
                        None => Err(crate::inbox::InboxError::EmptyId),
                    };
                    let settlement = crate::inbox::settlement(retry, attempt, &outcome);
                    if let Err(error) = &outcome {
                        let error = super::describe(error);
                        tracing::warn!(
                            error,
                            ?settlement,
                            "consumer runner: inbox delivery not processed"
                        );
                    }
                    let settled = settle(&delivery, settlement, max_hold).await;
                    let settled = settled.as_ref().map(|()| settlement);
                    Done::after_settling(
                        settled.map_err(|error| &**error as _),
                        "settling a delivery failed; the broker requeues it",
                    )
                }
            },
        )
        .await
    }
}
