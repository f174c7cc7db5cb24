//! The audit log: the per-invocation hit log (written on every answered
//! GetActionResult, listed for `verify-build`) and the stored versions of an
//! entry. The record rules are in [`crate::provenance::hit_log`]; this module
//! drives them over the [`HitLogStore`] and [`ActionStore`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prost::Message;

use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use crate::limits::LimitHits;
use crate::proto::prov::storage::StoredActionEntry;
use crate::proto::prov::{self, HitRecord};
use crate::proto::reapi;
use crate::provenance::hit_log::{self, ChainHead, ListPage, PAGE_MAX, PAGE_MAX_BYTES};
use crate::provenance::signing;
use crate::provenance::Provenance;
use crate::store::action_store::ActionStore;
use crate::store::hit_log_store::HitLogStore;
use crate::store::StoreErrorKind;

/// History versions per GetStoredEntry page when the caller does not say.
const HISTORY_PAGE_DEFAULT: usize = 100;
/// Most history versions per page.
const HISTORY_PAGE_MAX: usize = 1000;
/// Most stored bytes per GetStoredEntry page, `current` included; a single
/// version (at most a 3 MiB result and its envelope) always fits, so every
/// reply stays under a 4 MiB client receive limit.
const HISTORY_PAGE_MAX_BYTES: usize = 3 << 20;
/// Chain heads kept in memory (invocations being appended to); beyond it,
/// idle ones are dropped and read back from storage when needed.
const MAX_CHAINS: usize = 4096;
/// Tries to store one hit record when other servers keep taking its
/// sequence; past it the record is dropped (and logged by the caller).
const APPEND_ATTEMPTS: usize = 16;

/// The head of one invocation's chain, `None` until read from storage. Its
/// lock serialises the appends of one invocation, so sequences have no gaps
/// and each record names its predecessor's hash.
type Chain = Arc<tokio::sync::Mutex<Option<ChainHead>>>;

/// The audit log.
pub struct AuditLog {
    actions: Arc<dyn ActionStore>,
    hits: Arc<dyn HitLogStore>,
    chains: Mutex<HashMap<String, Chain>>,
    provenance: Arc<Provenance>,
    max_per_principal: u64,
    limit_hits: Arc<LimitHits>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("actions", &self.actions).field("hits", &self.hits).finish_non_exhaustive()
    }
}

impl AuditLog {
    /// An audit log over `actions` and `hits`, signing hit records with the
    /// server's key and holding each reader to `max_per_principal` records
    /// per invocation (refusals counted in `limit_hits`).
    pub fn new(
        actions: Arc<dyn ActionStore>,
        hits: Arc<dyn HitLogStore>,
        provenance: Arc<Provenance>,
        max_per_principal: u64,
        limit_hits: Arc<LimitHits>,
    ) -> Self {
        let chains = Mutex::default();
        AuditLog { actions, hits, chains, provenance, max_per_principal, limit_hits }
    }

    /// Records an answer in its invocation's chain, off the request path:
    /// chaining, signing and storing must not add latency to hits. A record
    /// that cannot be stored is logged, never an error for the reader.
    pub fn record(self: &Arc<Self>, record: HitRecord) {
        let (log, signer) = (self.clone(), self.provenance.hit_signer());
        tokio::spawn(async move {
            if let Err(e) = log.append(signer.as_deref(), record).await {
                tracing::warn!(error = %e, "could not record a hit in the audit log");
            }
        });
    }

