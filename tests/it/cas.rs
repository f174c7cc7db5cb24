use bytes::Bytes;
use provcache::proto::reapi::{self, batch_update_blobs_request, compressor, digest_function};
use tonic::Code;

use crate::common::*;

const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn find_req(instance: &str, digests: Vec<reapi::Digest>) -> reapi::FindMissingBlobsRequest {
    reapi::FindMissingBlobsRequest { instance_name: instance.into(), blob_digests: digests, digest_function: 0 }
}

#[tokio::test]
async fn find_missing_reports_absent_blobs_and_never_the_empty_blob() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let stored = c.upload("", &[b"present"]).await.remove(0);
    let absent = sha(b"absent");
    let empty = reapi::Digest { hash: EMPTY.into(), size_bytes: 0 };
    let missing = c.missing("", &[stored, absent.clone(), empty]).await;
    assert_eq!(missing, vec![absent]);
}

#[tokio::test]
async fn malformed_digests_are_invalid_arguments_with_a_reason() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let cases = [
        (reapi::Digest { hash: "abc".into(), size_bytes: 1 }, "characters"),
        (reapi::Digest { hash: EMPTY.to_uppercase(), size_bytes: 0 }, "lowercase hex"),
        (reapi::Digest { hash: format!("{}z", &EMPTY[..63]), size_bytes: 0 }, "lowercase hex"),
        (reapi::Digest { hash: EMPTY.into(), size_bytes: -1 }, "negative"),
    ];
    for (d, why) in cases {
        let err = c.cas.find_missing_blobs(find_req("", vec![d.clone()])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{d:?}");
        assert!(err.message().contains(why), "{d:?}: {}", err.message());
    }
}

#[tokio::test]
async fn weak_digest_functions_are_refused() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    for f in [digest_function::Value::Md5, digest_function::Value::Sha1, digest_function::Value::Murmur3] {
        let mut req = find_req("", vec![sha(b"x")]);
        req.digest_function = f as i32;
        let err = c.cas.find_missing_blobs(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("not supported"), "{}", err.message());
    }
}

#[tokio::test]
async fn batch_update_checks_every_blob_and_stores_only_good_ones() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let good = sha(b"good");
    let wrong_hash = sha(b"other");
    let wrong_size = reapi::Digest { hash: sha(b"sized").hash, size_bytes: 99 };
    let req = reapi::BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: vec![
            batch_update_blobs_request::Request {
                digest: Some(good.clone()),
                data: Bytes::from_static(b"good"),
                compressor: 0,
            },
            batch_update_blobs_request::Request {
                digest: Some(wrong_hash.clone()),
                data: Bytes::from_static(b"junk!"),
                compressor: 0,
            },
            batch_update_blobs_request::Request {
                digest: Some(wrong_size.clone()),
                data: Bytes::from_static(b"sized"),
                compressor: 0,
            },
        ],
        digest_function: 0,
    };
    let resp = c.cas.batch_update_blobs(req).await.unwrap().into_inner();
    let codes: Vec<i32> = resp.responses.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    assert_eq!(codes, vec![0, Code::InvalidArgument as i32, Code::InvalidArgument as i32]);
    assert_eq!(resp.responses[1].digest.as_ref(), Some(&wrong_hash));
    assert_eq!(c.missing("", &[good, wrong_hash.clone(), wrong_size.clone()]).await, vec![wrong_hash, wrong_size]);
}

