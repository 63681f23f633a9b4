//! `herald standalone` under the common descriptor limit of 1,024, flooded
//! with 1,100 idle connections to its HTTP push API: comet and logic share
//! one descriptor table, and before the descriptor budget the flood took
//! every descriptor, so no client could connect to the comet. Now the HTTP
//! API holds its share and answers the rest 503; a new client connects and
//! authenticates on the comet's TCP port while the flood is held, a client
//! connected before it is still served, and both get a push once the
//! flood's connections are gone.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use herald_client::{Client, Token};
use herald_testkit::{Herald, http};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

type Result<T = (), E = anyhow::Error> = std::result::Result<T, E>;

const WAIT: Duration = Duration::from_secs(15);
const NOFILE: u64 = 1024;
const FLOOD: usize = 1100;

async fn client(addr: SocketAddr, mid: i64, key: &str) -> Result<Client> {
    let mut client = Client::connect_tcp(addr).await?.with_timeout(WAIT);
    client.auth(&Token::new(mid, key).accepts([1000])).await?;
    Ok(client)
}

/// Whether the server has closed `tcp` (EOF, reset, or an answer and EOF).
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn an_http_flood_cannot_take_the_comets_descriptors() -> Result {
    let addrs: Vec<SocketAddr> = (0..5)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], herald_e2e::free_port())))
        .collect();
    let (tcp, ws, grpc, api, logic_grpc) = (addrs[0], addrs[1], addrs[2], addrs[3], addrs[4]);
    let mut process = Herald::new(env!("CARGO_BIN_EXE_herald"), "standalone")
        .nofile(NOFILE)
        .args(["--tcp-addr", &tcp.to_string()])
        .args(["--ws-addr", &ws.to_string()])
        .args(["--grpc-addr", &grpc.to_string()])
        .args(["--http-addr", &api.to_string()])
        .args(["--logic-grpc-addr", &logic_grpc.to_string()])
        .args(["--comet-http-addr", "none"])
        .env("RUST_LOG", "info")
        .dir(Path::new(env!("CARGO_TARGET_TMPDIR")).join("standalone-fd-budget"))
        .name(format!("standalone-fd-budget-{}", tcp.port()))
        .start()?;
    for addr in [tcp, api] {
        process.wait_for_port(addr, WAIT).await?;
    }
    let mut before = client(tcp, 1, "before-flood").await?;

    // The flood: connections that send nothing, all opened at once.
    let start = Instant::now();
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(api).await?);
    }
    // Give the server time to accept (or refuse) every one of them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refused = 0;
    for tcp in &mut flood {
        if closed_by_server(tcp).await {
            refused += 1;
        }
    }
    eprintln!(
        "{FLOOD} idle HTTP connections opened in {:?}; {refused} closed by the server at once",
        start.elapsed()
    );

    // While the flood is held, a new client connects and authenticates.
    let mut during = tokio::time::timeout(WAIT, client(tcp, 2, "during-flood"))
        .await
        .map_err(|_| anyhow::anyhow!("no new comet client during the flood"))??;
    process.check_running()?;
    assert!(
        refused >= FLOOD - 200,
        "the HTTP API should hold at most its share; {refused} of {FLOOD} refused"
    );
    let log = process.stderr();
    assert!(log.contains("descriptor budget"), "{log}");

    // Once the flood is gone, pushes reach both clients.
    drop(flood);
    let push = async {
        loop {
            let reply = http::post(
                api,
                "/goim/push/keys?operation=1000&keys=before-flood&keys=during-flood",
                b"hello",
            )
            .await;
            match reply {
                Ok(reply) if reply.status == 200 => return reply,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    let reply = tokio::time::timeout(WAIT, push).await?;
    assert!(reply.body.contains("\"code\":0"), "{reply:?}");
    for client in [&mut before, &mut during] {
        assert_eq!(&client.next_message().await?.to_bytes()[16..], b"hello");
    }
    Ok(())
}
