//! Golden vectors (docs/signing.md, docs/threat-model.md): every case in
//! tests/vectors/ goes through both verifiers, which must agree with each
//! other and with the case's expected outcome and reason.

#[path = "vectors/generate.rs"]
mod generate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ed25519_dalek::Signer as _;
use prost::Message;
use serde::Deserialize;

use provcache::proto::reapi::{self, ActionResult};
use provcache::provenance::signing;
use provcache::provenance::trust::{verify_served, verify_stored, Expected, Reason, TrustPolicy};

/// The environment variable that makes the ignored `regenerate` test write the vectors.
const REGENERATE_VAR: &str = "PROVCACHE_REGENERATE_VECTORS";

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedFile {
    instance: String,
    digest_function: String,
    action_digest: String,
    now: String,
    envelopes: Vec<String>,
    outcome: String,
    reason: Option<String>,
    key_name: Option<String>,
}

fn case_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .expect("tests/vectors exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()))
}

/// Runs one case through both verifiers; returns the failures found.
fn run_case(dir: &Path) -> Vec<String> {
    let case = dir.file_name().unwrap().to_string_lossy().to_string();
    let mut problems = Vec::new();
    let policy = TrustPolicy::from_toml(&String::from_utf8(read(dir, "policy.toml")).unwrap())
        .unwrap_or_else(|e| panic!("{case}: policy.toml: {e}"));
    let exp: ExpectedFile = toml::from_str(&String::from_utf8(read(dir, "expected.toml")).unwrap())
        .unwrap_or_else(|e| panic!("{case}: expected.toml: {e}"));
    let (hash, size) = exp.action_digest.split_once('/').expect("hash/size");
    let expected = Expected {
        instance: exp.instance.clone(),
        digest_function: reapi::digest_function::Value::from_str_name(&exp.digest_function).expect("known function")
            as i32,
        action_digest: reapi::Digest { hash: hash.into(), size_bytes: size.parse().expect("size") },
    };
    let now: SystemTime = humantime::parse_rfc3339(&exp.now).expect("now");
    let envelopes: Vec<Vec<u8>> = exp.envelopes.iter().map(|n| read(dir, n)).collect();
    let envelope_refs: Vec<&[u8]> = envelopes.iter().map(Vec::as_slice).collect();
    let canonical = read(dir, "canonical.binpb");
    let served = ActionResult::decode(read(dir, "result.binpb").as_slice()).expect("result.binpb decodes");

    let stored_outcome = verify_stored(&policy, &envelope_refs, &canonical, &expected, now);
    let served_outcome = verify_served(&policy, &served, &expected, now);
    if stored_outcome != served_outcome {
        problems.push(format!("{case}: verify_stored {stored_outcome:?} != verify_served {served_outcome:?}"));
    }
    if signing::canonical_bytes(&served) != canonical {
        problems.push(format!("{case}: canonical_bytes(result.binpb) != canonical.binpb"));
    }
    if signing::envelopes(&served) != envelope_refs {
        problems.push(format!("{case}: the envelopes in result.binpb are not the stored ones"));
    }
    let must_fail = case.ends_with("_fail");
    if must_fail != (exp.outcome == "fail") || !["ok", "fail"].contains(&exp.outcome.as_str()) {
        problems.push(format!("{case}: outcome {:?} does not fit the directory name", exp.outcome));
    }
    let readme = String::from_utf8(read(dir, "README.md")).unwrap();
    match (&exp.reason, &stored_outcome) {
        (Some(want), Err(got)) => {
            if Reason::from_label(want).is_none() {
                problems.push(format!("{case}: unknown reason label {want:?}"));
            }
            if got.as_str() != want {
                problems.push(format!("{case}: expected reason {want}, got {}", got.as_str()));
            }
            if !readme.contains(&format!("`{want}`")) || !readme.contains("FAIL") {
                problems.push(format!("{case}: README.md does not name the failure and reason {want}"));
            }
        }
        (None, Ok(verified)) => {
            if exp.key_name.as_deref() != Some(verified.key_name.as_str()) {
                problems.push(format!("{case}: verified by {:?}, expected {:?}", verified.key_name, exp.key_name));
            }
            if !readme.contains("OK") {
                problems.push(format!("{case}: README.md does not say OK"));
            }
        }
        (want, got) => problems.push(format!("{case}: expected reason {want:?}, got {got:?}")),
    }
    problems
}

#[test]
fn every_vector_agrees_across_both_verifiers() {
    let dirs = case_dirs();
    let names: Vec<String> = dirs.iter().map(|d| d.file_name().unwrap().to_string_lossy().to_string()).collect();
    for required in generate::REQUIRED_CASES {
        assert!(names.iter().any(|n| n == required), "missing golden vector {required}");
    }
    let problems: Vec<String> = dirs.iter().flat_map(|d| run_case(d)).collect();
    assert!(problems.is_empty(), "golden vector failures:\n{}", problems.join("\n"));
}

