//! Dead letters: messages given up on, kept under the dead-letter scope so an operator can
//! inspect and replay them.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use idem_core::{Begin, Key, RecordState, Scope, ScopedKey, Store, StoreError, Stored, transition};

use crate::{DedupError, Deduplicator, status};

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// The handler failed with a permanent error.
    Permanent,
    /// The handler failed on the last allowed delivery.
    MaxDeliveries,
    /// The id was seen before with another fingerprint (another payload).
    Mismatch,
}

impl DeadLetterReason {
    /// The code kept as the record's `status` (see [`status`]).
    pub fn code(self) -> u16 {
        match self {
            Self::Permanent => status::FAILED,
            Self::MaxDeliveries => status::GAVE_UP,
            Self::Mismatch => status::MISMATCH,
        }
    }

    /// The reason for a status code, if it names one.
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            status::FAILED => Some(Self::Permanent),
            status::GAVE_UP => Some(Self::MaxDeliveries),
            status::MISMATCH => Some(Self::Mismatch),
            _ => None,
        }
    }

    /// A short name: `permanent`, `max-deliveries` or `mismatch`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permanent => "permanent",
            Self::MaxDeliveries => "max-deliveries",
            Self::Mismatch => "mismatch",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message given up on, kept in the store under the dead-letter scope so it can be
/// inspected and replayed by hand.
///
/// ```
/// use bytes::Bytes;
/// use idem_queue::{DeadLetter, DeadLetterReason};
///
/// let letter = DeadLetter {
///     id: "order-7".into(),
///     reason: DeadLetterReason::MaxDeliveries,
///     deliveries: 5,
///     error: Some("inventory service unreachable".into()),
///     origin: "nats stream=ORDERS seq=42 subject=orders.created".into(),
///     payload: Bytes::from_static(b"{\"order\":7}"),
/// };
/// assert_eq!(DeadLetter::from_stored(&letter.to_stored()), Some(letter));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message id.
    pub id: String,
    /// Why it was given up on.
    pub reason: DeadLetterReason,
    /// The delivery on which it was given up.
    pub deliveries: u64,
    /// The handler's last error, as text.
    pub error: Option<String>,
    /// Where it came from (broker, stream or queue, position).
    pub origin: String,
    /// The message body.
    pub payload: Bytes,
}

impl DeadLetter {
    /// The record's stored form: `status` is the reason's code, the fields are headers and
    /// the payload is the body.
    pub fn to_stored(&self) -> Stored {
        let mut stored = Stored::new(self.reason.code())
            .with_header("id", self.id.clone())
            .with_header("reason", self.reason.as_str())
            .with_header("deliveries", self.deliveries.to_string())
            .with_header("origin", self.origin.clone())
            .with_body(self.payload.clone());
        if let Some(error) = &self.error {
            stored = stored.with_header("error", error.clone());
        }
        stored
    }

    /// Reads a record written by [`DeadLetter::to_stored`].
    pub fn from_stored(stored: &Stored) -> Option<Self> {
        let header = |name: &str| {
            stored
                .headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        };
        Some(Self {
            id: header("id")?,
            reason: DeadLetterReason::from_code(stored.status)?,
            deliveries: header("deliveries")?.parse().ok()?,
            error: header("error"),
            origin: header("origin").unwrap_or_default(),
            payload: stored.body.clone().unwrap_or_default(),
        })
    }
}

/// A dead letter as [`Deduplicator::dead_letters`] lists it: the letter and when it was
/// written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterEntry {
    /// When the dead-letter record was written.
    pub at: SystemTime,
    /// The record: id, reason, deliveries, error, origin and payload.
    pub letter: DeadLetter,
}

/// The header of a dead-letter record (and of its index entry) that holds when it was written.
const AT_HEADER: &str = "dead-lettered-at";
/// The index is kept per UTC day: a listing reads one run of slots per day it covers.
const INDEX_DAY: Duration = Duration::from_secs(24 * 3600);
/// Absent slots in a row that end a day's run. A slot is absent inside a run only where a
/// writer claimed it and died before completing it (the claim lapses after its lease), and
/// the next writer fills the lowest such hole, so holes stay rare and far apart.
const INDEX_MISSES: u64 = 4;
/// Slots one writer tries past the first free one it found before giving up: concurrent
/// writers each take one, so this bounds the writers racing for one day's end.
const INDEX_RACE: u64 = 10_000;

