//! WebSocket and WSS clients: the spec vectors, the upgrade on `/sub` and
//! its limits, bytes sent with the upgrade head, TLS and its certificate
//! reload, and a real browser.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use herald_client::Client;
use herald_protocol::pb::{BroadcastRoomReq, PushMsgReq};
use herald_protocol::ws;
use herald_testkit::stub::Event;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http};

use common::{
    Harness, Result, T1, T2, T3, T4, T7, T8_REPLY, T8_REQ, T10_REPLY, T10_REQ, WAIT, hex, raw_push,
    t7_ws, token, upgrade_head,
};

#[tokio::test]
async fn ws_session_matches_spec_vectors() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let _b = h.tcp_client(&token("b", "live://1000", &[])).await?;
    let _c = h.tcp_client(&token("c", "live://1000", &[])).await?;
    let mut req = format!("ws://{}/sub", h.ws).into_client_request()?;
    req.headers_mut().insert("cookie", "sid=abc".parse()?);
    let mut w = Client::connect_ws(req).await?.with_timeout(WAIT);
    w.send_raw(hex(T1)).await?;
    assert_eq!(w.next_message().await?.to_bytes(), hex(T2), "T2");
    let connect = Event::Connect {
        token: String::from_utf8(hex(T1)[16..].to_vec())?,
        server: "comet-test".into(),
        cookie: "sid=abc".into(),
    };
    assert!(
        h.stub.events().contains(&connect),
        "server id and cookie reach logic"
    );
    w.send_raw(hex(T3)).await?;
    assert_eq!(w.next_message().await?.to_bytes(), hex(T4), "T4");
    w.send_raw(hex(T8_REQ)).await?;
    assert_eq!(w.next_message().await?.to_bytes(), hex(T8_REPLY), "T8");
    w.send_raw(hex(T10_REQ)).await?;
    assert_eq!(w.next_message().await?.to_bytes(), hex(T10_REPLY), "T10");
    // What a goim client never sends, on a raw WebSocket: pings are
    // answered, and text messages carry frames too.
    let (mut raw, _) = tokio_tungstenite::connect_async(format!("ws://{}/sub", h.ws)).await?;
    raw.send(Message::Binary(hex(T1).into())).await?;
    let reply = timeout(WAIT, raw.next()).await?.context("ended")??;
    assert_eq!(reply.into_data().to_vec(), hex(T2), "T2");
    raw.send(Message::Ping(Bytes::from_static(b"p"))).await?;
    let pong = timeout(WAIT, raw.next()).await?.context("ended")??;
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"p")));
    raw.send(Message::Text(String::from_utf8(hex(T3))?.into()))
        .await?;
    let reply = timeout(WAIT, raw.next()).await?.context("ended")??;
    assert_eq!(reply.into_data()[..12], hex(T4)[..12]);
    h.shutdown().await
}

#[tokio::test]
async fn websocket_upgrade_checks_the_path() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    for path in ["/foo", "/sub?x=1"] {
        let mut c = TcpStream::connect(h.ws).await?;
        c.write_all(upgrade(path).as_bytes()).await?;
        let head = read_bytes(&mut c, 12).await?;
        assert_eq!(head, b"HTTP/1.1 400", "path {path}");
    }
    let mut c = TcpStream::connect(h.ws).await?;
    c.write_all(upgrade("/sub").as_bytes()).await?;
    let head = read_bytes(&mut c, 12).await?;
    assert_eq!(head, b"HTTP/1.1 101");
    let rest = String::from_utf8(read_head(&mut c).await?)?;
    assert!(
        rest.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "T11 accept value in {rest}"
    );
    assert_eq!(
        h.metric(r#"herald_comet_ws_upgrade_refused_total{reason="path"}"#)
            .await?,
        2.0
    );
    h.serves_a_new_client(true, "after-path").await?;
    h.shutdown().await
}