/// The committed vectors are exactly what the generator produces: any change
/// in encoding (a prost upgrade), canonicalisation or signing shows up here.
#[test]
fn committed_vectors_match_the_generator() {
    let generated = generate::generate();
    let mut committed = BTreeMap::new();
    collect_files(&vectors_dir(), &vectors_dir(), &mut committed);
    let mut problems = Vec::new();
    for (path, bytes) in &generated {
        match committed.get(path) {
            None => problems.push(format!("{path}: not committed")),
            Some(on_disk) if on_disk != bytes => problems.push(format!("{path}: differs from the generator")),
            Some(_) => {}
        }
    }
    for path in committed.keys() {
        if !generated.contains_key(path) {
            problems.push(format!("{path}: not produced by the generator"));
        }
    }
    assert!(
        problems.is_empty(),
        "run `{REGENERATE_VAR}=1 cargo test --release --test vectors -- --ignored regenerate` \
         only if the change is intended:\n{}",
        problems.join("\n")
    );
}

fn collect_files(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().to_string();
            // The generator's source and the directory README are not outputs.
            if rel != "generate.rs" && rel != "README.md" {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
}

/// Writes the vectors. Run with `PROVCACHE_REGENERATE_VECTORS=1 cargo test
/// --release --test vectors -- --ignored regenerate`, then review the diff.
#[test]
#[ignore = "writes tests/vectors; run explicitly to regenerate"]
fn regenerate() {
    if std::env::var_os(REGENERATE_VAR).is_none() {
        eprintln!("set {REGENERATE_VAR}=1 to write tests/vectors");
        return;
    }
    let root = vectors_dir();
    for (path, bytes) in generate::generate() {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
}

#[test]
fn the_test_key_is_the_committed_one_and_clearly_named() {
    let key = signing::SigningKey::load(&vectors_dir().join(generate::KEY_FILE)).expect("TEST-ONLY key loads");
    let policy =
        TrustPolicy::from_toml(&String::from_utf8(read(&vectors_dir().join("valid"), "policy.toml")).unwrap()).unwrap();
    assert_eq!(policy.keys[0].key_id, key.key_id());
    assert!(generate::KEY_FILE.starts_with("TEST-ONLY"));
}

#[test]
fn dsse_pae_example() {
    assert_eq!(
        signing::pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
    );
}

#[test]
fn rfc8032_test_1() {
    let secret: [u8; 32] =
        hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60").unwrap().try_into().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    assert_eq!(
        hex::encode(key.verifying_key().as_bytes()),
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    );
    let sig = key.sign(b"");
    assert_eq!(
        hex::encode(sig.to_bytes()),
        concat!(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155",
            "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        )
    );
    assert!(key.verifying_key().verify_strict(b"", &sig).is_ok());
}

/// The non-canonical vector is the valid signature with S replaced by S + L:
/// subtracting L again must give a signature that verifies.
#[test]
fn the_non_canonical_signature_is_exactly_the_malleated_valid_one() {
    let dir = vectors_dir().join("non_canonical_signature_fail");
    let mut envelope = provcache::proto::prov::Envelope::decode(read(&dir, "envelope.binpb").as_slice()).unwrap();
    let mut sig = envelope.signatures[0].sig.to_vec();
    let mut borrow = 0i16;
    for (i, l) in generate::ORDER_L.iter().enumerate() {
        let diff = i16::from(sig[32 + i]) - i16::from(*l) - borrow;
        sig[32 + i] = diff.rem_euclid(256) as u8;
        borrow = i16::from(diff < 0);
    }
    assert_eq!(borrow, 0, "S >= L");
    envelope.signatures[0].sig = sig.into();
    let policy = TrustPolicy::from_toml(&String::from_utf8(read(&dir, "policy.toml")).unwrap()).unwrap();
    let valid = vectors_dir().join("valid");
    let served = ActionResult::decode(read(&valid, "result.binpb").as_slice()).unwrap();
    let exp: ExpectedFile = toml::from_str(&String::from_utf8(read(&valid, "expected.toml")).unwrap()).unwrap();
    let (hash, size) = exp.action_digest.split_once('/').unwrap();
    let expected = Expected {
        instance: exp.instance,
        digest_function: reapi::digest_function::Value::Sha256 as i32,
        action_digest: reapi::Digest { hash: hash.into(), size_bytes: size.parse().unwrap() },
    };
    let now = humantime::parse_rfc3339(&exp.now).unwrap();
    let restored = envelope.encode_to_vec();
    assert!(verify_stored(&policy, &[&restored], &signing::canonical_bytes(&served), &expected, now).is_ok());
}