fn nanos_since_epoch(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

fn from_nanos(nanos: &str) -> Option<SystemTime> {
    let nanos: u128 = nanos.parse().ok()?;
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    // The remainder is below 10^9, so it fits.
    let sub = (nanos % 1_000_000_000) as u32;
    UNIX_EPOCH.checked_add(Duration::new(secs, sub))
}

fn day_of(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / INDEX_DAY.as_secs()
}

fn header<'a>(stored: &'a Stored, name: &str) -> Option<&'a [u8]> {
    stored
        .headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_ref())
}

fn written_at(stored: &Stored) -> Option<SystemTime> {
    from_nanos(std::str::from_utf8(header(stored, AT_HEADER)?).ok()?)
}

/// Dead letters: writing, reading, listing and forgetting them.
///
/// A dead-letter record lives under [`Deduplicator::dead_letter_scope`], keyed like the
/// message. So that they can be listed on any [`Store`] (which can only get a key, not scan
/// them), each record also gets an entry in an index under the scope
/// `<dead-letter scope>.index`: day `d` (UTC days since 1970) has slots `d.0`, `d.1`, … filled
/// in order, each naming a message id and when its record was written. The entry is written
/// before the record, so a record is never left out of the index; an entry whose record has
/// gone (forgotten, expired, or never completed) is skipped when listing. Entries expire with
/// the last record of their day.
impl<S: Store> Deduplicator<S> {
    /// Forgets message `id`: its record, its dead-letter record and its counted failed runs
    /// ([`Deduplicator::reset_attempts`]), so its next delivery runs the handler again as
    /// attempt 1 (to replay a dead-lettered message after fixing its cause). Says whether
    /// any of them was there. Safe to repeat after an error: do not republish until it
    /// succeeded.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use idem_core::{MemoryStore, Scope};
    /// use idem_queue::{DeadLetter, DeadLetterReason, Deduplicator, HandlerError, Outcome, ResultExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("orders"));
    /// let parse = || async { "x".parse::<u32>().permanent().map(|n| n.to_string()) };
    /// let outcome = dedup.process("order-7", parse).await?;
    /// assert!(matches!(outcome, Outcome::Failed { .. }));
    /// dedup.dead_letter(&DeadLetter {
    ///     id: "order-7".into(),
    ///     reason: DeadLetterReason::Permanent,
    ///     deliveries: 1,
    ///     error: Some("invalid digit".into()),
    ///     origin: "test".into(),
    ///     payload: Bytes::from_static(b"x"),
    /// }).await?;
    ///
    /// // After fixing the cause: both records go, and the message runs again.
    /// assert!(dedup.forget("order-7").await?);
    /// assert!(dedup.dead_letter_record("order-7").await?.is_none());
    /// let outcome = dedup.process("order-7", || async { Ok::<_, HandlerError>("7") }).await?;
    /// assert!(matches!(outcome, Outcome::Processed { .. }));
    /// # Ok(()) }
    /// ```
    pub async fn forget(&self, id: &str) -> Result<bool, DedupError> {
        let key = self.key(id)?;
        let dead = Self::key_in(&self.inner.dead_letter_scope, id)?;
        let store = &self.inner.store;
        // The count first: once the message record is gone a redelivery may run, and it must
        // not start out of attempts. A stale dead-letter record, left if the last delete
        // fails, is the lesser harm (the operator sees it and retries).
        let failures = self.reset_attempts(id).await?;
        let message = store.delete(&key).await.map_err(DedupError::Store)?;
        let letter = store.delete(&dead).await.map_err(DedupError::Store)?;
        Ok(failures > 0 || message || letter)
    }

    /// Writes a dead-letter record for `letter.id` under the dead-letter scope, unless one
    /// is already there, and indexes it for [`Deduplicator::dead_letters`]. Says whether it
    /// wrote one.
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<bool, DedupError> {
        let key = Self::key_in(&self.inner.dead_letter_scope, &letter.id)?;
        let store = &self.inner.store;
        let lease = self.inner.options.lease;
        match store
            .begin(&key, &self.inner.fingerprint, lease)
            .await
            .map_err(DedupError::Store)?
        {
            Begin::Acquired(claim) => {
                let at = SystemTime::now();
                if let Err(error) = self.index_dead_letter(letter, at).await {
                    // Unindexed it would never be listed: give the record up so a retry
                    // writes both.
                    if let Err(release) = store.release(&key, claim.token).await {
                        tracing::warn!(?key, error = %release, "releasing a dead-letter claim failed");
                    }
                    return Err(error);
                }
                let stored = letter
                    .to_stored()
                    .with_header(AT_HEADER, nanos_since_epoch(at).to_string());
                store
                    .complete(
                        &key,
                        claim.token,
                        &stored,
                        self.inner.options.dead_letter_retention,
                    )
                    .await
                    .map_err(DedupError::Store)?;
                Ok(true)
            }
            Begin::InFlight { .. } => Err(DedupError::Store(StoreError::backend(
                "write a dead-letter record",
                "another consumer is writing this dead-letter record",
            ))),
            _ => Ok(false),
        }
    }

