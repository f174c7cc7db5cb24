use provcache::proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn write_then_read_with_offsets_and_limits() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = noise(3 * 1024 * 1024 + 123, 7);
    let d = sha(&data);
    let committed = c.write(&format!("uploads/u1/blobs/{}", rn(&d)), &data, 16 * 1024).await.unwrap();
    assert_eq!(committed, data.len() as i64);
    let name = format!("blobs/{}", rn(&d));
    assert_eq!(c.read(&name, 0, 0).await.unwrap(), data);
    assert_eq!(c.read(&name, 1_000_000, 0).await.unwrap(), &data[1_000_000..]);
    assert_eq!(c.read(&name, 1_048_570, 20).await.unwrap(), &data[1_048_570..1_048_590]);
    assert_eq!(c.read(&name, data.len() as i64, 0).await.unwrap(), Vec::<u8>::new());

    assert_eq!(c.read(&name, data.len() as i64 + 1, 0).await.unwrap_err().code(), Code::OutOfRange);
    assert_eq!(c.read(&name, -1, 0).await.unwrap_err().code(), Code::OutOfRange);
    assert_eq!(c.read(&name, 0, -1).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(c.read(&format!("blobs/{}", rn(&sha(b"nope"))), 0, 0).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn the_empty_blob_reads_without_upload() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let d = sha(b"");
    assert_eq!(c.read(&format!("blobs/{}", rn(&d)), 0, 0).await.unwrap(), Vec::<u8>::new());
    assert_eq!(c.write(&format!("uploads/e/blobs/{}", rn(&d)), b"", 16).await.unwrap(), 0);
}

#[tokio::test]
async fn wrong_data_is_refused_and_never_visible() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let claimed = sha(b"the real thing");
    let err = c.write(&format!("uploads/u/blobs/{}", rn(&claimed)), b"the fake thing", 4).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("does not match"), "{}", err.message());
    assert_eq!(c.missing("", std::slice::from_ref(&claimed)).await, vec![claimed.clone()]);

    // Too many bytes, and too few.
    let err = c.write(&format!("uploads/u2/blobs/{}", rn(&claimed)), b"the real thing!!", 4).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.write(&format!("uploads/u3/blobs/{}", rn(&claimed)), b"the real", 4).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(c.missing("", std::slice::from_ref(&claimed)).await, vec![claimed]);
}

#[tokio::test]
async fn bad_resource_names_are_invalid_arguments() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let d = sha(b"x");
    for name in [
        format!("blobs/{}", rn(&d)),                          // a read name for a write
        format!("uploads/u/blobs/{}", d.hash),                // no size
        format!("uploads/u/blobs/md5/{}", rn(&d)),            // weak function
        format!("uploads/u/compressed-blobs/lz4/{}", rn(&d)), // unknown compressor
        format!("a/blobs/uploads/u/blobs/{}", rn(&d)),        // reserved instance segment
    ] {
        let err = c.write(&name, b"x", 1).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}");
    }
    for name in [format!("uploads/u/blobs/{}", rn(&d)), format!("blobs/{}/x", d.hash), "garbage".to_string()] {
        let err = c.read(&name, 0, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}");
    }
}

