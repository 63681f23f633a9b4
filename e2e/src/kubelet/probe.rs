//! Readiness probes: `httpGet` and `tcpSocket`, dialled only at loopback
//! addresses (the pod's IP unless the probe names another loopback host).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::net::TcpStream;

/// The probe timings with Kubernetes' defaults filled in.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    pub(super) initial_delay: Duration,
    pub(super) period: Duration,
    pub(super) timeout: Duration,
    pub(super) success_threshold: i32,
    pub(super) failure_threshold: i32,
}

impl Timing {
    pub(super) fn of(probe: &Probe) -> Timing {
        let secs = |v: Option<i32>, default: u64| {
            Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
        };
        Timing {
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10).max(Duration::from_millis(100)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_millis(100)),
            success_threshold: probe.success_threshold.unwrap_or(1).max(1),
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1),
        }
    }
}

/// Runs `probe` once against a container of the pod at `pod_ip`.
///
/// # Errors
/// Why the probe failed, in words for the container's status.
pub(super) async fn check(
    probe: &Probe,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> Result<(), String> {
    let timeout = Timing::of(probe).timeout;
    let attempt = async {
        if let Some(http) = &probe.http_get {
            if http
                .scheme
                .as_deref()
                .is_some_and(|s| !s.eq_ignore_ascii_case("http"))
            {
                return Err("only plain HTTP probes are supported".to_owned());
            }
            let addr = SocketAddr::new(
                host(http.host.as_deref(), pod_ip)?,
                port(&http.port, container)?,
            );
            let path = http
                .path
                .as_deref()
                .filter(|p| !p.is_empty())
                .unwrap_or("/");
            let headers = http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.as_str(), h.value.as_str()));
            http_get(addr, path, headers).await
        } else if let Some(tcp) = &probe.tcp_socket {
            let addr = SocketAddr::new(
                host(tcp.host.as_deref(), pod_ip)?,
                port(&tcp.port, container)?,
            );
            TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {addr}: {e}"))
        } else {
            Err("only httpGet and tcpSocket probes are supported".to_owned())
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")))
}

/// The address to dial: never anything outside 127.0.0.0/8.
fn host(host: Option<&str>, pod_ip: Ipv4Addr) -> Result<IpAddr, String> {
    let ip = match host.filter(|h| !h.is_empty()) {
        None => IpAddr::V4(pod_ip),
        Some("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(h) => h
            .parse()
            .map_err(|_| format!("probe host {h} is not an IP address"))?,
    };
    if !ip.is_loopback() {
        return Err(format!(
            "probe host {ip} is not a loopback address; refused"
        ));
    }
    Ok(ip)
}

/// A port number, or a named container port.
fn port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    let number = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .ok_or_else(|| format!("no container port named {name}"))?,
    };
    u16::try_from(number).map_err(|_| format!("port {number} out of range"))
}

async fn http_get<'a>(
    addr: SocketAddr,
    path: &str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("dial tcp {addr}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake with {addr}: {e}"))?;
    // The connection task ends with the request: the probe closes it.
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::get(path).header(hyper::header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    let result = sender.send_request(request).await;
    driver.abort();
    let status = result
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?
        .status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("GET http://{addr}{path}: HTTP status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_dials_outside_loopback() {
        let pod_ip = Ipv4Addr::new(127, 0, 20, 1);
        assert_eq!(host(None, pod_ip), Ok(IpAddr::V4(pod_ip)));
        assert_eq!(
            host(Some("127.0.0.5"), pod_ip),
            Ok("127.0.0.5".parse().expect("ip"))
        );
        assert!(host(Some("10.0.0.1"), pod_ip).is_err());
        assert!(host(Some("example.com"), pod_ip).is_err());
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_real_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for reply in [
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                "HTTP/1.1 503 Unavailable\r\ncontent-length: 0\r\n\r\n",
            ] {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 1024];
                let n = socket.read(&mut buf).await.expect("read");
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /ready HTTP/1.1"));
                socket.write_all(reply.as_bytes()).await.expect("write");
            }
            listener
        });
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "ports": [{"name": "http", "containerPort": port}]
        }))
        .expect("container");
        let probe: Probe = serde_json::from_value(serde_json::json!({
            "httpGet": {"path": "/ready", "port": "http"}
        }))
        .expect("probe");
        let ip = Ipv4Addr::LOCALHOST;
        assert_eq!(check(&probe, &container, ip).await, Ok(()));
        let err = check(&probe, &container, ip)
            .await
            .expect_err("503 is not ready");
        assert!(err.contains("503"), "{err}");
        let listener = server.await.expect("server");
        let tcp: Probe = serde_json::from_value(serde_json::json!({"tcpSocket": {"port": port}}))
            .expect("probe");
        assert_eq!(check(&tcp, &container, ip).await, Ok(()));
        drop(listener);
        assert!(check(&tcp, &container, ip).await.is_err(), "closed port");
    }
}
