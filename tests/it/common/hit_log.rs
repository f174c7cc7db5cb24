//! An invocation's hit log, read the way an auditor reads it: every page of
//! ListInvocationHits, and waiting for records the server writes off the
//! request path.

use std::time::{Duration, Instant};

use prost::Message;
use provcache::proto::prov::audit_client::AuditClient;
use provcache::proto::prov::{Envelope, HitRecord, ListInvocationHitsRequest, ListInvocationHitsResponse};
use tonic::transport::Channel;

/// Every page of an invocation's hit log, `page_size` records at most per
/// page (0: the server's choice).
pub async fn list_hit_pages(
    audit: &mut AuditClient<Channel>,
    invocation: &str,
    page_size: i32,
) -> Result<Vec<ListInvocationHitsResponse>, tonic::Status> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let request = ListInvocationHitsRequest { tool_invocation_id: invocation.into(), page_size, page_token: token };
        let page = audit.list_invocation_hits(request).await?.into_inner();
        token = page.next_page_token.clone();
        pages.push(page);
        if token.is_empty() {
            return Ok(pages);
        }
    }
}

/// The signed envelopes of the listed records, in order.
pub fn envelopes_of(pages: &[ListInvocationHitsResponse]) -> Vec<Envelope> {
    pages.iter().flat_map(|p| &p.records).map(|r| r.envelope.clone().expect("an envelope")).collect()
}

/// The records of the envelopes, decoded without checking their signatures.
pub fn records_of(envelopes: &[Envelope]) -> Vec<HitRecord> {
    envelopes.iter().map(|e| HitRecord::decode(e.payload.as_ref()).unwrap()).collect()
}

/// Every record of the invocation's hit log, undecoded signatures and all.
pub async fn hit_envelopes(audit: &mut AuditClient<Channel>, invocation: &str) -> Vec<Envelope> {
    envelopes_of(&list_hit_pages(audit, invocation, 0).await.unwrap())
}

/// The invocation's records once at least `n` are listed, or what is listed
/// after `within` (the caller asserts how many it wants).
pub async fn wait_for_hit_envelopes(
    audit: &mut AuditClient<Channel>,
    invocation: &str,
    n: usize,
    within: Duration,
) -> Vec<Envelope> {
    let deadline = Instant::now() + within;
    loop {
        let envelopes = hit_envelopes(audit, invocation).await;
        if envelopes.len() >= n || Instant::now() > deadline {
            return envelopes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
