//! Reloading configuration files without a restart: the authorization
//! policy, the TLS server certificate and key, the client CAs and CRLs, the
//! signing key and the trust policy (docs/operations.md, "Reloading").
//!
//! One behaviour for all of them, so an operator learns it once:
//! - the files' (size, mtime) are polled, and SIGHUP ([`hangup`]) reloads
//!   everything at once, changed or not;
//! - a file that does not load (unreadable, malformed, a key that does not
//!   match its certificate) leaves the last good value in force; the refusal
//!   is logged at WARN, once per version of the file, and counted;
//! - every outcome is counted in `provcache_reloads_total{what, result}`
//!   ([`counts`]).
//!
//! A [`Watched`] value is what a reader asks for on each use, so a new value
//! takes effect for the next call or handshake; what already began keeps
//! the value it started with.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

/// How often the authorization policy, the signing key and the trust policy
/// are polled (the TLS files use `crl_reload_interval`).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The identity of a set of files at one moment: for each file (the files of
/// a directory included) its size and mtime, `None` when it cannot be read.
pub type Stamp = Vec<(PathBuf, Option<(u64, Option<SystemTime>)>)>;

/// Takes the [`Stamp`] of `paths`; a directory stands for the files in it.
pub fn stamp(paths: &[PathBuf]) -> Stamp {
    let mut out = Vec::new();
    for path in paths {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                // Hidden files are the temporary files of atomic replacements.
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.')))
                    .collect();
                files.sort();
                out.extend(files.into_iter().map(|f| file_stamp(&f)));
            }
            Err(_) => out.push(file_stamp(path)),
        }
    }
    out
}

fn file_stamp(path: &Path) -> (PathBuf, Option<(u64, Option<SystemTime>)>) {
    let meta = std::fs::metadata(path).ok();
    (path.to_owned(), meta.map(|m| (m.len(), m.modified().ok())))
}

/// Where a reloadable value comes from and how it is loaded.
pub trait Source: Send + Sync + 'static {
    /// What is loaded.
    type Value: Send + Sync + 'static;
    /// Why loading failed; names the file.
    type Error: fmt::Display;
    /// The `what` label of the reload metric and logs (`authz_policy`, ...).
    const WHAT: &'static str;

    /// The files (or directories) whose changes trigger a reload.
    fn paths(&self) -> Vec<PathBuf>;

    /// Reads and validates the files.
    fn load(&self) -> Result<Self::Value, Self::Error>;

    /// Called each time a value is installed, at start and after every
    /// successful reload: the one place to log or measure what is now in
    /// force (a certificate's expiry, say).
    fn installed(&self, _value: &Self::Value) {}
}

struct State<S: Source> {
    source: Arc<S>,
    value: Arc<S::Value>,
    /// The stamp of the files the value was loaded from.
    stamp: Stamp,
    /// The stamp of the files last refused, so a bad file is reported once.
    refused: Option<Stamp>,
}

/// A value loaded from files and replaced when they change; a load that
/// fails keeps the last good value.
pub struct Watched<S: Source> {
    state: RwLock<State<S>>,
    generation: AtomicU64,
}

impl<S: Source> fmt::Debug for Watched<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paths = self.source().paths();
        f.debug_struct("Watched").field("what", &S::WHAT).field("paths", &paths).finish_non_exhaustive()
    }
}

impl<S: Source> Watched<S> {
    /// Loads `source`; at start a file that does not load is an error.
    pub fn load(source: S) -> Result<Arc<Self>, S::Error> {
        let stamp = stamp(&source.paths());
        let value = source.load()?;
        Ok(Self::with_value(source, value, stamp))
    }

    /// Starts from a value already loaded from `source` when its files had
    /// `stamp` (taken before reading, so a change during the read is seen).
    pub fn with_value(source: S, value: S::Value, stamp: Stamp) -> Arc<Self> {
        register(S::WHAT);
        source.installed(&value);
        let state = State { source: Arc::new(source), value: Arc::new(value), stamp, refused: None };
        Arc::new(Watched { state: RwLock::new(state), generation: AtomicU64::new(0) })
    }