    /// The dead-letter record for message `id`, if there is one.
    pub async fn dead_letter_record(&self, id: &str) -> Result<Option<DeadLetter>, DedupError> {
        Ok(self
            .dead_letter_written(id)
            .await?
            .map(|(letter, _)| letter))
    }

    /// Lists dead letters written at or after `since`, oldest first, at most `limit`.
    ///
    /// To page on, pass the last entry's `at` plus a nanosecond as the next `since`. Records
    /// older than [`DedupOptions::dead_letter_retention`](crate::DedupOptions) have expired,
    /// so `since` earlier than that reads nothing more. Each day covered costs a few store
    /// reads, and each entry two. Dead letters written by versions before this index are
    /// not listed (read them with [`Deduplicator::dead_letter_record`]).
    ///
    /// To replay one: fix the cause, [`forget`](Deduplicator::forget) it, and publish its
    /// payload again under the same id (the adapters' publish helpers set it).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use bytes::Bytes;
    /// use idem_core::{MemoryStore, Scope};
    /// use idem_queue::{DeadLetter, DeadLetterReason, Deduplicator};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dedup = Deduplicator::new(MemoryStore::new(), Scope::new("orders"));
    /// for (id, deliveries) in [("order-7", 5), ("order-9", 1)] {
    ///     dedup.dead_letter(&DeadLetter {
    ///         id: id.into(),
    ///         reason: DeadLetterReason::MaxDeliveries,
    ///         deliveries,
    ///         error: Some("inventory service unreachable".into()),
    ///         origin: "test".into(),
    ///         payload: Bytes::from_static(b"{}"),
    ///     }).await?;
    /// }
    /// let day_ago = SystemTime::now() - Duration::from_secs(86_400);
    /// let listed = dedup.dead_letters(day_ago, 100).await?;
    /// let ids: Vec<_> = listed.iter().map(|entry| entry.letter.id.as_str()).collect();
    /// assert_eq!(ids, ["order-7", "order-9"]);
    /// assert_eq!(listed[0].letter.deliveries, 5);
    /// assert_eq!(listed[0].letter.reason, DeadLetterReason::MaxDeliveries);
    /// # Ok(()) }
    /// ```
    pub async fn dead_letters(
        &self,
        since: SystemTime,
        limit: usize,
    ) -> Result<Vec<DeadLetterEntry>, DedupError> {
        let now = SystemTime::now();
        // Nothing older than the retention (plus the day an entry may outlive it) is left.
        let horizon = now
            .checked_sub(self.inner.options.dead_letter_retention + INDEX_DAY)
            .unwrap_or(UNIX_EPOCH);
        let mut listed = Vec::new();
        for day in day_of(since.max(horizon))..=day_of(now) {
            if listed.len() >= limit {
                break;
            }
            let mut entries = self.index_day(day, since).await?;
            // Slots are filled in order, but racing writers can finish out of it.
            entries.sort();
            for (at, id) in entries {
                if listed.len() >= limit {
                    break;
                }
                // The record is the truth: gone means forgotten or expired, another time
                // means it was forgotten and written again (listed by its newer entry).
                if let Some((letter, written)) = self.dead_letter_written(&id).await?
                    && written == Some(at)
                {
                    listed.push(DeadLetterEntry { at, letter });
                }
            }
        }
        Ok(listed)
    }

    /// The dead-letter record for `id` and when it was written (if it says).
    async fn dead_letter_written(
        &self,
        id: &str,
    ) -> Result<Option<(DeadLetter, Option<SystemTime>)>, DedupError> {
        let key = Self::key_in(&self.inner.dead_letter_scope, id)?;
        let record = self
            .inner
            .store
            .get(&key)
            .await
            .map_err(DedupError::Store)?;
        Ok(record.and_then(|record| match record.state {
            RecordState::Completed { stored, .. } => {
                DeadLetter::from_stored(&stored).map(|letter| (letter, written_at(&stored)))
            }
            _ => None,
        }))
    }

