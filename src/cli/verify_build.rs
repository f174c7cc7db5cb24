//! `provcache verify-build`: audit a build with public keys alone.

use std::path::PathBuf;

use super::ClientArgs;

#[derive(clap::Args, Debug)]
pub struct VerifyBuildArgs {
    /// The server and an auditor certificate (audit:read and cas:read).
    #[command(flatten)]
    client: ClientArgs,
    /// Trust policy (TOML) with the public keys to trust; the server's verdicts are not trusted.
    /// Named as `serve --trust-policy`, the same file; `--policy` is the old spelling, still accepted.
    #[arg(long, alias = "policy")]
    trust_policy: PathBuf,
    /// The build's invocation id (Bazel --invocation_id; the BEP's started.uuid).
    #[arg(long)]
    invocation: Option<String>,
    /// Bazel's --execution_log_json_file of the build: its remote cache hits must match signed results.
    #[arg(long)]
    exec_log: Option<PathBuf>,
    /// Download and re-hash every referenced blob and the Action.
    #[arg(long)]
    deep: bool,
    /// Audit only the hits of this reader principal (e.g. the CI runner's SPIFFE ID); the hit log's
    /// chain is still checked in full. Use it when another identity injected lookups under the id.
    #[arg(long, value_name = "PRINCIPAL")]
    reader: Option<String>,
    /// Print the stable JSON document of docs/audit.md instead of a table.
    #[arg(long)]
    json: bool,
}

async fn verify_build(args: VerifyBuildArgs) -> anyhow::Result<provcache::tools::verify_build::Report> {
    let opts = provcache::tools::verify_build::Options {
        target: args.client.target()?,
        policy: args.trust_policy,
        invocation: args.invocation,
        exec_log: args.exec_log,
        deep: args.deep,
        reader: args.reader,
    };
    provcache::tools::verify_build::run(&opts).await
}

/// Runs the audit and prints its report (text or JSON); exits 0, 1 (a
/// finding) or 2 (the audit could not run), as `--help` documents.
pub fn run(args: VerifyBuildArgs, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let json = args.json;
    match runtime.block_on(verify_build(args)) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&provcache::tools::verify_build::to_json(&report))?);
            } else {
                print!("{}", provcache::tools::verify_build::to_text(&report));
            }
            std::process::exit(report.exit_code());
        }
        Err(e) => {
            let empty = e.downcast_ref::<provcache::tools::verify_build::NothingToAudit>().is_some();
            let message = super::one_line(&e);
            if json {
                let doc = provcache::tools::verify_build::error_json(empty, &message);
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            if empty {
                eprintln!("verify-build: {message}");
            } else {
                eprintln!("verify-build: the audit could not run: {message}");
            }
            std::process::exit(2);
        }
    }
}
