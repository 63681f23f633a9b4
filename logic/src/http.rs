//! goim's logic HTTP API (§7) on axum.
//!
//! Every answer is goim's envelope `{"code","message","data"}` (`data`
//! omitted when empty). Unlike goim, failures also carry a real HTTP status
//! (400, 401, 413, 503 + `Retry-After`) so load balancers and retrying
//! clients can act on them; `compat_status_200` restores goim's "always 200".
//!
//! Query lists are repeated keys (`keys=a&keys=b`), parsed from the raw query
//! string by [`herald_protocol::query::Params`] (serde's query deserializer
//! cannot collect repeats); its errors are 400s.
//!
//! [`router`] is the privileged API (pushes, behind `--api-key`);
//! [`client::router`] serves the client-facing reads of the same handlers on
//! their own listener, without the key.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use herald_protocol::query::{self, Params};
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Value, json};

use crate::queue::RecordId;
use crate::service::{self, Service};

pub mod client;

/// How long a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "1";

/// HTTP-specific settings.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// When set, `Authorization: Bearer <key>` is required on every route.
    pub api_key: Option<herald_runtime::Secret>,
    /// Answer 200 always, like goim, with the outcome only in `code`.
    pub compat_status_200: bool,
    /// Largest accepted push body in bytes (larger → 413).
    pub max_body: usize,
    /// Most keys, mids or rooms in one request (more → 400).
    pub max_keys: usize,
}

#[derive(Debug)]
struct AppState {
    service: Arc<Service>,
    config: HttpConfig,
}

/// Why an HTTP request failed; each variant has its status and goim code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed or missing query parameters.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong API key (client listener: missing or refused token).
    #[error("unauthorized")]
    Unauthorized,
    /// The body exceeded the configured limit.
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The body could not be read.
    #[error("reading request body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A backend failed.
    #[error(transparent)]
    Service(#[from] service::Error),
}

impl From<query::Error> for Error {
    fn from(err: query::Error) -> Self {
        Error::BadRequest(err.to_string())
    }
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Marks responses that carry our envelope, so the compat layer rewrites
/// only those (not e.g. axum's 404 for unknown paths).
#[derive(Clone, Copy, Debug)]
struct Enveloped;

fn envelope(status: StatusCode, code: i32, message: &str, data: Option<Value>) -> Response {
    let mut body = json!({"code": code, "message": message});
    if let (Some(data), Some(obj)) = (data, body.as_object_mut()) {
        obj.insert("data".to_owned(), data);
    }
    let mut resp = (status, axum::Json(body)).into_response();
    resp.extensions_mut().insert(Enveloped);
    resp
}

fn ok(data: Option<Value>) -> Response {
    envelope(StatusCode::OK, 0, "", data)
}

/// A push's answer. goim sends no `data`; Herald adds the message id (the
/// first record's `partition-offset`) and every record's id, which goim
/// clients ignore and operators can trace through Kafka and job's logs.
fn pushed(ids: &[RecordId]) -> Response {
    let records: Vec<String> = ids.iter().map(ToString::to_string).collect();
    ok(Some(json!({
        "msg_id": records.first(),
        "records": records,
    })))
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            Error::BadRequest(_) | Error::Body(_) => {
                envelope(StatusCode::BAD_REQUEST, -400, &message, None)
            }
            Error::Service(service::Error::Token(_) | service::Error::BadRequest(_)) => {
                envelope(StatusCode::BAD_REQUEST, -400, &message, None)
            }
            Error::Unauthorized => envelope(StatusCode::UNAUTHORIZED, -401, &message, None),
            Error::TooLarge(_) => envelope(StatusCode::PAYLOAD_TOO_LARGE, -413, &message, None),
            Error::Service(ref err) => {
                tracing::warn!(cause = %err, source = ?std::error::Error::source(err), "http: backend failed");
                let mut resp = envelope(StatusCode::SERVICE_UNAVAILABLE, -500, &message, None);
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
                resp
            }
        }
    }
}

/// The router with every §7 route, auth and the compat layer.
pub fn router(service: Arc<Service>, config: HttpConfig) -> Router {
    let state = Arc::new(AppState {
        service: service.clone(),
        config,
    });
    let api = Router::new()
        .route("/goim/push/keys", post(push_keys))
        .route("/goim/push/mids", post(push_mids))
        .route("/goim/push/room", post(push_room))
        .route("/goim/push/all", post(push_all))
        .route("/goim/online/top", get(online_top))
        .route("/goim/online/room", get(online_room))
        .route("/goim/online/total", get(online_total))
        .route("/goim/nodes/weighted", get(nodes_weighted))
        .route("/goim/nodes/instances", get(nodes_instances))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::map_response_with_state(state.clone(), compat))
        .with_state(state);
    api.merge(herald_runtime::admin::router(service.clone()))
        .layer(middleware::from_fn_with_state(service, count))
}

/// Counts every answer by route template (unknown paths share one label).
async fn count(State(service): State<Arc<Service>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let resp = next.run(req).await;
    service.metrics().http(&route, resp.status());
    resp
}