#[tokio::test]
async fn an_upgrade_that_never_completes_is_closed_at_the_handshake_deadline() -> Result {
    let mut h = Harness::start(|c| c.handshake_timeout = Duration::from_millis(500)).await?;
    let mut healthy = h.ws_client(&token("healthy", "", &[1000])).await?;
    // Half a request head, then nothing: closed without an answer.
    let mut slow = TcpStream::connect(h.ws).await?;
    slow.write_all(b"GET /sub HTTP/1.1\r\nHost: localhost\r\n")
        .await?;
    let mut answer = Vec::new();
    timeout(WAIT, slow.read_to_end(&mut answer))
        .await
        .context("a half head held its connection")??;
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    // Upgraded, but no op 7: closed too (the deadline covers both).
    let (mut silent, _) = tokio_tungstenite::connect_async(format!("ws://{}/sub", h.ws)).await?;
    timeout(WAIT, async {
        while let Some(Ok(message)) = silent.next().await {
            assert!(message.is_close(), "{message:?}");
        }
    })
    .await
    .context("an unauthenticated WebSocket held its connection")?;
    h.wait_metric(r#"herald_comet_auth_total{outcome="timeout"}"#, 2.0)
        .await?;
    h.comet_client()
        .await?
        .push_msg(PushMsgReq {
            keys: vec!["healthy".into()],
            proto_op: 1000,
            proto: Some(raw_push(1000, b"held")),
        })
        .await?;
    assert_eq!(
        healthy.next_message().await?.to_bytes(),
        ws::push_for_ws(&raw_push(1000, b"held"))
    );
    h.serves_a_new_client(true, "after-slow").await?;
    h.shutdown().await
}

/// Exactly `n` bytes off a raw socket; bounded by [`WAIT`].
async fn read_bytes(stream: &mut TcpStream, n: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0; n];
    timeout(WAIT, stream.read_exact(&mut bytes))
        .await
        .context("timed out reading")??;
    Ok(bytes)
}

/// A raw socket read up to the end of an HTTP head (`\r\n\r\n`), byte by
/// byte so that nothing after it is consumed.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.extend(read_bytes(stream, 1).await?);
    }
    Ok(head)
}