    /// The value in force.
    pub fn get(&self) -> Arc<S::Value> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).value.clone()
    }

    /// Where the value comes from.
    pub fn source(&self) -> Arc<S> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).source.clone()
    }

    /// Increments each time a new value is installed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-reads the files if they changed (always, with `force`). Returns
    /// whether a new value was installed; on error the last good value stays
    /// in force, and the refusal is logged and counted (once per version of
    /// the files unless forced).
    pub fn reload(&self, force: bool) -> Result<bool, S::Error> {
        let (source, old_stamp, refused) = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            (s.source.clone(), s.stamp.clone(), s.refused.clone())
        };
        let now = stamp(&source.paths());
        if !force && now == old_stamp {
            return Ok(false);
        }
        match source.load() {
            Ok(value) => {
                self.install(source, value, now);
                Ok(true)
            }
            Err(e) => {
                if force || refused.as_ref() != Some(&now) {
                    record(S::WHAT, false);
                    tracing::warn!(what = S::WHAT, error = %e, "not reloaded: keeping the last good one");
                    self.state.write().unwrap_or_else(|p| p.into_inner()).refused = Some(now);
                }
                Err(e)
            }
        }
    }

    /// Points the value at another source (new file names): loads it, and
    /// installs it only if it loads; otherwise nothing changes.
    pub fn switch(&self, source: S) -> Result<(), S::Error> {
        let now = stamp(&source.paths());
        match source.load() {
            Ok(value) => {
                self.install(Arc::new(source), value, now);
                Ok(())
            }
            Err(e) => {
                record(S::WHAT, false);
                tracing::warn!(what = S::WHAT, error = %e, "not switched to new files: keeping the current ones");
                Err(e)
            }
        }
    }

    fn install(&self, source: Arc<S>, value: S::Value, stamp: Stamp) {
        source.installed(&value);
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        *s = State { source, value: Arc::new(value), stamp, refused: None };
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        drop(s);
        record(S::WHAT, true);
        tracing::info!(what = S::WHAT, generation, "reloaded");
    }
}

/// Something [`spawn_poller`] reloads.
pub trait Reload: Send + Sync + 'static {
    /// Reloads if changed (always, with `force`); logs and counts the outcome.
    fn reload_now(&self, force: bool);
}

impl<S: Source> Reload for Watched<S> {
    fn reload_now(&self, force: bool) {
        // The outcome is logged and counted by `reload`.
        let _ = self.reload(force);
    }
}

/// SIGHUPs seen so far, and the condition the pollers wait on.
static HANGUPS: (Mutex<u64>, Condvar) = (Mutex::new(0), Condvar::new());

/// Asks every poller to reload at once, whether its files changed or not
/// (what SIGHUP does).
pub fn hangup() {
    let (count, wake) = &HANGUPS;
    *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    wake.notify_all();
}

/// Waits for `interval` (forever if zero) or a [`hangup`] after `seen`;
/// returns whether a hangup ended the wait.
fn wait(interval: Duration, seen: &mut u64) -> bool {
    let (count, wake) = &HANGUPS;
    let guard = count.lock().unwrap_or_else(|p| p.into_inner());
    let guard = if interval.is_zero() {
        wake.wait_while(guard, |c| *c == *seen).unwrap_or_else(|p| p.into_inner())
    } else {
        wake.wait_timeout_while(guard, interval, |c| *c == *seen).unwrap_or_else(|p| p.into_inner()).0
    };
    let hung_up = *guard != *seen;
    *seen = *guard;
    hung_up
}

/// Starts a thread that reloads `target` every `interval` (zero: only on
/// SIGHUP) and at once on each [`hangup`]. It ends once `target` is dropped.
pub fn spawn_poller<R: Reload>(target: &Arc<R>, interval: Duration) {
    let weak: Weak<R> = Arc::downgrade(target);
    let mut seen = *HANGUPS.0.lock().unwrap_or_else(|p| p.into_inner());
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || loop {
            let forced = wait(interval, &mut seen);
            let Some(target) = weak.upgrade() else { return };
            target.reload_now(forced);
        })
        .expect("spawning a reload thread");
}

