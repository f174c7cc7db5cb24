//! Refusals of [`super::Plan::new`] that need the files a configuration
//! names: a signing key that its own trust policy would not trust, a data
//! directory the server could not write. Both used to pass `--check-config`
//! or start a SERVING server that missed on every read or failed every write.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::provenance::signing::SigningKey;
use crate::provenance::trust::{KeyState, TrustPolicy};

/// Loads the operator's signing key and trust policy and, unless signing is
/// off, refuses a key that is not an active key of that policy, valid now:
/// every entry it signed would be unverifiable, so every read a miss.
/// Returns the key's id.
pub(super) fn own_signing(key: &Path, trust_policy: &Path, signing_disabled: bool) -> anyhow::Result<String> {
    let signing = SigningKey::load(key).context("signing_key (--signing-key)")?;
    let policy = TrustPolicy::load(trust_policy).context("trust_policy (--trust-policy)")?;
    let id = signing.key_id();
    let problem = match policy.key_by_id(id) {
        _ if signing_disabled => None,
        None => Some("is not in".to_owned()),
        Some(k) if k.state != KeyState::Active => Some(format!("is in state {:?} (not active) in", k.state)),
        Some(k) if !k.in_window(SystemTime::now()) => Some("is outside its valid_from..valid_until window in".into()),
        Some(_) => None,
    };
    match problem {
        Some(problem) => anyhow::bail!(
            "signing_key (--signing-key) {} (key id {id}) {problem} the trust policy {} (--trust-policy): \
             every entry it signs would fail verification; add it as an active [[keys]] entry \
             (provcache keygen prints one) or use the policy's key",
            key.display(),
            trust_policy.display()
        ),
        None => Ok(id.to_owned()),
    }
}

/// Refuses a file that cannot be opened for reading, naming the setting or
/// flag (`setting`), the path and the operating system's reason, so that a
/// typo never surfaces as a bare "No such file or directory".
pub fn readable_file(setting: &str, path: &Path) -> anyhow::Result<()> {
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(e) => anyhow::bail!(
            "{setting} {}: cannot read it: {e}; check the path and that the user provcache runs as may read it",
            path.display()
        ),
    }
}

/// Refuses a data directory the server could not write: the nearest existing
/// directory on its path (itself, or where it would be created) must accept
/// a new file. Probes with a file it removes at once; creates nothing else.
pub(super) fn writable_data_dir(dir: &Path) -> anyhow::Result<()> {
    let existing = dir.ancestors().find(|a| a.as_os_str().is_empty() || a.exists()).unwrap_or(dir);
    let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
    let named = || format!("data_dir (--data-dir) {}", dir.display());
    if !existing.is_dir() {
        anyhow::bail!("{}: {} is not a directory", named(), existing.display());
    }
    let probe = existing.join(format!(".provcache-write-check-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => std::fs::remove_file(&probe).with_context(|| format!("{}: removing {}", named(), probe.display())),
        Err(e) => {
            let place =
                if existing == dir { String::new() } else { format!(" (to create it in {})", existing.display()) };
            Err(anyhow::anyhow!(
                "{}: cannot write{place}: {e}; make it writable by the user provcache runs as",
                named()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::pki::ensure_dev_signing;

    #[test]
    fn a_signing_key_not_in_its_trust_policy_is_refused_naming_both_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, _) = ensure_dev_signing(&tmp.path().join("a")).unwrap();
        let (_, other_policy) = ensure_dev_signing(&tmp.path().join("b")).unwrap();
        let msg = format!("{:#}", own_signing(&key, &other_policy, false).unwrap_err());
        assert!(msg.starts_with(&format!("signing_key (--signing-key) {} (key id ", key.display())), "{msg}");
        assert!(msg.contains(&format!("is not in the trust policy {} (--trust-policy)", other_policy.display())));
        assert!(own_signing(&key, &other_policy, true).is_ok(), "with signing off the key signs nothing");
    }

    #[test]
    fn a_signing_key_that_is_only_verify_only_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, policy) = ensure_dev_signing(tmp.path()).unwrap();
        let text = std::fs::read_to_string(&policy).unwrap().replace("\"active\"", "\"verify_only\"");
        std::fs::write(&policy, text).unwrap();
        let msg = format!("{:#}", own_signing(&key, &policy, false).unwrap_err());
        assert!(msg.contains("is in state VerifyOnly (not active) in the trust policy"), "{msg}");
    }

    #[test]
    fn an_active_signing_key_of_its_policy_is_accepted_and_its_id_returned() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, policy) = ensure_dev_signing(tmp.path()).unwrap();
        let id = own_signing(&key, &policy, false).unwrap();
        assert_eq!(id, SigningKey::load(&key).unwrap().key_id());
    }

    #[test]
    fn a_missing_signing_key_is_named_with_its_flag_and_path() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, policy) = ensure_dev_signing(tmp.path()).unwrap();
        let missing = tmp.path().join("typo.key");
        let msg = format!("{:#}", own_signing(&missing, &policy, false).unwrap_err());
        assert!(msg.starts_with("signing_key (--signing-key): "), "{msg}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
    }

    #[test]
    fn a_missing_data_dir_under_a_writable_one_passes_and_is_not_created() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data").join("deeper");
        writable_data_dir(&dir).unwrap();
        writable_data_dir(tmp.path()).unwrap();
        assert!(!tmp.path().join("data").exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "the probe is removed");
    }

    #[test]
    fn a_data_dir_under_a_file_is_refused_naming_the_setting() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        let msg = format!("{:#}", writable_data_dir(&file.join("data")).unwrap_err());
        assert!(msg.starts_with("data_dir (--data-dir) "), "{msg}");
        assert!(msg.ends_with(&format!("{} is not a directory", file.display())), "{msg}");
    }

    #[cfg(unix)]
    #[test]
    fn a_read_only_data_dir_is_refused_naming_the_setting_and_path() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ro");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        let result = writable_data_dir(&dir);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if running_as_root() {
            return; // root writes a read-only directory anyway
        }
        let msg = format!("{:#}", result.unwrap_err());
        assert!(msg.starts_with(&format!("data_dir (--data-dir) {}: cannot write: ", dir.display())), "{msg}");
    }

    /// Whether the tests run as root, who may write a read-only directory.
    #[cfg(unix)]
    fn running_as_root() -> bool {
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
    }
}