/// Sends a raw HTTP request head to the WebSocket port and returns everything
/// the server answers until it closes.
async fn raw_upgrade(addr: SocketAddr, head: &[u8]) -> Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    // The server may answer and close before reading all of an oversized head.
    let _ = stream.write_all(head).await;
    let mut answer = Vec::new();
    let _ = timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .context("server never closed")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn websocket_upgrade_limits_answer_431_and_spare_healthy_clients() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut healthy = h.ws_client(&token("healthy", "room", &[])).await?;
    let mut grpc = h.comet_client().await?;
    let mut pushed = Vec::new();
    let mut push = async |body: &'static [u8]| -> Result {
        grpc.broadcast_room(BroadcastRoomReq {
            room_id: "room".into(),
            proto: Some(raw_push(1000, body)),
        })
        .await?;
        pushed.push(body);
        Ok(())
    };
    push(b"before").await?;

    // A head past 8 KiB: one 10 KiB header.
    let big = upgrade_head(&format!("X-Big: {}\r\n", "a".repeat(10 * 1024)));
    let answer = raw_upgrade(h.ws, big.as_bytes()).await?;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    push(b"after big head").await?;

    // 100 small headers (limit 64), a 2 KiB head in all.
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = raw_upgrade(h.ws, upgrade_head(&many).as_bytes()).await?;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");

    // Not HTTP at all, and HTTP without the upgrade headers.
    let answer = raw_upgrade(h.ws, b"\x00\x01garbage\r\n\r\n").await?;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    let answer = raw_upgrade(h.ws, b"GET /sub HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    push(b"after many headers").await?;

    // Just under both limits still upgrades: 60 headers of a real client.
    let mut req = format!("ws://{}/sub", h.ws).into_client_request()?;
    for i in 0..54 {
        req.headers_mut().insert(
            format!("x-pad-{i}").parse::<http::HeaderName>()?,
            "x".repeat(80).parse()?,
        );
    }
    assert!(req.headers().len() <= 60, "{}", req.headers().len());
    let mut padded = Client::connect_ws(req).await?.with_timeout(WAIT);
    padded.auth(token("padded", "room", &[])).await?;
    push(b"last").await?;

    for body in &pushed {
        let msg = healthy.next_message().await?.to_bytes();
        assert_eq!(
            msg,
            ws::push_for_ws(&raw_push(1000, body)),
            "healthy client lost {body:?}"
        );
    }
    let msg = padded.next_message().await?.to_bytes();
    assert_eq!(msg, ws::push_for_ws(&raw_push(1000, b"last")));
    for (reason, n) in [
        ("head_too_large", 1.0),
        ("too_many_headers", 1.0),
        ("malformed", 1.0),
        ("not_websocket", 1.0),
    ] {
        let series = format!(r#"herald_comet_ws_upgrade_refused_total{{reason="{reason}"}}"#);
        assert_eq!(h.metric(&series).await?, n, "{series}");
    }
    assert_eq!(
        h.metric(r#"herald_comet_connections{transport="ws"}"#)
            .await?,
        2.0
    );
    h.shutdown().await
}

#[tokio::test]
async fn bytes_sent_right_after_the_upgrade_head_are_not_lost() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    // The upgrade request and a masked binary WebSocket message carrying T1,
    // in one write: the frame arrives in the same read as the head.
    let mut bytes = upgrade_head("").into_bytes();
    let payload = hex(T1);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    bytes.push(0x82);
    bytes.push(0x80 | u8::try_from(payload.len())?);
    bytes.extend(mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut c = TcpStream::connect(h.ws).await?;
    c.write_all(&bytes).await?;
    let head = read_head(&mut c).await?;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    // An unmasked binary message from the server: T2, the auth reply.
    assert_eq!(read_bytes(&mut c, 2).await?, [0x82, 16]);
    assert_eq!(read_bytes(&mut c, 16).await?, hex(T2));
    h.shutdown().await
}

#[tokio::test]
async fn wss_serves_the_same_protocol_over_tls() -> Result {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let dir = std::env::temp_dir().join(format!("herald-comet-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    let mut h = Harness::start(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
    })
    .await?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(h.wss.context("wss listener")?).await?;
    let stream = connector.connect("localhost".try_into()?, tcp).await?;
    let mut wss = Client::ws_over(stream, "wss://localhost/sub")
        .await?
        .with_timeout(WAIT);

    wss.send_raw(hex(T1)).await?;
    assert_eq!(wss.next_message().await?.to_bytes(), hex(T2), "T2 over WSS");
    let mut grpc = h.comet_client().await?;
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "live://1000".into(),
        proto: Some(ws::raw_proto(hex(T7).into())),
    })
    .await?;
    assert_eq!(wss.next_message().await?.to_bytes(), t7_ws(), "T7 over WSS");
    // WSS is counted under its own transport label.
    assert_eq!(
        h.metric(r#"herald_comet_connections{transport="wss"}"#)
            .await?,
        1.0
    );
    assert_eq!(
        h.metric(r#"herald_comet_connections{transport="ws"}"#)
            .await?,
        0.0
    );
    h.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A Secret mounted the way the kubelet mounts it: `tls.crt` and `tls.key`
/// are symlinks through `..data`, and each update writes a new directory and
/// renames a fresh `..data` symlink over the old one, so the paths comet
/// reads never change and the files' own mtimes say nothing.
struct SecretVolume {
    dir: std::path::PathBuf,
    version: u32,
}

impl SecretVolume {
    fn new(name: &str) -> Result<SecretVolume> {
        let dir = std::env::temp_dir().join(format!("herald-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for file in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{file}"), dir.join(file))?;
        }
        Ok(SecretVolume { dir, version: 0 })
    }

    fn cert(&self) -> std::path::PathBuf {
        self.dir.join("tls.crt")
    }

    fn key(&self) -> std::path::PathBuf {
        self.dir.join("tls.key")
    }

    /// Swaps in a new pair at once, as the kubelet does.
    fn write(&mut self, cert: &str, key: &str) -> Result {
        self.version += 1;
        let data = format!("..{}", self.version);
        std::fs::create_dir(self.dir.join(&data))?;
        std::fs::write(self.dir.join(&data).join("tls.crt"), cert)?;
        std::fs::write(self.dir.join(&data).join("tls.key"), key)?;
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&data, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        Ok(())
    }
}

impl Drop for SecretVolume {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection to `addr` trusting `roots`, and the certificate the
/// server presented.
async fn tls_connect(
    addr: SocketAddr,
    roots: &rustls::RootCertStore,
) -> Result<(
    tokio_rustls::client::TlsStream<TcpStream>,
    rustls::pki_types::CertificateDer<'static>,
)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(addr).await?;
    let stream = connector.connect("localhost".try_into()?, tcp).await?;
    let served = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .context("no server certificate")?
        .clone()
        .into_owned();
    Ok((stream, served))
}

#[tokio::test]
async fn wss_certificate_is_reloaded_when_its_files_change() -> Result {
    let a = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let b = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let (a_key, b_key) = (a.signing_key.serialize_pem(), b.signing_key.serialize_pem());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a.cert.der().clone())?;
    roots.add(b.cert.der().clone())?;
    let mut volume = SecretVolume::new("comet-tls-reload")?;
    volume.write(&a.cert.pem(), &a_key)?;
    let poll = Duration::from_millis(100);
    let mut h = Harness::start(|c| {
        c.tls_cert = Some(volume.cert());
        c.tls_key = Some(volume.key());
        c.tls_reload = poll;
    })
    .await?;
    let wss = h.wss.context("wss listener")?;
    let ok = r#"herald_comet_tls_reloads_total{result="ok"}"#;
    let error = r#"herald_comet_tls_reloads_total{result="error"}"#;

    // A client of certificate A, authenticated and kept open throughout.
    let (stream, served) = tls_connect(wss, &roots).await?;
    assert_eq!(&served, a.cert.der(), "certificate A at first");
    let mut old = Client::ws_over(stream, "wss://localhost/sub")
        .await?
        .with_timeout(WAIT);
    old.auth(token("old", "live://1000", &[])).await?;

    // The Secret is renewed: new connections get B within a few polls.
    volume.write(&b.cert.pem(), &b_key)?;
    let swapped = std::time::Instant::now();
    timeout(WAIT, async {
        loop {
            if let Ok((_, served)) = tls_connect(wss, &roots).await
                && &served == b.cert.der()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("certificate B never served")?;
    assert!(
        swapped.elapsed() < poll * 10,
        "B served after {:?}, polling every {poll:?}",
        swapped.elapsed()
    );
    h.wait_metric(ok, 1.0).await?;

    // A broken certificate, then a pair whose key is not the certificate's:
    // each counted once as an error, B still served.
    volume.write("-----BEGIN CERTIFICATE-----\nnot base64\n", &b_key)?;
    h.wait_metric(error, 1.0).await?;
    volume.write(&a.cert.pem(), &b_key)?;
    h.wait_metric(error, 2.0).await?;
    tokio::time::sleep(poll * 3).await;
    assert_eq!(h.metric(error).await?, 2.0, "each bad pair counted once");
    assert_eq!(h.metric(ok).await?, 1.0);
    let (stream, served) = tls_connect(wss, &roots).await?;
    assert_eq!(&served, b.cert.der(), "B kept after bad files");
    let mut new = Client::ws_over(stream, "wss://localhost/sub")
        .await?
        .with_timeout(WAIT);
    new.auth(token("new", "live://1000", &[])).await?;

    // The connection made under A was not dropped by the reloads: it and
    // the one made under B both get a room push.
    let mut grpc = h.comet_client().await?;
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "live://1000".into(),
        proto: Some(ws::raw_proto(hex(T7).into())),
    })
    .await?;
    assert_eq!(
        old.next_message().await?.to_bytes(),
        t7_ws(),
        "old connection"
    );
    assert_eq!(
        new.next_message().await?.to_bytes(),
        t7_ws(),
        "new connection"
    );
    assert_eq!(
        h.metric(r#"herald_comet_connections{transport="wss"}"#)
            .await?,
        2.0
    );
    h.shutdown().await
}

// ------------------------------------------------------ a real browser client

/// What the page reported, in order: (what, JSON body).
type Reports = tokio::sync::mpsc::UnboundedReceiver<(String, String)>;

/// Serves the goim page, its `/config` and the `/report/{what}` endpoint on a
/// loopback port.
async fn serve_page(config: serde_json::Value) -> Result<(SocketAddr, Reports)> {
    use axum::extract::{Path, State};
    use axum::routing::{get, post};

    type Tx = tokio::sync::mpsc::UnboundedSender<(String, String)>;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let page = || async { axum::response::Html(include_str!("fixtures/goim-page.html")) };
    let app = axum::Router::new()
        .route("/page.html", get(page))
        .route("/config", get(move || async move { axum::Json(config) }))
        .route(
            "/report/{what}",
            post(
                |State(tx): State<Tx>, Path(what): Path<String>, body: String| async move {
                    let _ = tx.send((what, body));
                },
            ),
        )
        .with_state(tx);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, rx))
}

/// Headless Chromium on one URL; stopped by its pid when dropped.
struct Browser {
    child: std::process::Child,
    profile: std::path::PathBuf,
}

impl Browser {
    fn open(url: &str) -> Result<Browser> {
        let binary = herald_e2e::testbed_var("HERALD_CHROMIUM");
        let profile = std::env::temp_dir().join(format!(
            "herald-chromium-{}-{}",
            std::process::id(),
            NEXT_PROFILE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&profile)?;
        let log = std::fs::File::create(profile.join("chromium.log"))?;
        let child = std::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--mute-audio",
                // Every name fails to resolve: nothing leaves loopback.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting chromium")?;
        Ok(Browser { child, profile })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.join("chromium.log")).unwrap_or_default()
    }
}

static NEXT_PROFILE: AtomicU64 = AtomicU64::new(0);

impl Drop for Browser {
    fn drop(&mut self) {
        // TERM lets chromium end its renderer and helper processes; KILL if
        // it has not exited in 5 s.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The next report from the page, failing on `/report/error`.
async fn next_report(reports: &mut Reports, browser: &Browser) -> Result<(String, String)> {
    // Chromium starts slowly on a loaded machine.
    let report = timeout(Duration::from_secs(60), reports.recv())
        .await
        .with_context(|| {
            format!(
                "the page reported nothing; chromium's log:\n{}",
                browser.log()
            )
        })?
        .context("report channel closed")?;
    if report.0 == "error" {
        bail!("the page failed: {}", report.1);
    }
    Ok(report)
}

#[tokio::test]
async fn a_browser_page_authenticates_and_receives_key_and_room_pushes() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let (page, mut reports) = serve_page(serde_json::json!({
        "ws": format!("ws://{}/sub", h.ws),
        "token": token("browser", "live://browser", &[1000]),
    }))
    .await?;
    let browser = Browser::open(&format!("http://{page}/page.html"))?;

    let (what, _) = next_report(&mut reports, &browser).await?;
    assert_eq!(what, "authed");
    let mut grpc = h.comet_client().await?;
    grpc.push_msg(PushMsgReq {
        keys: vec!["browser".into()],
        proto_op: 1000,
        proto: Some(raw_push(1000, b"to the key")),
    })
    .await?;
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "live://browser".into(),
        proto: Some(raw_push(1000, b"to the room")),
    })
    .await?;
    let (what, body) = next_report(&mut reports, &browser).await?;
    assert_eq!(what, "result");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        body["pushes"],
        serde_json::json!(["to the key", "to the room"]),
        "{body}"
    );
    // The page closed its WebSocket: the comet saw a browser session end.
    h.logic_saw("Disconnect", |_| h.stub.disconnects("browser") == 1)
        .await?;
    drop(browser);
    h.shutdown().await
}

