//! Builds every golden vector in memory, deterministically: a fixed TEST-ONLY
//! seed key, fixed timestamps, and Ed25519's deterministic signatures. The
//! `vectors` test compares the result with the committed files byte for byte,
//! and writes them when asked to regenerate (see tests/vectors/README.md).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::Signer as _;
use prost::Message;
use sha2::{Digest as _, Sha256};

use provcache::cache::digest::{Digest, DigestFunction};
use provcache::proto::prov::{self, ActionResultStatement, Envelope, OriginMetadata};
use provcache::proto::reapi::{self, ActionResult};
use provcache::provenance::signing::{self, SigningKey, StatementParams};

/// The committed TEST-ONLY private key (never used outside tests).
pub const KEY_FILE: &str = "TEST-ONLY-signing.key";
/// Every case the threat model requires, by directory name.
pub const REQUIRED_CASES: [&str; 17] = [
    "valid",
    "unsigned_fail",
    "two_envelopes_fail",
    "wrong_payload_type_fail",
    "unknown_key_fail",
    "revoked_key_fail",
    "outside_key_window_fail",
    "future_signed_at_fail",
    "too_old_fail",
    "action_hash_mismatch_fail",
    "action_size_mismatch_fail",
    "instance_mismatch_fail",
    "digest_function_mismatch_fail",
    "result_byte_flipped_fail",
    "inlined_stdout",
    "writer_revoked_fail",
    "non_canonical_signature_fail",
];

const SIGNED_AT: &str = "2026-09-15T12:00:00Z";
const NOW: &str = "2026-09-16T12:00:00Z";
const INSTANCE: &str = "main";
const PRINCIPAL: &str = "spiffe://ci.example.com/runner-42";
const KEY_NAME: &str = "test-2026";
const OTHER_KEY_NAME: &str = "other-2026";
/// The group order of Ed25519, little-endian.
pub const ORDER_L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const STDOUT: &[u8] = b"Linking hello\n";
const HELLO: &[u8] = b"\x7fELF TEST-ONLY not really a binary\n";

fn time(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).expect("fixed timestamp")
}

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn sha256(data: &[u8]) -> reapi::Digest {
    Digest::of(DigestFunction::Sha256, data).to_proto()
}

fn dalek_key(label: &str) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&Sha256::digest(label.as_bytes()).into())
}

/// Everything the cases share.
struct World {
    key: SigningKey,
    raw_key: ed25519_dalek::SigningKey,
    other_public: ed25519_dalek::VerifyingKey,
    action_digest: reapi::Digest,
    command_digest: reapi::Digest,
    input_root_digest: reapi::Digest,
    result: ActionResult,
}