async fn compat(State(state): State<Arc<AppState>>, mut resp: Response) -> Response {
    if state.config.compat_status_200 && resp.extensions().get::<Enveloped>().is_some() {
        *resp.status_mut() = StatusCode::OK;
    }
    resp
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(herald_runtime::bearer);
        if !given.is_some_and(|g| key.matches(g.as_bytes())) {
            return Error::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Reads the body, refusing more than `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(Error::TooLarge(limit)),
        Err(err) => Err(Error::Body(err)),
    }
}

async fn push_keys(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response> {
    let params = Params::parse(query.as_deref());
    let op = params.op()?;
    let keys = params.list("keys", state.config.max_keys)?;
    if keys.is_empty() {
        return Err(Error::BadRequest("keys is required".to_owned()));
    }
    let msg = read_body(body, state.config.max_body).await?;
    let ids = state.service.push_keys(op, &keys, msg).await?;
    Ok(pushed(&ids))
}

async fn push_mids(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response> {
    let params = Params::parse(query.as_deref());
    let op = params.op()?;
    let mids = params
        .list("mids", state.config.max_keys)?
        .iter()
        .map(|m| {
            m.parse::<i64>()
                .map_err(|_| Error::BadRequest(format!("mids is not a valid number: {m:?}")))
        })
        .collect::<Result<Vec<i64>>>()?;
    let msg = read_body(body, state.config.max_body).await?;
    // §7: a missing mids list is a successful no-op.
    let ids = if mids.is_empty() {
        Vec::new()
    } else {
        state.service.push_mids(op, &mids, msg).await?
    };
    Ok(pushed(&ids))
}

async fn push_room(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response> {
    let params = Params::parse(query.as_deref());
    let op = params.nonzero_op()?;
    let typ = params.required("type")?;
    let room = params.required("room")?;
    // A room no comet would let a client join (ops 12, the token) is
    // refused rather than queued for nobody.
    if !herald_protocol::limits::room_fits(&service::room_key(typ, room)) {
        return Err(Error::BadRequest(format!(
            "room {typ}://… is longer than {} bytes",
            herald_protocol::limits::MAX_ROOM_ID_BYTES
        )));
    }
    let msg = read_body(body, state.config.max_body).await?;
    let ids = state.service.push_room(op, typ, room, msg).await?;
    Ok(pushed(&ids))
}

async fn push_all(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response> {
    let params = Params::parse(query.as_deref());
    let op = params.nonzero_op()?;
    let speed = params.num::<i32>("speed")?.unwrap_or(0);
    let msg = read_body(body, state.config.max_body).await?;
    let ids = state.service.push_all(op, speed, msg).await?;
    Ok(pushed(&ids))
}

async fn online_top(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let params = Params::parse(query.as_deref());
    let typ = params.required("type")?;
    let limit = match params.num::<usize>("limit")? {
        Some(n) if n > 0 => n,
        _ => {
            return Err(Error::BadRequest(
                "limit is required and non-zero".to_owned(),
            ));
        }
    };
    let top: Vec<Value> = state
        .service
        .online_top(typ, limit)
        .into_iter()
        .map(|(room_id, count)| json!({"room_id": room_id, "count": count}))
        .collect();
    Ok(ok(Some(Value::Array(top))))
}

async fn online_room(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let params = Params::parse(query.as_deref());
    let typ = params.required("type")?;
    let rooms = params.list("rooms", state.config.max_keys)?;
    if rooms.is_empty() {
        return Err(Error::BadRequest("rooms is required".to_owned()));
    }
    let counts = state.service.online_room(typ, &rooms);
    Ok(ok(Some(json!(counts))))
}

async fn online_total(State(state): State<Arc<AppState>>) -> Response {
    let (conn_count, ip_count) = state.service.online_total();
    ok(Some(
        json!({"conn_count": conn_count, "ip_count": ip_count}),
    ))
}

async fn nodes_weighted(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery) -> Response {
    let params = Params::parse(query.as_deref());
    let reply = state
        .service
        .nodes_reply(params.one("platform").unwrap_or(""));
    // goim's JSON omits zero fields; `nodes` is always present so a client
    // reading it gets `[]` rather than `undefined` when no comet is up.
    let mut data = serde_json::Map::new();
    let mut put = |name: &str, v: Value, zero: bool| {
        if !zero {
            data.insert(name.to_owned(), v);
        }
    };
    put("domain", json!(reply.domain), reply.domain.is_empty());
    put("tcp_port", json!(reply.tcp_port), reply.tcp_port == 0);
    put("ws_port", json!(reply.ws_port), reply.ws_port == 0);
    put("wss_port", json!(reply.wss_port), reply.wss_port == 0);
    put("heartbeat", json!(reply.heartbeat), reply.heartbeat == 0);
    put("nodes", json!(reply.nodes), false);
    if let Some(b) = &reply.backoff {
        put(
            "backoff",
            json!({"max_delay": b.max_delay, "base_delay": b.base_delay,
                   "factor": short_float(b.factor), "jitter": short_float(b.jitter)}),
            false,
        );
    }
    put(
        "heartbeat_max",
        json!(reply.heartbeat_max),
        reply.heartbeat_max == 0,
    );
    ok(Some(Value::Object(data)))
}

/// An f32 as the JSON number a person wrote (`1.8`, not `1.7999999523162842`).
fn short_float(v: f32) -> Value {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

async fn nodes_instances(State(state): State<Arc<AppState>>) -> Response {
    let list = state.service.nodes().get();
    // Shaped like bilibili/discovery instances (§7) from the node list.
    let instances: Vec<Value> = list
        .nodes
        .iter()
        .map(|n| {
            json!({
                "region": "", "zone": "", "env": "", "appid": "goim.comet",
                "hostname": n.name,
                "addrs": [format!("grpc://{}", n.grpc)],
                "version": "",
                "latest_timestamp": list.generation,
                "metadata": {
                    "weight": n.weight.to_string(),
                    "offline": n.draining.to_string(),
                    "addrs": n.addrs.join(","),
                    "conn_count": n.connections.to_string(),
                    "ip_count": n.client_ips.to_string(),
                },
            })
        })
        .collect();
    ok(Some(Value::Array(instances)))
}