/// The close code of the close frame the comet sends `ws` next, skipping
/// other messages; fails when the connection ends without one.
async fn close_code<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Result<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    timeout(WAIT, async {
        loop {
            match ws.next().await.context("ended without a close frame")?? {
                Message::Close(Some(frame)) => return Ok(u16::from(frame.code)),
                Message::Close(None) => bail!("close frame without a code"),
                _ => {}
            }
        }
    })
    .await?
}

#[tokio::test]
async fn websocket_closes_carry_1002_and_1009() -> Result {
    let mut h = Harness::start(|_| {}).await?;
    let mut healthy = h.tcp_client(&token("healthy", "room", &[])).await?;
    let mut grpc = h.comet_client().await?;
    let authenticated = async || -> Result<_> {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/sub", h.ws)).await?;
        ws.send(Message::Binary(hex(T1).into())).await?;
        let reply = timeout(WAIT, ws.next()).await?.context("ended")??;
        assert_eq!(reply.into_data().to_vec(), hex(T2));
        Ok(ws)
    };

    // A message past the size limit: 1009, before and after op 7.
    let huge = Message::Binary(vec![0u8; 9000].into());
    let mut ws = authenticated().await?;
    ws.send(huge.clone()).await?;
    assert_eq!(close_code(&mut ws).await?, 1009, "oversized message");
    let (mut early, _) = tokio_tungstenite::connect_async(format!("ws://{}/sub", h.ws)).await?;
    early.send(huge).await?;
    assert_eq!(close_code(&mut early).await?, 1009, "oversized before op 7");

    // A goim frame past its pack_len limit inside a message that fits: 1009.
    let mut ws = authenticated().await?;
    let mut header = hex(T3);
    header[..4].copy_from_slice(&5000i32.to_be_bytes());
    ws.send(Message::Binary(header.into())).await?;
    assert_eq!(close_code(&mut ws).await?, 1009, "pack_len over 4112");

    // A message shorter than its pack_len: a protocol error, 1002.
    let mut ws = authenticated().await?;
    let mut short = hex(T10_REQ);
    short[..4].copy_from_slice(&32i32.to_be_bytes());
    ws.send(Message::Binary(short.into())).await?;
    assert_eq!(close_code(&mut ws).await?, 1002, "truncated goim frame");

    // A WebSocket frame with RSV1 set (no extension was negotiated): 1002.
    let mut tcp = TcpStream::connect(h.ws).await?;
    tcp.write_all(upgrade_head("").as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await?);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    tcp.write_all(&[0xc2, 0x81, 0, 0, 0, 0, 0]).await?;
    let mut close = [0u8; 4];
    timeout(WAIT, tcp.read_exact(&mut close)).await??;
    assert_eq!(close[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1002, "RSV1 set");

    // The goim-frame cases before op 7: the same codes.
    let (mut early, _) = tokio_tungstenite::connect_async(format!("ws://{}/sub", h.ws)).await?;
    let mut header = hex(T3);
    header[..4].copy_from_slice(&5000i32.to_be_bytes());
    early.send(Message::Binary(header.into())).await?;
    assert_eq!(close_code(&mut early).await?, 1009, "pack_len before op 7");
    let (mut early, _) = tokio_tungstenite::connect_async(format!("ws://{}/sub", h.ws)).await?;
    let mut short = hex(T10_REQ);
    short[..4].copy_from_slice(&32i32.to_be_bytes());
    early.send(Message::Binary(short.into())).await?;
    assert_eq!(close_code(&mut early).await?, 1002, "truncated before op 7");

    // RSV1 after op 7: 1002 as well. Client frames by hand (masked).
    let mut tcp = TcpStream::connect(h.ws).await?;
    tcp.write_all(upgrade_head("").as_bytes()).await?;
    assert!(read_head(&mut tcp).await?.starts_with(b"HTTP/1.1 101"));
    let auth = hex(T1);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut message = vec![0x82, 0x80 | u8::try_from(auth.len())?];
    message.extend(mask);
    message.extend(auth.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    tcp.write_all(&message).await?;
    assert_eq!(read_bytes(&mut tcp, 2).await?, [0x82, 16]);
    assert_eq!(read_bytes(&mut tcp, 16).await?, hex(T2), "authenticated");
    tcp.write_all(&[0xc2, 0x81, 0, 0, 0, 0, 0]).await?;
    let close = read_bytes(&mut tcp, 4).await?;
    assert_eq!(close[0], 0x88, "a close frame");
    assert_eq!(
        u16::from_be_bytes([close[2], close[3]]),
        1002,
        "RSV1 after op 7"
    );

    // Closes of authenticated sessions for a bad frame, goim's or
    // WebSocket's, are counted as invalid frames (oversized message, pack_len
    // over its limit, truncated goim frame, RSV1), none as I/O failures.
    h.wait_metric(
        r#"herald_comet_disconnects_total{reason="invalid_frame"}"#,
        4.0,
    )
    .await?;
    assert_eq!(
        h.metric(r#"herald_comet_disconnects_total{reason="io"}"#)
            .await?,
        0.0,
        "a bad frame counted as an I/O failure"
    );

    // The other client is served throughout, and a new one after.
    grpc.broadcast_room(BroadcastRoomReq {
        room_id: "room".into(),
        proto: Some(raw_push(1000, b"still here")),
    })
    .await?;
    assert_eq!(healthy.next_message().await?.body.as_ref(), b"still here");
    h.serves_a_new_client(true, "after-close-codes").await?;
    h.shutdown().await
}