    fn index_scope(&self) -> Scope {
        Scope::new(format!("{}.index", self.inner.dead_letter_scope.as_str()))
    }

    fn index_key(scope: &Scope, day: u64, slot: u64) -> ScopedKey {
        let key = Key::new(&format!("{day}.{slot}")).expect("digits and a dot make a key");
        ScopedKey::new(scope.clone(), key)
    }

    /// Whether slot `slot` of `day` is written or being written.
    async fn index_slot_taken(
        &self,
        scope: &Scope,
        day: u64,
        slot: u64,
    ) -> Result<bool, DedupError> {
        let key = Self::index_key(scope, day, slot);
        let record = self
            .inner
            .store
            .get(&key)
            .await
            .map_err(DedupError::Store)?;
        Ok(record.is_some())
    }

    /// Writes an index entry for `letter` written at `at` into the first free slot of its
    /// day. Slots fill from 0 upward, so the first free one is found by doubling then
    /// bisecting (a few reads even for a day with many dead letters); `begin` then decides
    /// between racing writers, and a loser moves one slot on.
    async fn index_dead_letter(
        &self,
        letter: &DeadLetter,
        at: SystemTime,
    ) -> Result<(), DedupError> {
        let scope = self.index_scope();
        let day = day_of(at);
        let mut slot = 0;
        if self.index_slot_taken(&scope, day, 0).await? {
            let (mut taken, mut free) = (0, 1);
            while self.index_slot_taken(&scope, day, free).await? {
                taken = free;
                free = free.saturating_mul(2);
            }
            while free - taken > 1 {
                let middle = taken + (free - taken) / 2;
                if self.index_slot_taken(&scope, day, middle).await? {
                    taken = middle;
                } else {
                    free = middle;
                }
            }
            slot = free;
        }
        // Every entry of a day expires with the day's last record, all at once, so a day's
        // run of slots never loses its start while its end is still listed.
        let day_ends =
            UNIX_EPOCH + Duration::from_secs((day + 1).saturating_mul(INDEX_DAY.as_secs()));
        let expires = day_ends + self.inner.options.dead_letter_retention;
        let retain = expires
            .duration_since(SystemTime::now())
            .unwrap_or(INDEX_DAY)
            .min(transition::MAX_SPAN);
        let entry = Stored::new(letter.reason.code())
            .with_header("id", letter.id.clone())
            .with_header(AT_HEADER, nanos_since_epoch(at).to_string());
        let store = &self.inner.store;
        for slot in slot..slot.saturating_add(INDEX_RACE) {
            let key = Self::index_key(&scope, day, slot);
            let begin = store
                .begin(&key, &self.inner.fingerprint, self.inner.options.lease)
                .await
                .map_err(DedupError::Store)?;
            if let Begin::Acquired(claim) = begin {
                store
                    .complete(&key, claim.token, &entry, retain)
                    .await
                    .map_err(DedupError::Store)?;
                return Ok(());
            }
        }
        Err(DedupError::Store(StoreError::backend(
            "index a dead-letter record",
            "every slot tried was taken by another writer",
        )))
    }

    /// The entries of `day` written at or after `since`: its run of slots from 0, read until
    /// [`INDEX_MISSES`] absent slots in a row.
    async fn index_day(
        &self,
        day: u64,
        since: SystemTime,
    ) -> Result<Vec<(SystemTime, String)>, DedupError> {
        let scope = self.index_scope();
        let mut entries = Vec::new();
        let mut misses = 0;
        let mut slot = 0;
        while misses < INDEX_MISSES {
            let key = Self::index_key(&scope, day, slot);
            slot += 1;
            let record = self
                .inner
                .store
                .get(&key)
                .await
                .map_err(DedupError::Store)?;
            let Some(record) = record else {
                misses += 1;
                continue;
            };
            misses = 0;
            if let RecordState::Completed { stored, .. } = record.state {
                let id = header(&stored, "id").map(|id| String::from_utf8_lossy(id).into_owned());
                if let (Some(id), Some(at)) = (id, written_at(&stored))
                    && at >= since
                {
                    entries.push((at, id));
                }
            }
        }
        Ok(entries)
    }
}
