use provcache::cache::digest::{Digest, DigestFunction};
use provcache::cache::resource::InstanceName;
use provcache::proto::reapi;
use provcache::store::rocks::Key;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn update_then_get_returns_the_result() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let action = upload_action(&mut c, "", "round-trip").await;
    let out = c.upload("", &[b"output bytes"]).await.remove(0);
    let result =
        reapi::ActionResult { output_files: vec![output("out.txt", &out)], exit_code: 0, ..Default::default() };
    let stored = c.ac.update_action_result(update("", &action, result.clone())).await.unwrap().into_inner();
    assert_eq!(stored.output_files, result.output_files);
    let got = c.ac.get_action_result(get("", &action)).await.unwrap().into_inner();
    assert_eq!(got.output_files, result.output_files);
    assert_eq!(got.exit_code, 0);
}

#[tokio::test]
async fn get_of_an_unknown_action_is_a_miss_and_bad_digests_are_invalid() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let err = c.ac.get_action_result(get("", &sha(b"unknown action"))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let bad = reapi::Digest { hash: "XYZ".into(), size_bytes: 3 };
    let err = c.ac.get_action_result(get("", &bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.ac.update_action_result(update("", &bad, Default::default())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn update_requires_action_command_and_every_output() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;

    // No Action in the CAS.
    let ghost = sha(b"ghost action");
    let err = c.ac.update_action_result(update("", &ghost, Default::default())).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&ghost.hash), "{}", err.message());

    // Action present, Command missing.
    let command_digest = sha(b"never uploaded command");
    let action = reapi::Action { command_digest: Some(command_digest.clone()), ..Default::default() };
    let action_d = c.upload_msg("", &action).await;
    let err = c.ac.update_action_result(update("", &action_d, Default::default())).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&command_digest.hash), "{}", err.message());

    // Output file missing.
    let action_d = upload_action(&mut c, "", "outputs").await;
    let missing = sha(b"missing output");
    let result = reapi::ActionResult { output_files: vec![output("o", &missing)], ..Default::default() };
    let err = c.ac.update_action_result(update("", &action_d, result)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&missing.hash), "{}", err.message());

    // A file inside an output directory's Tree is missing.
    let absent_file = sha(b"file inside tree");
    let tree = reapi::Tree {
        root: Some(reapi::Directory {
            files: vec![reapi::FileNode { name: "f".into(), digest: Some(absent_file.clone()), ..Default::default() }],
            ..Default::default()
        }),
        children: vec![],
    };
    let tree_d = c.upload_msg("", &tree).await;
    let result = reapi::ActionResult {
        output_directories: vec![reapi::OutputDirectory {
            path: "dir".into(),
            tree_digest: Some(tree_d.clone()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = c.ac.update_action_result(update("", &action_d, result.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&absent_file.hash), "{}", err.message());
    c.upload("", &[b"file inside tree"]).await;
    c.ac.update_action_result(update("", &action_d, result)).await.unwrap();

    // Nothing was stored by the refused updates.
    let err = c.ac.get_action_result(get("", &ghost)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn inlined_bytes_move_into_the_cas_and_inline_on_request() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let action = upload_action(&mut c, "", "inline").await;
    let result = reapi::ActionResult {
        stdout_raw: bytes::Bytes::from_static(b"hello stdout"),
        stderr_raw: bytes::Bytes::from_static(b"hello stderr"),
        output_files: vec![reapi::OutputFile {
            path: "out.txt".into(),
            digest: Some(sha(b"file contents")),
            contents: bytes::Bytes::from_static(b"file contents"),
            ..Default::default()
        }],
        ..Default::default()
    };
    let stored = c.ac.update_action_result(update("", &action, result)).await.unwrap().into_inner();
    assert!(stored.stdout_raw.is_empty() && stored.stderr_raw.is_empty());
    assert!(stored.output_files[0].contents.is_empty());
    assert_eq!(stored.stdout_digest, Some(sha(b"hello stdout")));
    assert!(c.missing("", &[sha(b"hello stdout"), sha(b"hello stderr"), sha(b"file contents")]).await.is_empty());

    let plain = c.ac.get_action_result(get("", &action)).await.unwrap().into_inner();
    assert!(plain.stdout_raw.is_empty(), "not inlined unless asked");
    let mut ask = get("", &action);
    ask.inline_stdout = true;
    ask.inline_output_files = vec!["out.txt".into()];
    let inl = c.ac.get_action_result(ask).await.unwrap().into_inner();
    assert_eq!(&inl.stdout_raw[..], b"hello stdout");
    assert!(inl.stderr_raw.is_empty());
    assert_eq!(&inl.output_files[0].contents[..], b"file contents");

    // Inlined bytes that contradict their digest are refused.
    let bad = reapi::ActionResult {
        stdout_raw: bytes::Bytes::from_static(b"actual"),
        stdout_digest: Some(sha(b"claimed")),
        ..Default::default()
    };
    let err = c.ac.update_action_result(update("", &action, bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_result_whose_blobs_are_gone_is_a_miss() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let action = upload_action(&mut c, "", "dangling").await;
    let out = c.upload("", &[b"will vanish"]).await.remove(0);
    let result = reapi::ActionResult { output_files: vec![output("o", &out)], ..Default::default() };
    c.ac.update_action_result(update("", &action, result)).await.unwrap();
    c.ac.get_action_result(get("", &action)).await.unwrap();

    let digest = Digest::of(DigestFunction::Sha256, b"will vanish");
    server.store.delete_blob(&Key::new(&InstanceName::default(), &digest)).unwrap();
    let err = c.ac.get_action_result(get("", &action)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&out.hash), "{}", err.message());
}

#[tokio::test]
async fn action_cache_instances_are_isolated() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let action = upload_action(&mut c, "dev/x", "isolated").await;
    c.ac.update_action_result(update("dev/x", &action, Default::default())).await.unwrap();
    c.ac.get_action_result(get("dev/x", &action)).await.unwrap();
    for other in ["main", "", "dev"] {
        let err = c.ac.get_action_result(get(other, &action)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{other}");
    }
}
