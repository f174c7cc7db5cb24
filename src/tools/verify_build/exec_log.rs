//! Bazel's `--execution_log_json_file`: the remote cache hits a build says
//! it used, compared with what the server's hit log and signed results say.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;

use crate::proto::reapi;

/// Output path → (hash, size).
pub type Outputs = BTreeMap<String, (String, i64)>;

/// A remote cache hit as Bazel's execution log shows it.
#[derive(Debug, Clone)]
pub struct LoggedHit {
    /// The output files the build took from the cache.
    pub outputs: Outputs,
    /// The spawn's action digest (newer Bazel logs only; Bazel 4 has none).
    pub action_digest: Option<reapi::Digest>,
}

fn size_of(v: &serde_json::Value) -> Option<i64> {
    v.get("sizeBytes").and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
}

/// The remote cache hits of a JSON execution log (a stream of JSON objects).
pub fn parse(path: &Path) -> anyhow::Result<Vec<LoggedHit>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--exec-log {}: cannot read it", path.display()))?;
    let mut hits = Vec::new();
    for value in serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>() {
        let value = value.with_context(|| format!("{} is not a Bazel JSON execution log", path.display()))?;
        if value.get("remoteCacheHit").and_then(|v| v.as_bool()) != Some(true) {
            continue;
        }
        let mut outputs = BTreeMap::new();
        for o in value.get("actualOutputs").and_then(|v| v.as_array()).into_iter().flatten() {
            let (Some(p), Some(d)) = (o.get("path").and_then(|v| v.as_str()), o.get("digest")) else { continue };
            let hash = d.get("hash").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            outputs.insert(p.to_string(), (hash, size_of(d).unwrap_or(0)));
        }
        let action_digest = value
            .get("digest")
            .and_then(|d| Some(reapi::Digest { hash: d.get("hash")?.as_str()?.to_string(), size_bytes: size_of(d)? }));
        hits.push(LoggedHit { outputs, action_digest });
    }
    Ok(hits)
}

/// The output files a result declares, by path (files inside output
/// directories are not listed by Bazel's execution log either).
pub fn result_outputs(result: &reapi::ActionResult) -> Outputs {
    result
        .output_files
        .iter()
        .filter_map(|f| f.digest.as_ref().map(|d| (f.path.clone(), (d.hash.clone(), d.size_bytes))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_remote_cache_hits_are_kept_with_their_digests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exec.json");
        std::fs::write(
            &path,
            r#"{"remoteCacheHit": true, "digest": {"hash": "ab", "sizeBytes": "12"},
                "actualOutputs": [{"path": "out/a", "digest": {"hash": "cd", "sizeBytes": 3}}]}
               {"remoteCacheHit": false, "actualOutputs": []}
               {"remoteCacheHit": true, "actualOutputs": []}"#,
        )
        .unwrap();
        let hits = parse(&path).unwrap();
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].action_digest, Some(reapi::Digest { hash: "ab".into(), size_bytes: 12 }));
        assert_eq!(hits[0].outputs["out/a"], ("cd".to_string(), 3));
        assert_eq!(hits[1].action_digest, None);
        std::fs::write(&path, "not json").unwrap();
        assert!(parse(&path).unwrap_err().to_string().contains("not a Bazel JSON execution log"));
    }
}