#[tokio::test]
async fn interrupted_write_resumes_after_query_write_status() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = noise(2 * 1024 * 1024 + 5000, 3);
    let d = sha(&data);
    let name = format!("inst/uploads/resume-1/blobs/{}", rn(&d));

    // Send the first 1.5 MiB and drop the stream without finish_write.
    let half = 1536 * 1024;
    let first = write_requests(&name, &data[..half], 64 * 1024, 0, false);
    let err = c.bs.write(futures::stream::iter(first)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "a stream that ends without finish_write is reported");
    assert_eq!(c.missing("inst", std::slice::from_ref(&d)).await, vec![d.clone()], "partial upload invisible");

    let status =
        c.bs.query_write_status(QueryWriteStatusRequest { resource_name: name.clone() }).await.unwrap().into_inner();
    assert_eq!(status.committed_size, half as i64);
    assert!(!status.complete);

    // Resuming at the wrong offset is refused; at the committed size it completes.
    let wrong = write_requests(&name, &data[1000..], 64 * 1024, 1000, true);
    assert_eq!(c.bs.write(futures::stream::iter(wrong)).await.unwrap_err().code(), Code::InvalidArgument);
    let rest = write_requests(&name, &data[half..], 64 * 1024, half as i64, true);
    let committed = c.bs.write(futures::stream::iter(rest)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, data.len() as i64);
    assert_eq!(c.read(&format!("inst/blobs/{}", rn(&d)), 0, 0).await.unwrap(), data);

    let status = c.bs.query_write_status(QueryWriteStatusRequest { resource_name: name }).await.unwrap().into_inner();
    assert!(status.complete);
    assert_eq!(status.committed_size, data.len() as i64);
    let unknown = format!("uploads/never/blobs/{}", rn(&sha(b"never")));
    let err = c.bs.query_write_status(QueryWriteStatusRequest { resource_name: unknown }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn zstd_and_blake3_round_trips() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = b"provcache zstd round trip ".repeat(100_000);
    for (fname, d) in [("", sha(&data)), ("blake3/", blake3(&data))] {
        let compressed = zstd::bulk::compress(&data, 3).unwrap();
        let name = format!("z/uploads/u/compressed-blobs/zstd/{fname}{}", rn(&d));
        let committed = c.write(&name, &compressed, 16 * 1024).await.unwrap();
        assert_eq!(committed, compressed.len() as i64);
        let back = c.read(&format!("z/compressed-blobs/zstd/{fname}{}", rn(&d)), 0, 0).await.unwrap();
        assert!(back.len() < data.len() / 10);
        assert_eq!(zstd::stream::decode_all(&back[..]).unwrap(), data);
        let from = c.read(&format!("z/compressed-blobs/zstd/{fname}{}", rn(&d)), 1000, 0).await.unwrap();
        assert_eq!(zstd::stream::decode_all(&from[..]).unwrap(), &data[1000..]);
        assert_eq!(c.read(&format!("z/blobs/{fname}{}", rn(&d)), 0, 0).await.unwrap(), data);
        // An existing blob ends a compressed write early with committed_size -1.
        let again = format!("z/uploads/u9/compressed-blobs/zstd/{fname}{}", rn(&d));
        assert_eq!(c.write(&again, &compressed, 1 << 20).await.unwrap(), -1);
    }
    // BLAKE3 data is checked with BLAKE3.
    let d = blake3(b"b3");
    let err = c.write(&format!("uploads/u/blobs/blake3/{}", rn(&d)), b"b4", 2).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.write(&format!("uploads/u/blobs/blake3/{}", rn(&d)), b"b3", 2).await.unwrap();
    let mut req =
        provcache::proto::reapi::FindMissingBlobsRequest { blob_digests: vec![d.clone()], ..Default::default() };
    req.digest_function = provcache::proto::reapi::digest_function::Value::Blake3 as i32;
    assert!(c.cas.find_missing_blobs(req.clone()).await.unwrap().into_inner().missing_blob_digests.is_empty());
    req.digest_function = 0; // same hash as SHA-256 is another blob
    assert_eq!(c.cas.find_missing_blobs(req).await.unwrap().into_inner().missing_blob_digests, vec![d]);
}

#[tokio::test]
async fn compressed_reads_refuse_a_read_limit() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let d = c.upload("", &[b"abc"]).await.remove(0);
    let err = c.read(&format!("compressed-blobs/zstd/{}", rn(&d)), 0, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// R4 over several interruptions: after each, QueryWriteStatus reports a
/// committed size that never goes backwards (also after a refused resume at
/// a wrong offset) and the partial upload stays invisible.
#[tokio::test]
async fn r4_committed_size_never_goes_backwards_over_repeated_interruptions() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = noise(4 * 1024 * 1024 + 321, 5);
    let d = sha(&data);
    let name = format!("uploads/resume-many/blobs/{}", rn(&d));
    let committed = |c: &mut Clients| {
        let mut bs = c.bs.clone();
        let name = name.clone();
        async move {
            let s = bs.query_write_status(QueryWriteStatusRequest { resource_name: name }).await.unwrap().into_inner();
            assert!(!s.complete);
            s.committed_size
        }
    };
    let mut last = 0i64;
    for end in [700 * 1024, 1900 * 1024, 3 * 1024 * 1024 + 5] {
        let msgs = write_requests(&name, &data[last as usize..end], 64 * 1024, last, false);
        assert!(c.bs.write(futures::stream::iter(msgs)).await.is_err(), "a stream without finish_write");
        let now = committed(&mut c).await;
        assert!(now >= last, "committed size went back from {last} to {now}");
        assert_eq!(now, end as i64);
        // A resume at a wrong offset is refused and changes nothing.
        let ahead = write_requests(&name, &data[end + 10..end + 20], 10, end as i64 + 10, true);
        assert_eq!(c.bs.write(futures::stream::iter(ahead)).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(committed(&mut c).await, now, "a refused resume moved the committed size");
        assert_eq!(c.missing("", std::slice::from_ref(&d)).await, vec![d.clone()], "a partial upload is invisible");
        assert_eq!(c.read(&format!("blobs/{}", rn(&d)), 0, 0).await.unwrap_err().code(), Code::NotFound);
        last = now;
    }
    let rest = write_requests(&name, &data[last as usize..], 64 * 1024, last, true);
    assert_eq!(c.bs.write(futures::stream::iter(rest)).await.unwrap().into_inner().committed_size, data.len() as i64);
    assert_eq!(c.read(&format!("blobs/{}", rn(&d)), 0, 0).await.unwrap(), data);
}

#[tokio::test]
async fn concurrent_writers_of_one_digest_end_with_one_correct_copy() {
    let server = TestServer::start().await;
    let c = server.clients().await;
    let data = std::sync::Arc::new(noise(5 * 1024 * 1024 + 77, 11));
    let d = sha(&data);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        let data = data.clone();
        let d = d.clone();
        tasks.push(tokio::spawn(
            async move { c.write(&format!("uploads/w{i}/blobs/{}", rn(&d)), &data, 64 * 1024).await },
        ));
    }
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut c = c.clone();
        let d = d.clone();
        let data = data.clone();
        readers.push(tokio::spawn(async move {
            for _ in 0..20 {
                match c.read(&format!("blobs/{}", rn(&d)), 0, 0).await {
                    Ok(got) => assert!(got == *data, "a reader sees the whole, right blob, never a prefix"),
                    Err(e) => assert_eq!(e.code(), Code::NotFound),
                }
            }
        }));
    }
    for t in tasks {
        let committed = t.await.unwrap().unwrap();
        assert_eq!(committed, data.len() as i64);
    }
    for r in readers {
        r.await.unwrap();
    }
    let mut c = c.clone();
    assert_eq!(c.read(&format!("blobs/{}", rn(&d)), 0, 0).await.unwrap(), *data);
}