    /// Links `record` after its invocation's head and stores it. When another
    /// server (a replica on the same bucket) took the sequence first, the rows
    /// it wrote are read into the head and the record is relinked, so one
    /// invocation stays one gapless chain whoever serves it.
    pub(crate) async fn append(&self, signer: Option<&signing::SigningKey>, record: HitRecord) -> Result<()> {
        let invocation = record.tool_invocation_id.clone();
        let chain = self.chain(&invocation);
        let mut guard = chain.lock().await;
        if guard.is_none() {
            *guard = Some(self.load_head(&invocation, None).await?);
        }
        let head = guard.as_mut().expect("loaded above");
        for _ in 0..APPEND_ATTEMPTS {
            let Some(link) = head.link(signer, self.max_per_principal, &self.limit_hits, record.clone()) else {
                return Ok(());
            };
            match self.hits.append(&invocation, link.sequence, link.answered_at_nanos, link.envelope.clone()).await {
                Ok(()) => {
                    head.advance(link);
                    return Ok(());
                }
                Err(Error::Storage(e)) if e.kind() == StoreErrorKind::Conflict => {
                    let after = self.hits.cursor_after(&invocation, head.next_sequence - 1);
                    *head = self.load_head(&invocation, Some((head.clone(), after))).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Aborted(format!(
            "hit record of invocation {invocation:?} dropped: its sequence was taken {APPEND_ATTEMPTS} times in a row"
        )))
    }

    /// The chain of `invocation`, shared by all its appenders. When
    /// [`MAX_CHAINS`] are kept, those nobody holds are dropped first.
    fn chain(&self, invocation: &str) -> Chain {
        let mut chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(chain) = chains.get(invocation) {
            return chain.clone();
        }
        if chains.len() >= MAX_CHAINS {
            chains.retain(|_, chain| Arc::strong_count(chain) > 1);
        }
        let chain = Chain::default();
        chains.insert(invocation.to_string(), chain.clone());
        chain
    }

    /// The head of `invocation`'s chain: read from its start, or from a
    /// known head and a cursor after it (only the rows written since).
    async fn load_head(&self, invocation: &str, from: Option<(ChainHead, Vec<u8>)>) -> Result<ChainHead> {
        let (mut head, mut after) = match from {
            Some((head, cursor)) => (head, Some(cursor)),
            None => (ChainHead::default(), None),
        };
        loop {
            let page = self.hits.list(invocation, after.as_deref(), PAGE_MAX, usize::MAX).await?;
            page.rows.iter().for_each(|row| head.absorb(row));
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(head),
            }
        }
    }

    /// One page of an invocation's records in chain order, bounded by
    /// `page_size` ([`hit_log::page_limit`]) and by [`PAGE_MAX_BYTES`].
    /// `page_token` is empty or a previous page's token.
    pub async fn list_hits(&self, invocation: &str, page_size: i32, page_token: &str) -> Result<ListPage> {
        if invocation.is_empty() {
            return Err(Error::InvalidArgument("tool_invocation_id is required".into()));
        }
        let limit = hit_log::page_limit(page_size)?;
        let after = if page_token.is_empty() {
            None
        } else {
            let bad = || Error::InvalidArgument("page_token was not issued by this server for this invocation".into());
            let raw = hex::decode(page_token).map_err(|_| bad())?;
            if !self.hits.is_cursor_of(invocation, &raw) {
                return Err(bad());
            }
            Some(raw)
        };
        let page = self.hits.list(invocation, after.as_deref(), limit, PAGE_MAX_BYTES).await?;
        Ok(ListPage {
            records: page.rows.into_iter().map(hit_log::listed).collect(),
            next_page_token: page.next.map(hex::encode).unwrap_or_default(),
        })
    }

    /// An action's current entry (first page only) and one page of its
    /// history, each as a client would have been served it, for auditors.
    pub async fn stored_entry(
        &self,
        instance: &InstanceName,
        action: &Digest,
        page_size: i32,
        page_token: &str,
    ) -> Result<prov::GetStoredEntryResponse> {
        let count = match page_size {
            n if n < 0 => return Err(Error::InvalidArgument(format!("history_page_size {n} is negative"))),
            0 => HISTORY_PAGE_DEFAULT,
            n => (n as usize).min(HISTORY_PAGE_MAX),
        };
        // The token is the history time (u64 BE, hex) the page starts at.
        let from = if page_token.is_empty() {
            None
        } else {
            let raw = hex::decode(page_token).ok().and_then(|b| <[u8; 8]>::try_from(b).ok());
            Some(u64::from_be_bytes(
                raw.ok_or_else(|| Error::InvalidArgument("history_page_token was not issued by this server".into()))?,
            ))
        };
        // Only the first page carries the current entry, and it counts
        // against the page's bytes (the page may then hold no history).
        let current = if from.is_none() { self.actions.get(instance, action).await? } else { None };
        let budget = HISTORY_PAGE_MAX_BYTES.saturating_sub(current.as_ref().map_or(0, Vec::len));
        let page =
            self.actions.history_page(instance, action, from.unwrap_or(0), count, budget, current.is_none()).await?;
        Ok(prov::GetStoredEntryResponse {
            current: current.as_deref().and_then(decode_served),
            history: page.versions.iter().filter_map(|(_, v)| decode_served(v)).collect(),
            next_history_page_token: page.next.map(|n| hex::encode(n.to_be_bytes())).unwrap_or_default(),
        })
    }

    /// Deletes history versions and hit-log chains older than `before_nanos`;
    /// returns how many records. The chain heads of purged invocations that
    /// nobody holds are forgotten, so a reused invocation id starts a new
    /// chain; every other head stays (re-reading a long chain is costly).
    pub async fn purge(&self, before_nanos: u64) -> Result<usize> {
        let history = self.actions.purge_history(before_nanos).await?;
        let hits = self.hits.purge(before_nanos).await?;
        if !hits.invocations.is_empty() {
            let mut chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
            for invocation in &hits.invocations {
                if chains.get(invocation).is_some_and(|chain| Arc::strong_count(chain) == 1) {
                    chains.remove(invocation);
                }
            }
        }
        Ok(history + hits.rows)
    }
}

fn served_form(entry: &StoredActionEntry) -> Option<prov::StoredEntry> {
    let mut result = reapi::ActionResult::decode(entry.canonical_result.clone()).ok()?;
    // verify-build checks the stored bytes when a re-encoding would hide a difference.
    let reencoded = signing::canonical_bytes(&result) == entry.canonical_result[..];
    let stored_canonical_result = if reencoded { Default::default() } else { entry.canonical_result.clone() };
    if !entry.envelope.is_empty() {
        signing::attach_envelope_bytes(&mut result, entry.envelope.to_vec());
    }
    Some(prov::StoredEntry {
        result: Some(result),
        stored_at: Some(prost_types::Timestamp { seconds: entry.stored_at_unix, nanos: 0 }),
        stored_canonical_result,
    })
}

fn decode_served(bytes: &[u8]) -> Option<prov::StoredEntry> {
    StoredActionEntry::decode(bytes).ok().and_then(|e| served_form(&e))
}
