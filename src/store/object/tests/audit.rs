use std::sync::Arc;

use super::bucket;
use crate::cache::audit::AuditLog;
use crate::limits::{LimitHits, Limits};
use crate::proto::prov::HitRecord;
use crate::provenance::notary::{Mode, ProvenanceConfig};
use crate::provenance::trust::TrustPolicy;
use crate::provenance::Provenance;
use crate::store::memory_actions::MemoryActions;
use crate::store::object::ObjectHitLog;
use crate::tools::verify_build::hitlog;

#[tokio::test]
async fn two_replicas_recording_one_invocation_keep_one_gapless_verifiable_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (signing_key, trust_policy) = crate::access::pki::ensure_dev_signing(&dir.path().join("pki")).unwrap();
    let policy = TrustPolicy::load(&trust_policy).unwrap();
    let config = ProvenanceConfig {
        signing_key,
        trust_policy,
        mode: Mode::Reject,
        server_id: "unit".into(),
        verification_disabled: false,
        signing_disabled: false,
    };
    let provenance = Arc::new(Provenance::new(config, Arc::new(std::time::SystemTime::now)).unwrap());
    let signer = provenance.hit_signer();
    let (_, bucket, _) = bucket();
    let replica = || {
        let hits = Arc::new(ObjectHitLog::new(bucket.clone()));
        let max = Limits::default().max_hit_records_per_principal;
        AuditLog::new(Arc::new(MemoryActions::new()), hits, provenance.clone(), max, Arc::new(LimitHits::default()))
    };
    let (a, b) = (replica(), replica());
    for n in 0..6 {
        let record = HitRecord {
            tool_invocation_id: "inv".into(),
            reader_principal: "spiffe://x/reader".into(),
            verdict: format!("hit {n}"),
            ..Default::default()
        };
        // Each replica's head falls behind whenever the other one appends.
        let log = if n % 3 == 0 { &a } else { &b };
        log.append(signer.as_deref(), record).await.unwrap();
    }
    let listed: Vec<_> = a.list_hits("inv", 0, "").await.unwrap().records.into_iter().map(|l| l.record).collect();
    let checked = hitlog::check(&policy, "inv", &listed);
    assert!(checked.findings.is_empty(), "{:?}", checked.findings);
    let sequences: Vec<u64> = checked.records.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, (1..=6).collect::<Vec<_>>());
    let verdicts: Vec<&str> = checked.records.iter().map(|r| r.verdict.as_str()).collect();
    assert_eq!(verdicts, ["hit 0", "hit 1", "hit 2", "hit 3", "hit 4", "hit 5"]);
}
