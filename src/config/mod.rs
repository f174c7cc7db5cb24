//! Configuration of `provcache serve`, in two steps.
//!
//! 1. [`resolve`] layers the raw settings — flags and `PROVCACHE_*`
//!    variables over the configuration file over the defaults — into the
//!    complete [`Settings`] (what `--check-config` prints).
//! 2. [`Plan::new`] makes every decision those settings imply, once:
//!    plaintext or mutual TLS, own or development PKI, the identity mode,
//!    the authorization policy, where signing keys come from, storage and
//!    limits. `serve` starts the server from the plan and `--check-config`
//!    validates and describes the same plan, so the two cannot disagree.

#[cfg(feature = "server")]
mod access;
#[cfg(feature = "server")]
mod checks;
mod listen;
#[cfg(feature = "server")]
mod plan;
mod settings;

#[cfg(feature = "server")]
pub use access::{load_policy, tls_server};
#[cfg(feature = "server")]
pub use checks::readable_file;
#[cfg(feature = "server")]
pub use plan::{Access, Pki, Plan, ProvenancePlan, Signing, Storage};
pub(crate) use settings::{de_duration, de_size, ser_duration};
pub use settings::{
    resolve, ConfigError, IdentityArg, LogFormat, ServeConfig, Settings, StorageConfig, VerifyModeArg,
    DEFAULT_BLOCK_CACHE,
};

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::PathBuf;
    use std::time::Duration;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeConfig,
    }

    fn flags(args: &[&str]) -> ServeConfig {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).unwrap().serve
    }

    fn file(text: &str) -> ServeConfig {
        ServeConfig::from_toml(text, "test.toml").unwrap()
    }

    #[test]
    fn defaults_are_those_of_the_flags() {
        let s = resolve(ServeConfig::default(), None, None).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("provcache-data"));
        assert_eq!(s.listen, "127.0.0.1:8980".parse().unwrap());
        assert_eq!(s.crl_reload_interval, Duration::from_secs(2));
        assert_eq!(s.identity, IdentityArg::UriSan);
        assert_eq!(s.verify_mode, VerifyModeArg::Reject);
        assert_eq!(s.server_id, "provcache");
        assert_eq!(s.history_retention, Duration::from_secs(30 * 86400));
        assert!(!s.plaintext_insecure);
        assert_eq!(s.plaintext_principal, "plaintext");
        assert_eq!((s.max_size, s.metrics_listen), (None, None));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(30));
        assert_eq!((s.log_format, s.log_level.as_str()), (LogFormat::Text, "info"));
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let f = file("max_size = \"64MiB\"\nserver_id = \"from-file\"\nshutdown_timeout = \"5s\"\n");
        let s = resolve(flags(&["--max-size", "1GiB"]), None, Some(f)).unwrap();
        assert_eq!(s.max_size, Some(1 << 30), "the flag wins");
        assert_eq!(s.server_id, "from-file", "the file wins over the default");
        assert_eq!(s.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(s.listen, "127.0.0.1:8980".parse().unwrap(), "the default where nobody says");

        // A list on the command line replaces the file's list.
        let f = file("trust_domain = [\"a.example\", \"b.example\"]\n");
        let s = resolve(flags(&["--trust-domain", "c.example"]), None, Some(f.clone())).unwrap();
        assert_eq!(s.trust_domain, ["c.example"]);
        assert_eq!(resolve(flags(&[]), None, Some(f)).unwrap().trust_domain, ["a.example", "b.example"]);

        // Boolean flags: present means true, and =false overrides the file.
        let f = file("plaintext_insecure = true\n");
        assert!(resolve(flags(&[]), None, Some(f.clone())).unwrap().plaintext_insecure);
        assert!(!resolve(flags(&["--plaintext-insecure=false"]), None, Some(f)).unwrap().plaintext_insecure);
        assert!(resolve(flags(&["--plaintext-insecure"]), None, None).unwrap().plaintext_insecure);
    }

    /// The only test that touches these variables (the environment is
    /// process-wide; no other test looks at these two settings through clap).
    #[test]
    fn environment_sits_between_flags_and_file() {
        std::env::set_var("PROVCACHE_MAX_SIZE", "2MiB");
        std::env::set_var("PROVCACHE_METRICS_LISTEN", "127.0.0.1:9001");
        let f = file("max_size = \"1000B\"\nmetrics_listen = \"127.0.0.1:9002\"\n");
        let s = resolve(flags(&["--max-size", "3MiB"]), None, Some(f.clone())).unwrap();
        let t = resolve(flags(&[]), None, Some(f)).unwrap();
        std::env::remove_var("PROVCACHE_MAX_SIZE");
        std::env::remove_var("PROVCACHE_METRICS_LISTEN");
        assert_eq!(s.max_size, Some(3 << 20), "the flag wins over the environment");
        assert_eq!(t.max_size, Some(2 << 20), "the environment wins over the file");
        assert_eq!(t.metrics_listen, Some("127.0.0.1:9001".parse().unwrap()));
    }

    #[test]
    fn log_level_flag_then_rust_log_then_file() {
        let f = || Some(file("log_level = \"warn\"\n"));
        assert_eq!(resolve(flags(&["--log-level", "debug"]), Some("error".into()), f()).unwrap().log_level, "debug");
        assert_eq!(resolve(flags(&[]), Some("error".into()), f()).unwrap().log_level, "error");
        assert_eq!(resolve(flags(&[]), None, f()).unwrap().log_level, "warn");
        assert!(resolve(flags(&["--log-level", "info,=[bad"]), None, None).is_err());
    }

    #[test]
    fn unknown_key_is_named_with_file_and_line() {
        let err = ServeConfig::from_toml("listen = \"127.0.0.1:1\"\nmax_sise = \"1GiB\"\n", "cache.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `max_sise`"), "{msg}");
        assert!(msg.contains("cache.toml"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn sizes_and_durations_take_units() {
        let f = file("max_size = \"64MiB\"\nhistory_retention = \"7d\"\ncrl_reload_interval = \"500ms\"\n");
        assert_eq!(f.max_size, Some(64 << 20));
        assert_eq!(f.history_retention, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(f.crl_reload_interval, Some(Duration::from_millis(500)));
        assert_eq!(file("max_size = \"4096B\"\n").max_size, Some(4096));
        assert_eq!(file("max_size = \"1.5tib\"\n").max_size, Some(3 << 39));
        let msg = ServeConfig::from_toml("max_size = 200\n", "f").unwrap_err().to_string();
        assert!(msg.contains("add a unit, e.g. 200GiB"), "a bare number is refused: {msg}");
        assert_eq!(file("max_size = 67108864\n").max_size, Some(64 << 20), "as --check-config prints it");
        let err = Cli::try_parse_from(["serve", "--max-size", "200"]).unwrap_err().to_string();
        assert!(err.contains("add a unit, e.g. 200GiB"), "the flag too: {err}");
        let msg = ServeConfig::from_toml("max_size = \"12 parsecs\"\n", "f").unwrap_err().to_string();
        assert!(msg.contains("parsecs"), "{msg}");
        let msg = ServeConfig::from_toml("shutdown_timeout = \"soon\"\n", "f").unwrap_err().to_string();
        assert!(msg.contains("soon"), "{msg}");
    }

    #[test]
    fn settings_that_go_together_are_checked() {
        for (text, needle) in [
            ("tls_cert = \"c.pem\"\n", "go together"),
            ("signing_key = \"k.pem\"\n", "trust_policy"),
            ("trust_policy = \"t.toml\"\n", "signing_key"),
            ("plaintext_principal = \"p\"\n", "plaintext_insecure"),
        ] {
            let msg = resolve(flags(&[]), None, Some(file(text))).unwrap_err().to_string();
            assert!(msg.contains(needle), "{text}: {msg}");
        }
    }

    #[test]
    fn the_printed_settings_are_a_valid_file_with_the_same_meaning() {
        let f = file("max_size = \"64MiB\"\nplaintext_insecure = true\nhistory_retention = \"7d\"\n");
        let s = resolve(ServeConfig::default(), None, Some(f)).unwrap();
        let again = resolve(ServeConfig::default(), None, Some(file(&s.to_toml()))).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn the_store_flag_wins_over_the_file_and_the_storage_table_is_printed_as_given() {
        let f = file(
            "plaintext_insecure = true\nstore = \"s3://from-file\"\n[storage]\nregion = \"eu-1\"\nac_ttl = \"2s\"\n",
        );
        let s = resolve(flags(&["--store", "s3://from-flag/p"]), None, Some(f.clone())).unwrap();
        assert_eq!(s.store.as_deref(), Some("s3://from-flag/p"));
        assert_eq!(s.storage.ac_ttl, Some(Duration::from_secs(2)));
        let text = s.to_toml();
        assert!(text.contains("[storage]\nregion = \"eu-1\"\nac_ttl = \"2s\"\n"), "{text}");
        let again = resolve(ServeConfig::default(), None, Some(file(&text))).unwrap();
        assert_eq!(again, s, "the printed settings mean the same");
        assert!(!resolve(flags(&[]), None, None).unwrap().to_toml().contains("store"), "no store by default");
        let msg = ServeConfig::from_toml("[storage]\nsecret_access_key = \"x\"\n", "f").unwrap_err().to_string();
        assert!(msg.contains("unknown field `secret_access_key`"), "credentials are not settings: {msg}");
    }

    #[test]
    fn the_authorization_policy_is_authz_policy_and_the_old_policy_spelling_still_works() {
        let expected = Some(PathBuf::from("authz.toml"));
        for config in [
            flags(&["--authz-policy", "authz.toml"]),
            flags(&["--policy", "authz.toml"]),
            file("authz_policy = \"authz.toml\"\n"),
            file("policy = \"authz.toml\"\n"),
        ] {
            assert_eq!(resolve(config, None, None).unwrap().policy, expected);
        }
        let s = resolve(flags(&["--authz-policy", "authz.toml"]), None, None).unwrap();
        assert!(s.to_toml().contains("authz_policy = \"authz.toml\""), "{}", s.to_toml());
    }

    /// The annotated example in docs/configuration.md parses and means what it says.
    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc.find("```toml\n").expect("a ```toml block in docs/configuration.md") + "```toml\n".len();
        let len = doc[start..].find("```").expect("the end of the block");
        let example = file(&doc[start..start + len]);
        let s = resolve(ServeConfig::default(), None, Some(example.clone())).unwrap();
        assert_eq!(s.max_size, Some(200 << 30));
        assert_eq!(s.log_format, LogFormat::Json);
        // Every key is in the example: nothing left at None or empty.
        let text = s.to_toml();
        for key in text.lines().filter_map(|l| l.split_once(" = ").map(|(k, _)| k)) {
            assert!(doc.contains(&format!("{key} = ")), "{key} is missing from the example");
        }
        for field in [
            "tls_cert",
            "tls_key",
            "client_ca",
            "crl",
            "authz_policy",
            "trust_domain",
            "signing_key",
            "trust_policy",
            "max_size",
            "metrics_listen",
        ] {
            assert!(text.contains(&format!("{field} = ")), "{field} is not set in the example");
        }
    }
}