#[tokio::test]
async fn oversize_batches_are_refused_whole() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let big = noise(3 << 20, 1);
    let big2 = noise(2 << 20, 2);
    let req = reapi::BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: [&big, &big2]
            .iter()
            .map(|b| batch_update_blobs_request::Request {
                digest: Some(sha(b)),
                data: Bytes::copy_from_slice(b),
                compressor: 0,
            })
            .collect(),
        digest_function: 0,
    };
    let err = c.cas.batch_update_blobs(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit"), "{}", err.message());
    assert_eq!(c.missing("", &[sha(&big), sha(&big2)]).await.len(), 2);

    let err = c
        .cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest { digests: vec![sha(&big), sha(&big2)], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn batch_read_returns_data_or_not_found_per_blob_and_zstd_round_trips() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let text = b"hello hello hello hello ".repeat(100);
    let stored = c.upload("", &[&text]).await.remove(0);
    let absent = sha(b"absent");
    for zstd in [false, true] {
        let resp = c
            .cas
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: String::new(),
                digests: vec![stored.clone(), absent.clone()],
                acceptable_compressors: if zstd { vec![compressor::Value::Zstd as i32] } else { vec![] },
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let ok = &resp.responses[0];
        assert_eq!(ok.status.as_ref().unwrap().code, 0);
        let data = if ok.compressor == compressor::Value::Zstd as i32 {
            assert!(zstd, "compressed only when asked");
            assert!(ok.data.len() < text.len());
            zstd::bulk::decompress(&ok.data, text.len()).unwrap()
        } else {
            assert!(!zstd, "repetitive text is compressed when zstd is acceptable");
            ok.data.to_vec()
        };
        assert_eq!(data, text);
        assert_eq!(resp.responses[1].status.as_ref().unwrap().code, Code::NotFound as i32);
    }
}

#[tokio::test]
async fn zstd_batch_upload_is_verified_after_decompression() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = b"compress me ".repeat(1000);
    let d = sha(&data);
    let compressed = zstd::bulk::compress(&data, 3).unwrap();
    let bogus = zstd::bulk::compress(b"something else", 3).unwrap();
    let req = reapi::BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: vec![
            batch_update_blobs_request::Request {
                digest: Some(d.clone()),
                data: compressed.into(),
                compressor: compressor::Value::Zstd as i32,
            },
            batch_update_blobs_request::Request {
                digest: Some(sha(b"expected")),
                data: bogus.into(),
                compressor: compressor::Value::Zstd as i32,
            },
        ],
        digest_function: 0,
    };
    let resp = c.cas.batch_update_blobs(req).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    assert_eq!(resp.responses[1].status.as_ref().unwrap().code, Code::InvalidArgument as i32);
    assert_eq!(c.read(&format!("blobs/{}", rn(&d)), 0, 0).await.unwrap(), data);
}

#[tokio::test]
async fn instances_are_isolated() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let d = c.upload("team/a", &[b"secret"]).await.remove(0);
    assert!(c.missing("team/a", std::slice::from_ref(&d)).await.is_empty());
    assert_eq!(c.missing("team/b", std::slice::from_ref(&d)).await, vec![d.clone()]);
    assert_eq!(c.missing("", std::slice::from_ref(&d)).await, vec![d.clone()]);
    let err = c.read(&format!("team/b/blobs/{}", rn(&d)), 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

fn dir_node(name: &str, d: &reapi::Digest) -> reapi::DirectoryNode {
    reapi::DirectoryNode { name: name.into(), digest: Some(d.clone()) }
}

#[tokio::test]
async fn get_tree_pages_through_a_three_level_tree() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let file = c.upload("", &[b"leaf file"]).await.remove(0);
    let leaf = |n: &str| reapi::Directory {
        files: vec![reapi::FileNode { name: n.into(), digest: Some(file.clone()), ..Default::default() }],
        ..Default::default()
    };
    let (l1, l2, l3) = (leaf("x"), leaf("y"), leaf("z"));
    let (d1, d2, d3) = (c.upload_msg("", &l1).await, c.upload_msg("", &l2).await, c.upload_msg("", &l3).await);
    let mid_a = reapi::Directory { directories: vec![dir_node("l1", &d1), dir_node("l2", &d2)], ..Default::default() };
    let mid_b = reapi::Directory { directories: vec![dir_node("l3", &d3)], ..Default::default() };
    let (ma, mb) = (c.upload_msg("", &mid_a).await, c.upload_msg("", &mid_b).await);
    let root = reapi::Directory { directories: vec![dir_node("a", &ma), dir_node("b", &mb)], ..Default::default() };
    let root_d = c.upload_msg("", &root).await;

    let get = |page_size: i32, token: String| reapi::GetTreeRequest {
        instance_name: String::new(),
        root_digest: Some(root_d.clone()),
        page_size,
        page_token: token,
        digest_function: 0,
    };
    // Everything in one call, two directories per response.
    let mut stream = c.cas.get_tree(get(2, String::new())).await.unwrap().into_inner();
    let mut pages = Vec::new();
    while let Some(p) = stream.message().await.unwrap() {
        pages.push(p);
    }
    assert_eq!(pages.iter().map(|p| p.directories.len()).collect::<Vec<_>>(), vec![2, 2, 2]);
    assert!(pages[..2].iter().all(|p| !p.next_page_token.is_empty()));
    assert!(pages[2].next_page_token.is_empty());
    let all: Vec<reapi::Directory> = pages.iter().flat_map(|p| p.directories.clone()).collect();
    assert_eq!(all, vec![root.clone(), mid_a, mid_b, l1, l2, l3.clone()]);

    // Resuming from the second page's token returns the rest.
    let mut stream = c.cas.get_tree(get(2, pages[1].next_page_token.clone())).await.unwrap().into_inner();
    let rest = stream.message().await.unwrap().unwrap();
    assert_eq!(rest.directories, vec![all[4].clone(), l3]);
    assert!(stream.message().await.unwrap().is_none());

    let err = c.cas.get_tree(get(2, "bogus".into())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut missing = get(0, String::new());
    missing.root_digest = Some(sha(b"no such dir"));
    let err = c.cas.get_tree(missing).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