#[tokio::test]
async fn a_256_mib_blob_streams_both_ways() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    const LEN: usize = 256 * 1024 * 1024;
    // Generate and hash on the fly; never hold more than one message on the client either.
    let mut hasher = provcache::cache::digest::DigestFunction::Sha256.hasher();
    let block = noise(1 << 20, 99);
    for i in 0..(LEN >> 20) {
        let mut b = block.clone();
        b[0] = i as u8;
        hasher.update(&b);
    }
    let d = provcache::cache::digest::Digest {
        function: provcache::cache::digest::DigestFunction::Sha256,
        hash: hasher.finalize(),
        size: LEN as u64,
    }
    .to_proto();
    let name = format!("uploads/big/blobs/{}", rn(&d));
    let block2 = block.clone();
    let msgs = futures::stream::iter((0..(LEN >> 20)).map(move |i| {
        let mut b = block2.clone();
        b[0] = i as u8;
        WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i << 20) as i64,
            finish_write: i == (LEN >> 20) - 1,
            data: b.into(),
        }
    }));
    assert_eq!(c.bs.write(msgs).await.unwrap().into_inner().committed_size, LEN as i64);

    let mut stream =
        c.bs.read(ReadRequest { resource_name: format!("blobs/{}", rn(&d)), read_offset: 0, read_limit: 0 })
            .await
            .unwrap()
            .into_inner();
    let mut check = provcache::cache::digest::DigestFunction::Sha256.hasher();
    let mut total = 0usize;
    while let Some(m) = stream.message().await.unwrap() {
        total += m.data.len();
        check.update(&m.data);
    }
    assert_eq!(total, LEN);
    assert_eq!(hex::encode(check.finalize()), d.hash);
}

/// A resumed Write reaching a server without its session (a load balancer
/// sent the first stream to another replica, or the session expired) is
/// ABORTED, which Bazel retries: its retry asks QueryWriteStatus, gets
/// NOT_FOUND and restarts at 0, which completes. (INVALID_ARGUMENT, the old
/// answer, made Bazel fail the upload.)
#[tokio::test]
async fn a_resumed_write_the_server_has_no_session_for_is_aborted_and_a_restart_at_zero_completes() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let data = noise(300 * 1024, 7);
    let d = sha(&data);
    let name = format!("uploads/elsewhere/blobs/{}", rn(&d));

    let rest = write_requests(&name, &data[100 * 1024..], 64 * 1024, 100 * 1024, true);
    let err = c.bs.write(futures::stream::iter(rest)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let status = c.bs.query_write_status(QueryWriteStatusRequest { resource_name: name.clone() }).await;
    assert_eq!(status.unwrap_err().code(), Code::NotFound);

    let whole = write_requests(&name, &data, 64 * 1024, 0, true);
    assert_eq!(c.bs.write(futures::stream::iter(whole)).await.unwrap().into_inner().committed_size, data.len() as i64);
    assert_eq!(c.read(&format!("blobs/{}", rn(&d)), 0, 0).await.unwrap(), data);
}
