//! Temporary stand-in for `signing::canonicalize` until the signing module lands.

use crate::proto::reapi;

/// Type URL of the DSSE envelope entry.
pub const ENVELOPE_TYPE_URL: &str = "type.googleapis.com/io.intoto.Envelope";

/// canon(result) of docs/signing.md.
pub fn canonicalize(result: &reapi::ActionResult) -> reapi::ActionResult {
    let mut r = result.clone();
    r.stdout_raw = Default::default();
    r.stderr_raw = Default::default();
    for f in &mut r.output_files {
        f.contents = Default::default();
    }
    if let Some(m) = &mut r.execution_metadata {
        m.auxiliary_metadata.retain(|a| a.type_url != ENVELOPE_TYPE_URL);
        if *m == reapi::ExecutedActionMetadata::default() {
            r.execution_metadata = None;
        }
    }
    r
}