/// Turns each SIGHUP into a [`hangup`], from now until the process ends.
/// Call it inside a Tokio runtime; without one (or off Unix) it does nothing.
pub fn reload_on_sighup() {
    #[cfg(unix)]
    if tokio::runtime::Handle::try_current().is_ok() {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the policy, TLS and signing files");
                        hangup();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot install the SIGHUP handler: reloads only by polling"),
        }
    }
}

/// Reload outcomes: `what` → (ok, refused). Process-wide, as the signals
/// that trigger reloads are.
static COUNTS: Mutex<BTreeMap<&'static str, (u64, u64)>> = Mutex::new(BTreeMap::new());

/// Makes `what` appear in the metrics (at zero) before its first reload.
pub fn register(what: &'static str) {
    COUNTS.lock().unwrap_or_else(|p| p.into_inner()).entry(what).or_default();
}

/// Counts one reload of `what`: installed (`ok`) or refused.
pub fn record(what: &'static str, ok: bool) {
    let mut counts = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    let (good, bad) = counts.entry(what).or_default();
    *(if ok { good } else { bad }) += 1;
}

/// Every (what, reloads installed, reloads refused), for the metrics.
pub fn counts() -> Vec<(&'static str, u64, u64)> {
    COUNTS.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(w, (ok, bad))| (*w, *ok, *bad)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A number in a file; "bad" does not parse.
    struct Number(PathBuf);

    impl Source for Number {
        type Value = u64;
        type Error = String;
        const WHAT: &'static str = "test_number";
        fn paths(&self) -> Vec<PathBuf> {
            vec![self.0.clone()]
        }
        fn load(&self) -> Result<u64, String> {
            let text = std::fs::read_to_string(&self.0).map_err(|e| e.to_string())?;
            text.trim().parse().map_err(|e| format!("{}: {e}", self.0.display()))
        }
    }

    fn refused() -> u64 {
        counts().into_iter().find(|(w, ..)| *w == "test_number").map(|(_, _, bad)| bad).unwrap()
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_bad_one_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let watched = Watched::load(Number(path.clone())).unwrap();
        assert_eq!((*watched.get(), watched.generation()), (1, 0));
        assert!(!watched.reload(false).unwrap(), "unchanged: nothing to do");

        std::fs::write(&path, "22").unwrap();
        assert!(watched.reload(false).unwrap());
        assert_eq!((*watched.get(), watched.generation()), (22, 1));

        let before = refused();
        std::fs::write(&path, "bad").unwrap();
        assert!(watched.reload(false).is_err());
        assert!(watched.reload(false).is_err(), "still bad");
        assert_eq!((*watched.get(), watched.generation()), (22, 1), "the last good value stays");
        assert_eq!(refused(), before + 1, "one version of a bad file is counted once");
        assert!(watched.reload(true).is_err());
        assert_eq!(refused(), before + 2, "a forced reload is counted again");

        let other = dir.path().join("m");
        std::fs::write(&other, "bad").unwrap();
        assert!(watched.switch(Number(other.clone())).is_err());
        assert_eq!(watched.source().0, path, "a bad new file is not switched to");
        std::fs::write(&other, "333").unwrap();
        watched.switch(Number(other.clone())).unwrap();
        assert_eq!((*watched.get(), watched.source().0.clone()), (333, other));
    }

    #[test]
    fn a_hangup_wakes_a_poller_that_would_otherwise_wait_forever() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let watched = Watched::load(Number(path.clone())).unwrap();
        spawn_poller(&watched, Duration::ZERO);
        std::fs::write(&path, "2").unwrap();
        hangup();
        for _ in 0..1000 {
            if *watched.get() == 2 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the hangup did not reload");
    }

    #[test]
    fn a_directory_stamp_changes_when_a_file_is_added() {
        let dir = tempfile::tempdir().unwrap();
        let before = stamp(&[dir.path().to_owned()]);
        std::fs::write(dir.path().join("a.crl"), "x").unwrap();
        assert_ne!(stamp(&[dir.path().to_owned()]), before);
    }
}
