//! Micro-benchmarks of the hot pure functions: signing, verification,
//! canonicalisation, resource-name parsing and digests.
//! Run: `cargo bench --bench micro` (release profile, like everything here).

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use provcache::cache::digest::{Digest, DigestFunction};
use provcache::proto::prov::OriginMetadata;
use provcache::proto::reapi;
use provcache::provenance::signing::{self, SigningKey, StatementParams};
use provcache::provenance::trust::{render_key_entry, KeyState, TrustPolicy};
use provcache::provenance::verify::{verify_served, verify_stored, Expected};

fn sample_result() -> reapi::ActionResult {
    let d = |s: &str| Digest::of(DigestFunction::Sha256, s.as_bytes()).to_proto();
    reapi::ActionResult {
        output_files: (0..8)
            .map(|i| reapi::OutputFile {
                path: format!("bazel-out/k8-fastbuild/bin/pkg/out{i}.o"),
                digest: Some(d(&format!("output {i}"))),
                ..Default::default()
            })
            .collect(),
        stdout_digest: Some(d("stdout")),
        exit_code: 0,
        ..Default::default()
    }
}

fn signed() -> (SigningKey, TrustPolicy, reapi::ActionResult, Vec<u8>, Vec<u8>, Expected) {
    let key = SigningKey::generate().unwrap();
    let now = SystemTime::now();
    let policy = TrustPolicy::from_toml(&format!(
        "policy_version = 1\nclock_skew = \"5m\"\n{}",
        render_key_entry(
            "bench",
            &key.verifying_key(),
            KeyState::Active,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(3600)
        )
    ))
    .unwrap();
    let result = sample_result();
    let canonical = signing::canonical_bytes(&result);
    let action = Digest::of(DigestFunction::Sha256, b"action").to_proto();
    let command = Digest::of(DigestFunction::Sha256, b"command").to_proto();
    let statement = signing::build_statement(StatementParams {
        instance_name: "main",
        digest_function: 1,
        action_digest: &action,
        canonical_result: &canonical,
        command_digest: &command,
        input_root_digest: &command,
        signed_at: now,
        key_id: key.key_id(),
        server_id: "bench",
        origin: OriginMetadata::default(),
    });
    let envelope = key.sign(&statement).encode_to_vec();
    let mut served = result.clone();
    signing::attach_envelope_bytes(&mut served, envelope.clone());
    let expected = Expected { instance: "main".into(), digest_function: 1, action_digest: action };
    (key, policy, served, canonical, envelope, expected)
}

fn benches(c: &mut Criterion) {
    let (key, policy, served, canonical, envelope, expected) = signed();
    let now = SystemTime::now();

    let statement = {
        let action = expected.action_digest.clone();
        signing::build_statement(StatementParams {
            instance_name: "main",
            digest_function: 1,
            action_digest: &action,
            canonical_result: &canonical,
            command_digest: &action,
            input_root_digest: &action,
            signed_at: now,
            key_id: key.key_id(),
            server_id: "bench",
            origin: OriginMetadata::default(),
        })
    };
    c.bench_function("sign statement", |b| b.iter(|| key.sign(&statement)));
    c.bench_function("verify stored entry", |b| {
        b.iter(|| verify_stored(&policy, &[&envelope], &canonical, &expected, now).unwrap())
    });
    c.bench_function("verify served result (verify-build path)", |b| {
        b.iter(|| verify_served(&policy, &served, &expected, now).unwrap())
    });
    c.bench_function("canonicalise ActionResult (8 outputs)", |b| b.iter(|| signing::canonical_bytes(&served)));

    let h = Digest::of(DigestFunction::Sha256, b"x").hash_hex();
    let read = format!("team/main/blobs/{h}/12345");
    let write =
        format!("team/main/uploads/5f0c6f4e-8a0b-4f7e-9d55-0c1f2a3b4c5d/compressed-blobs/zstd/blake3/{h}/12345");
    c.bench_function("parse read resource name", |b| b.iter(|| provcache::cache::resource::parse_read(&read).unwrap()));
    c.bench_function("parse write resource name", |b| {
        b.iter(|| provcache::cache::resource::parse_write(&write).unwrap())
    });

    let mut g = c.benchmark_group("digest 1 MiB");
    let data = vec![7u8; 1 << 20];
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("sha256", |b| b.iter(|| Digest::of(DigestFunction::Sha256, &data)));
    g.bench_function("blake3", |b| b.iter(|| Digest::of(DigestFunction::Blake3, &data)));
    g.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(micro);