impl World {
    fn new() -> World {
        let raw_key = dalek_key("provcache TEST-ONLY golden-vector signing key");
        let pem = raw_key.to_pkcs8_pem(LineEnding::LF).expect("pkcs8");
        let key = SigningKey::from_pkcs8_pem(&pem).expect("own key");
        let other_public = dalek_key("provcache TEST-ONLY golden-vector other key").verifying_key();

        let source = b"int main(void) { return 0; }\n";
        let input_root = reapi::Directory {
            files: vec![reapi::FileNode {
                name: "hello.c".into(),
                digest: Some(sha256(source)),
                is_executable: false,
                node_properties: None,
            }],
            ..Default::default()
        };
        let command = reapi::Command {
            arguments: vec![
                "/usr/bin/cc".into(),
                "-o".into(),
                "bazel-out/k8-fastbuild/bin/hello".into(),
                "hello.c".into(),
            ],
            output_paths: vec!["bazel-out/k8-fastbuild/bin/hello".into()],
            ..Default::default()
        };
        let command_digest = sha256(&command.encode_to_vec());
        let input_root_digest = sha256(&input_root.encode_to_vec());
        let action = reapi::Action {
            command_digest: Some(command_digest.clone()),
            input_root_digest: Some(input_root_digest.clone()),
            ..Default::default()
        };
        let result = ActionResult {
            output_files: vec![reapi::OutputFile {
                path: "bazel-out/k8-fastbuild/bin/hello".into(),
                digest: Some(sha256(HELLO)),
                is_executable: true,
                ..Default::default()
            }],
            exit_code: 0,
            stdout_digest: Some(sha256(STDOUT)),
            execution_metadata: Some(reapi::ExecutedActionMetadata {
                worker: "ci-runner-42".into(),
                execution_start_timestamp: Some(time("2026-09-15T11:59:58Z").into()),
                execution_completed_timestamp: Some(time("2026-09-15T11:59:59Z").into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        World {
            key,
            raw_key,
            other_public,
            action_digest: sha256(&action.encode_to_vec()),
            command_digest,
            input_root_digest,
            result,
        }
    }

    fn statement(&self, canonical: &[u8], signed_at: SystemTime) -> ActionResultStatement {
        signing::build_statement(StatementParams {
            instance_name: INSTANCE,
            digest_function: reapi::digest_function::Value::Sha256 as i32,
            action_digest: &self.action_digest,
            canonical_result: canonical,
            command_digest: &self.command_digest,
            input_root_digest: &self.input_root_digest,
            signed_at,
            key_id: self.key.key_id(),
            server_id: "provcache-test-1",
            origin: OriginMetadata {
                writer: Some(prov::Writer {
                    principal: PRINCIPAL.into(),
                    leaf_cert_sha256: Sha256::digest(b"TEST-ONLY leaf certificate").to_vec().into(),
                    cert_not_after: Some(time("2026-12-01T00:00:00Z").into()),
                    rule: "ci-writers".into(),
                }),
                claims: Some(prov::ClientClaims {
                    tool_name: "bazel".into(),
                    tool_version: "8.4.2".into(),
                    tool_invocation_id: "0b5e8f8e-2f6c-4d0c-9a57-1c1d2e3f4a5b".into(),
                    correlated_invocations_id: "c0ffee00-0000-4000-8000-000000000001".into(),
                    action_id: "9f2d1c0b".into(),
                    action_mnemonic: "CppLink".into(),
                    target_id: "//hello:hello".into(),
                    configuration_id: "k8-fastbuild".into(),
                }),
            },
        })
    }

    /// Signs arbitrary payload bytes under any payload type, bypassing the
    /// server's API (for the malformed cases).
    fn sign_raw(&self, payload_type: &str, payload: Vec<u8>) -> Envelope {
        let sig = self.raw_key.sign(&signing::pae(payload_type, &payload));
        Envelope {
            payload: payload.into(),
            payload_type: payload_type.into(),
            signatures: vec![prov::Signature { sig: sig.to_bytes().to_vec().into(), keyid: self.key.key_id().into() }],
        }
    }
}

/// One vector before it is written out.
#[derive(Clone)]
struct Case {
    name: &'static str,
    summary: &'static str,
    canonical: Vec<u8>,
    served: ActionResult,
    envelopes: Vec<Vec<u8>>,
    policy: Policy,
    instance: String,
    digest_function: reapi::digest_function::Value,
    action_digest: reapi::Digest,
    now: SystemTime,
    reason: Option<&'static str>,
}

/// The knobs of a case's trust policy.
#[derive(Clone)]
struct Policy {
    listed_key: Listed,
    state: &'static str,
    pem: bool,
    valid_from: &'static str,
    valid_until: &'static str,
    instances: &'static str,
    not_before: Option<&'static str>,
    extra: String,
}

#[derive(Clone, Copy)]
enum Listed {
    Signer,
    Other,
}

impl Policy {
    fn render(&self, case: &str, world: &World) -> String {
        let (name, public) = match self.listed_key {
            Listed::Signer => (KEY_NAME, world.key.verifying_key()),
            Listed::Other => (OTHER_KEY_NAME, world.other_public),
        };
        let public_key = if self.pem {
            format!("'''\n{}'''", public.to_public_key_pem(LineEnding::LF).expect("spki"))
        } else {
            format!("\"{}\"", base64::engine::general_purpose::STANDARD.encode(public.as_bytes()))
        };
        let not_before = self.not_before.map(|t| format!("not_before = \"{t}\"\n")).unwrap_or_default();
        format!(
            "# TEST-ONLY trust policy for golden vector `{case}`. Never use outside tests.\n\
             policy_version = 1\n\
             max_age = \"30d\"\n\
             clock_skew = \"5m\"\n\
             {not_before}\n\
             [[keys]]\n\
             name = \"{name}\"\n\
             key_id = \"{}\"\n\
             public_key = {public_key}\n\
             state = \"{}\"\n\
             valid_from = \"{}\"\n\
             valid_until = \"{}\"\n\
             instances = {}\n\
             {}",
            signing::key_id(&public),
            self.state,
            self.valid_from,
            self.valid_until,
            self.instances,
            self.extra,
        )
    }
}

fn base_policy() -> Policy {
    Policy {
        listed_key: Listed::Signer,
        state: "active",
        pem: false,
        valid_from: "2026-08-01T00:00:00Z",
        valid_until: "2027-02-01T00:00:00Z",
        instances: "[\"*\"]",
        not_before: None,
        extra: String::new(),
    }
}

fn served_with(result: &ActionResult, envelopes: &[Vec<u8>]) -> ActionResult {
    let mut served = result.clone();
    for e in envelopes {
        signing::attach_envelope_bytes(&mut served, e.clone());
    }
    served
}

/// Adds the group order to the S half of a signature: the same point
/// equation holds, but S >= L is non-canonical and `verify_strict` refuses it.
fn malleate(sig: &[u8]) -> Vec<u8> {
    let mut out = sig.to_vec();
    let mut carry = 0u16;
    for (i, l) in ORDER_L.iter().enumerate() {
        let sum = u16::from(out[32 + i]) + u16::from(*l) + carry;
        out[32 + i] = sum as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0, "S + L fits in 32 bytes");
    out
}

fn cases(world: &World) -> Vec<Case> {
    let canonical = signing::canonical_bytes(&world.result);
    let signed_at = time(SIGNED_AT);
    let statement = world.statement(&canonical, signed_at);
    let envelope = world.key.sign(&statement).encode_to_vec();
    let valid = Case {
        name: "valid",
        summary: "A result signed by an active key, read back as stored.",
        canonical: canonical.clone(),
        served: served_with(&world.result, std::slice::from_ref(&envelope)),
        envelopes: vec![envelope.clone()],
        policy: base_policy(),
        instance: INSTANCE.into(),
        digest_function: reapi::digest_function::Value::Sha256,
        action_digest: world.action_digest.clone(),
        now: time(NOW),
        reason: None,
    };
    let with = |name, summary, reason: Option<&'static str>, f: &dyn Fn(&mut Case)| {
        let mut c = Case { name, summary, reason, ..valid.clone() };
        f(&mut c);
        c
    };
    let resigned = |statement: &ActionResultStatement| world.key.sign(statement).encode_to_vec();

    let mut out = vec![];
    out.push(with(
        "inlined_stdout",
        "Inlined stdout and output file contents (covered by their digests): the entry still verifies.",
        None,
        &|c| {
            c.served.stdout_raw = STDOUT.to_vec().into();
            c.served.output_files[0].contents = HELLO.to_vec().into();
        },
    ));
    out.push(with(
        "verify_only_key",
        "Signed by a key in the verify_only state (rotation), listed as a PEM SubjectPublicKeyInfo.",
        None,
        &|c| {
            c.policy.state = "verify_only";
            c.policy.pem = true;
        },
    ));
    out.push(with(
        "unset_digest_function",
        "The request left digest_function unset (UNKNOWN), which means SHA-256.",
        None,
        &|c| {
            c.digest_function = reapi::digest_function::Value::Unknown;
        },
    ));
    out.push(with("unsigned_fail", "The envelope was deleted.", Some("unsigned"), &|c| {
        c.envelopes.clear();
        c.served = world.result.clone();
    }));
    out.push(with(
        "two_envelopes_fail",
        "Two envelopes, each valid on its own: which one vouches is ambiguous.",
        Some("ambiguous"),
        &|c| {
            let second = resigned(&world.statement(&canonical, signed_at + Duration::from_secs(3600)));
            c.envelopes.push(second);
            c.served = served_with(&world.result, &c.envelopes);
        },
    ));
    out.push(with(
        "wrong_payload_type_fail",
        "A correctly signed envelope whose payload type is not the statement's.",
        Some("wrong_payload_type"),
        &|c| {
            let env = world.sign_raw("application/vnd.in-toto+json", statement.encode_to_vec()).encode_to_vec();
            c.envelopes = vec![env];
            c.served = served_with(&world.result, &c.envelopes);
        },
    ));
    out.push(with("unknown_key_fail", "Signed by a key the trust policy does not list.", Some("unknown_key"), &|c| {
        c.policy.listed_key = Listed::Other;
    }));
    out.push(with("revoked_key_fail", "Signed by a key the trust policy marks revoked.", Some("key_revoked"), &|c| {
        c.policy.state = "revoked";
    }));
    out.push(with(
        "outside_key_window_fail",
        "Signed after the key's validity window ended.",
        Some("outside_key_window"),
        &|c| {
            c.policy.valid_from = "2026-02-01T00:00:00Z";
            c.policy.valid_until = "2026-08-01T00:00:00Z";
        },
    ));
    out.push(with(
        "future_signed_at_fail",
        "signed_at is 10 minutes ahead of the verifier's clock; the allowed skew is 5 minutes.",
        Some("future_signed_at"),
        &|c| {
            c.now = signed_at - Duration::from_secs(600);
        },
    ));
    out.push(with(
        "too_old_fail",
        "Signed 31 days before the verifier's clock; max_age is 30 days.",
        Some("too_old"),
        &|c| {
            c.now = signed_at + Duration::from_secs(31 * 86400);
        },
    ));
    out.push(with(
        "action_hash_mismatch_fail",
        "The entry is read under another action's hash (same size).",
        Some("action_digest_mismatch"),
        &|c| {
            c.action_digest.hash = hex::encode(Sha256::digest(b"another action"));
        },
    ));
    out.push(with(
        "action_size_mismatch_fail",
        "The entry is read under the same hash with another size.",
        Some("action_digest_mismatch"),
        &|c| {
            c.action_digest.size_bytes += 1;
        },
    ));
    out.push(with(
        "instance_mismatch_fail",
        "The entry, signed for instance main, is read in instance dev/alice.",
        Some("instance_mismatch"),
        &|c| {
            c.instance = "dev/alice".into();
        },
    ));
    out.push(with(
        "digest_function_mismatch_fail",
        "The entry, signed for SHA-256, is read as BLAKE3 with the same hash.",
        Some("digest_function_mismatch"),
        &|c| {
            c.digest_function = reapi::digest_function::Value::Blake3;
        },
    ));
    out.push(with(
        "result_byte_flipped_fail",
        "One byte of the stored result (a letter of the output path) was flipped.",
        Some("result_mismatch"),
        &|c| {
            let at = c.canonical.windows(9).position(|w| w == b"bazel-out").expect("path in result");
            c.canonical[at] ^= 0x20;
            let mut tampered = ActionResult::decode(c.canonical.as_slice()).expect("still decodes");
            signing::attach_envelope_bytes(&mut tampered, envelope.clone());
            c.served = tampered;
        },
    ));
    out.push(with(
        "writer_revoked_fail",
        "The writer's principal is inside a revoked-writer window at signed_at.",
        Some("writer_revoked"),
        &|c| {
            c.policy.extra = format!(
                "\n[[revoked_writers]]\nprincipal = \"{PRINCIPAL}\"\n\
             from = \"2026-09-15T00:00:00Z\"\nto = \"2026-09-16T00:00:00Z\"\n\
             reason = \"TEST-ONLY runner compromised\"\n"
            );
        },
    ));
    out.push(with(
        "non_canonical_signature_fail",
        "The signature's S was replaced by S + L: a malleated, non-canonical signature that verify_strict refuses.",
        Some("bad_signature"),
        &|c| {
            let mut env = world.key.sign(&statement);
            env.signatures[0].sig = malleate(&env.signatures[0].sig).into();
            c.envelopes = vec![env.encode_to_vec()];
            c.served = served_with(&world.result, &c.envelopes);
        },
    ));
    out.push(with(
        "payload_tampered_fail",
        "One byte of the signed payload was changed after signing.",
        Some("bad_signature"),
        &|c| {
            let mut env = world.key.sign(&statement);
            let mut payload = env.payload.to_vec();
            let at = payload.windows(4).position(|w| w == b"main").expect("instance in payload");
            payload[at] = b'M';
            env.payload = payload.into();
            c.envelopes = vec![env.encode_to_vec()];
            c.served = served_with(&world.result, &c.envelopes);
        },
    ));
    out.push(with(
        "key_not_for_instance_fail",
        "Signed by a key the policy scopes to dev/* only, for instance main.",
        Some("key_not_for_instance"),
        &|c| {
            c.policy.instances = "[\"dev/*\"]";
        },
    ));
    out.push(with(
        "before_cutoff_fail",
        "Signed before the policy's poisoning cut-off not_before.",
        Some("before_cutoff"),
        &|c| {
            c.policy.not_before = Some("2026-09-16T00:00:00Z");
        },
    ));
    out.push(with("quarantined_fail", "The action is quarantined in this instance.", Some("quarantined"), &|c| {
        c.policy.extra = format!(
            "\n[[quarantined_actions]]\ninstance = \"{INSTANCE}\"\naction_digest = \"{}/{}\"\n",
            world.action_digest.hash, world.action_digest.size_bytes
        );
    }));
    out.push(with(
        "key_id_mismatch_fail",
        "The signed statement names another key id than the key that verified it.",
        Some("key_id_mismatch"),
        &|c| {
            let mut s = statement.clone();
            s.key_id = signing::key_id(&world.other_public);
            c.envelopes = vec![resigned(&s)];
            c.served = served_with(&world.result, &c.envelopes);
        },
    ));
    out.push(with(
        "wrong_statement_type_fail",
        "A validly signed statement of another type.",
        Some("wrong_statement_type"),
        &|c| {
            let mut s = statement.clone();
            s.statement_type = "provcache/action-result/v0".into();
            c.envelopes = vec![resigned(&s)];
            c.served = served_with(&world.result, &c.envelopes);
        },
    ));
    out.push(with(
        "undecodable_statement_fail",
        "A validly signed payload that is not a statement.",
        Some("undecodable_statement"),
        &|c| {
            c.envelopes = vec![world.sign_raw(signing::PAYLOAD_TYPE, vec![0xff; 16]).encode_to_vec()];
            c.served = served_with(&world.result, &c.envelopes);
        },
    ));
    out.insert(0, valid);
    out
}

impl Case {
    fn files(&self, world: &World, out: &mut BTreeMap<String, Vec<u8>>) {
        let dir = self.name;
        let envelope_names: Vec<String> = (0..self.envelopes.len())
            .map(|i| if i == 0 { "envelope.binpb".into() } else { format!("envelope.{}.binpb", i + 1) })
            .collect();
        for (name, bytes) in envelope_names.iter().zip(&self.envelopes) {
            out.insert(format!("{dir}/{name}"), bytes.clone());
        }
        out.insert(format!("{dir}/canonical.binpb"), self.canonical.clone());
        out.insert(format!("{dir}/result.binpb"), self.served.encode_to_vec());
        out.insert(format!("{dir}/policy.toml"), self.policy.render(dir, world).into_bytes());

        let outcome = if self.reason.is_some() { "fail" } else { "ok" };
        let reason_line = match self.reason {
            Some(r) => format!("reason = \"{r}\"\n"),
            None => format!("key_name = \"{KEY_NAME}\"\n"),
        };
        let list = envelope_names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
        let expected = format!(
            "# TEST-ONLY golden vector `{dir}`: what the verifier is asked, and what it must answer.\n\
             instance = \"{}\"\n\
             digest_function = \"{}\"\n\
             action_digest = \"{}/{}\"\n\
             now = \"{}\"\n\
             envelopes = [{list}]\n\
             outcome = \"{outcome}\"\n\
             {reason_line}",
            self.instance,
            self.digest_function.as_str_name(),
            self.action_digest.hash,
            self.action_digest.size_bytes,
            fmt_time(self.now),
        );
        out.insert(format!("{dir}/expected.toml"), expected.into_bytes());

        let verdict = match self.reason {
            Some(r) => format!("**Expected: FAIL**, reason `{r}`."),
            None => format!("**Expected: OK**, verified by key `{KEY_NAME}`."),
        };
        let readme = format!(
            "# Golden vector `{dir}` (TEST-ONLY)\n\n{}\n\n{verdict}\n\n\
             Both verifiers must give this answer: `verify_stored` on `envelope*.binpb` + `canonical.binpb`,\n\
             and `verify_served` on `result.binpb`, with `policy.toml` and the request and clock in\n\
             `expected.toml`. Generated by `tests/vectors/generate.rs`; see `../README.md`.\n",
            self.summary
        );
        out.insert(format!("{dir}/README.md"), readme.into_bytes());
    }
}

/// Every vector file, by path relative to tests/vectors/.
pub fn generate() -> BTreeMap<String, Vec<u8>> {
    let world = World::new();
    let mut out = BTreeMap::new();
    out.insert(KEY_FILE.to_string(), world.key.to_pkcs8_pem().expect("pem").as_bytes().to_vec());
    for case in cases(&world) {
        case.files(&world, &mut out);
    }
    out
}
