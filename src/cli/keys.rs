//! `provcache keygen` and `provcache issue-cert`: signing keys and development client certificates.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the private key (PKCS#8 v1 PEM, mode 0600; never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// The key's name in the trust policy.
    #[arg(long, default_value = "signing-key")]
    name: String,
    /// Validity of the printed trust-policy entry.
    #[arg(long, default_value = "180d", value_parser = humantime::parse_duration)]
    valid_for: std::time::Duration,
    /// State of the printed trust-policy entry: `verify_only` for a key being
    /// rotated in (step 1 of docs/signing.md's rotation: every server and
    /// auditor must trust it before any server signs with it), `active` for
    /// the first key of a new deployment.
    #[arg(long, default_value = "verify_only", value_parser = ["verify_only", "active"])]
    state: String,
}

#[derive(clap::Args, Debug)]
pub struct IssueCertArgs {
    /// Directory of the development CA (ca.pem and ca.key), e.g. provcache-data/dev-pki.
    #[arg(long, default_value = "provcache-data/dev-pki")]
    ca_dir: PathBuf,
    /// The identity: a SPIFFE ID such as spiffe://provcache.dev/ci-runner-7.
    #[arg(long)]
    principal: String,
    /// Output prefix: writes PREFIX.pem and PREFIX.key (PKCS#8 EC P-256).
    #[arg(long)]
    out: PathBuf,
    /// Validity.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    valid_for: std::time::Duration,
}

/// Writes a new signing key and prints the trust-policy entry that trusts it.
pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use provcache::provenance::trust::KeyState;
    let state = if args.state == "active" { KeyState::Active } else { KeyState::VerifyOnly };
    if args.out.exists() {
        let why =
            format!("--out {} exists already; keygen never overwrites a key: name a new file", args.out.display());
        return Err(super::Refused(why).into());
    }
    super::in_existing_dir("--out", &args.out)?;
    let key = provcache::provenance::signing::SigningKey::generate()?;
    key.write_pem(&args.out).context("--out")?;
    let now = std::time::SystemTime::now();
    let entry = provcache::provenance::trust::render_key_entry(
        &args.name,
        &key.verifying_key(),
        state,
        now,
        now + args.valid_for,
    );
    println!("wrote {}", args.out.display());
    println!("key id: {}", key.key_id());
    println!("\n# Add to the trust policy (every server and auditor):\n{entry}");
    if state == KeyState::VerifyOnly {
        println!(
            "# Rotation (docs/signing.md): once every policy has this entry, mark it \"active\", \
             then rename {} over the file the server's --signing-key names.",
            args.out.display()
        );
    }
    Ok(())
}

/// Issues a client certificate for a principal from the development CA.
pub fn issue_cert(args: IssueCertArgs) -> anyhow::Result<()> {
    super::readable("--ca-dir", &args.ca_dir.join("ca.pem"))?;
    super::readable("--ca-dir", &args.ca_dir.join("ca.key"))?;
    super::in_existing_dir("--out", &args.out)?;
    let issued = provcache::access::pki::issue_client_cert(&args.ca_dir, &args.principal, &args.out, args.valid_for)?;
    println!("wrote {} and {}", issued.cert.display(), issued.key.display());
    Ok(())
}
