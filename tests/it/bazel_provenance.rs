//! Signed provenance with a real Bazel client (docs/threat-model.md R13, T8):
//! a CI writer fills the cache, a developer's read-only build gets every hit,
//! and after one stored Action Cache value is altered at rest the developer's
//! next build rebuilds exactly that action and still succeeds.

use std::path::Path;

use prost::Message;
use provcache::proto::prov::storage::StoredActionEntry;
use provcache::proto::reapi;
use provcache::store::rocks::{Key, RocksStore};

use crate::bazel::{assert_all_hits, assert_cold, assert_no_server_errors, assert_same_outputs, BazelWorkspace};
use crate::common::ServerProcess;

const READ_ONLY: &str = "--remote_upload_local_results=false";

/// With the server stopped, opens its RocksDB store and flips one bit of the
/// canonical result of the one entry whose output file is `output` (in the
/// output's path, so every blob it references stays present and only the
/// signature check can notice). Returns the altered action's digest as the
/// server prints it (`hash/size`).
fn alter_entry_with_output(data_dir: &Path, output: &str) -> String {
    let store = RocksStore::open(&provcache::server::db_path(data_dir), &Default::default()).unwrap();
    let suffix = format!("/{output}");
    let mut found = Vec::new();
    for item in store.ac_entries() {
        let (key, value) = item.unwrap();
        let entry = StoredActionEntry::decode(&value[..]).unwrap();
        let result = reapi::ActionResult::decode(entry.canonical_result.clone()).unwrap();
        if result.output_files.iter().any(|f| f.path.ends_with(&suffix)) {
            found.push((key, entry));
        }
    }
    assert_eq!(found.len(), 1, "expected one Action Cache entry with an output {output}");
    let (key, mut entry) = found.remove(0);
    let mut canonical = entry.canonical_result.to_vec();
    let at = canonical.windows(suffix.len()).position(|w| w == suffix.as_bytes()).unwrap() + 1;
    canonical[at] ^= 1;
    entry.canonical_result = canonical.into();
    store.ac_put_raw(&key, &entry.encode_to_vec()).unwrap();
    store.flush().unwrap();
    let (_, action) = Key::decode(&key).unwrap();
    action.to_string()
}

#[test]
#[ignore = "needs Bazel: run tests/setup.sh, then cargo test --release -- --include-ignored"]
fn bazel_reader_rebuilds_exactly_the_action_whose_entry_was_altered_at_rest() {
    let mut server = ServerProcess::start_plaintext();
    let mut ws = BazelWorkspace::new();

    // A CI writer fills the cache; a developer's fresh checkout, read-only,
    // gets every action from it.
    let writer = ws.build(&[&server.remote_cache_flag()]);
    assert_cold(&ws, &writer);
    ws.fresh_output_base();
    let reader = ws.build(&[&server.remote_cache_flag(), READ_ONLY]);
    assert_all_hits(&ws, &reader);
    assert_same_outputs(&writer, &reader);

    // Someone with write access to the RocksDB files alters one entry while
    // the server is down.
    ws.shutdown();
    server.stop();
    let altered = alter_entry_with_output(server.data_dir(), "one.txt");
    server.spawn();

    // The next read-only build rebuilds exactly that action, and succeeds.
    ws.fresh_output_base();
    let after = ws.build(&[&server.remote_cache_flag(), READ_ONLY]);
    let total = ws.action_count();
    assert_eq!(after.hits(), (total - 1, total), "exactly the altered action is rebuilt");
    let rebuilt: Vec<_> = after.spawns.iter().filter(|s| !s.remote_cache_hit).collect();
    assert!(rebuilt[0].listed_outputs.iter().any(|p| p.ends_with("/one.txt")), "{:?}", rebuilt[0]);
    assert_same_outputs(&writer, &after);
    let misses: Vec<_> =
        after.run.grpc_calls().into_iter().filter(|c| c.method() == "GetActionResult" && c.code() != 0).collect();
    assert_eq!(misses.len(), 1, "{misses:?}");
    assert_eq!(misses[0].code(), 5, "a miss is NOT_FOUND: {:?}", misses[0]);
    assert_eq!(misses[0].metadata.as_ref().map(|m| m.target_id.as_str()), Some("//:one"), "{:?}", misses[0]);
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("failed verification") && l.contains(&altered) && l.contains("result_mismatch")),
        "the server logs why {altered} is a miss:\n{log}"
    );

    // The writer's next build repairs the entry with a freshly signed one;
    // then the developer gets every hit again.
    ws.fresh_output_base();
    let repair = ws.build(&[&server.remote_cache_flag()]);
    assert_eq!(repair.hits(), (total - 1, total));
    assert_eq!(repair.call_counts().get("UpdateActionResult"), Some(&1));
    ws.fresh_output_base();
    let repaired = ws.build(&[&server.remote_cache_flag(), READ_ONLY]);
    assert_all_hits(&ws, &repaired);
    assert_same_outputs(&writer, &repaired);

    ws.shutdown();
    assert_no_server_errors(&server);
    server.stop();
}
