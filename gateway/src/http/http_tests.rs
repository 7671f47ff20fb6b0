use super::*;

fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[test]
fn framing_rejects_smuggling_shapes() {
    let max = 1000;
    assert_eq!(
        framing(&h(&[("Content-Length", "5")]), max),
        Ok(Some(BodyKind::Length(5)))
    );
    assert_eq!(
        framing(&h(&[("transfer-encoding", "chunked")]), max),
        Ok(Some(BodyKind::Chunked))
    );
    assert_eq!(framing(&h(&[]), max), Ok(None));
    for bad in [
        h(&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
        h(&[("Content-Length", "5"), ("Content-Length", "6")]),
        h(&[("Content-Length", "-1")]),
        h(&[("Content-Length", "+5")]),
        h(&[("Content-Length", "5, 5")]),
        h(&[("Content-Length", "")]),
    ] {
        assert!(
            matches!(framing(&bad, max), Err(HttpError::BadRequest(_))),
            "{bad:?}"
        );
    }
    assert_eq!(
        framing(&h(&[("Content-Length", "5"), ("content-length", "5")]), max),
        Ok(Some(BodyKind::Length(5)))
    );
    for coding in ["gzip", "gzip, chunked", "chunked, gzip", "identity"] {
        assert_eq!(
            framing(&h(&[("Transfer-Encoding", coding)]), max),
            Err(HttpError::UnsupportedCoding),
            "{coding}"
        );
    }
    assert_eq!(
        framing(
            &h(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked")
            ]),
            max
        ),
        Err(HttpError::UnsupportedCoding)
    );
    assert_eq!(
        framing(&h(&[("Content-Length", "1001")]), max),
        Err(HttpError::BodyTooLarge(1000))
    );
}

#[test]
fn chunked_decoder_handles_any_split() {
    let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
    for split in 0..wire.len() {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let (used1, done1) = d.decode(&wire[..split], &mut out).unwrap();
        assert!(!done1 || split >= wire.len() - 4);
        let mut rest = wire[used1..].to_vec();
        let (used2, done2) = if done1 {
            (0, true)
        } else {
            d.decode(&rest, &mut out).unwrap()
        };
        assert!(done2, "split at {split}");
        rest.drain(..used2);
        assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.", "split at {split}");
        assert_eq!(
            rest, b"NEXT",
            "split at {split}: the next request is left alone"
        );
    }
}

#[test]
fn chunked_decoder_rejects_garbage() {
    for wire in [&b"zz\r\n"[..], b"4\r\nWikiXX", b"fffffffffffffffffffff\r\n"] {
        let mut d = ChunkedDecoder::default();
        assert!(
            d.decode(wire, &mut Vec::new()).is_err(),
            "{:?}",
            String::from_utf8_lossy(wire)
        );
    }
}

#[test]
fn response_frames_its_body() {
    let r = response(404, &[("content-type", "application/json")], b"{}", false);
    assert_eq!(
        String::from_utf8(r).unwrap(),
        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
    );
}
