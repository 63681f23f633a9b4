//! The client-facing listener (`--client-addr`): what a browser or an app
//! may call without the push API key.
//!
//! It serves only reads a client needs before and while it is connected —
//! `GET /goim/nodes/weighted` (where to connect) and `GET /goim/online/room`
//! (room counts a client UI shows) — with the very handlers of the privileged
//! API, so both answer alike. Pushes and `/goim/nodes/instances` (internal
//! topology) are not routed here (404), and the API key is never asked for
//! nor accepted: with `--client-auth token` the bearer must be a client token
//! that logic's [`crate::token::Verifier`] accepts, the same check as op 7's.
//! Browsers get CORS: any origin, `GET` and the `OPTIONS` preflight, with
//! `Authorization` allowed.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{Method, header};
use tower_http::cors::{Any, CorsLayer};

use super::{AppState, Error, HttpConfig, compat, count, nodes_weighted, online_room};
use crate::service::Service;

/// How the client listener authenticates callers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// Anyone who reaches the listener may read (the node list is what a
    /// client needs to connect at all).
    #[default]
    None,
    /// `Authorization: Bearer <client token>`, verified like a connect token.
    Token,
}

/// The client router: the two client-facing reads, client auth, the compat
/// layer (`config.compat_status_200`), CORS. `config.api_key` is ignored.
pub fn router(service: Arc<Service>, config: HttpConfig, auth: ClientAuth) -> Router {
    let state = Arc::new(AppState {
        service: service.clone(),
        config,
    });
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION]);
    let mut api = Router::new()
        .route("/goim/nodes/weighted", get(nodes_weighted))
        .route("/goim/online/room", get(online_room));
    if auth == ClientAuth::Token {
        api = api.layer(middleware::from_fn_with_state(
            service.clone(),
            client_token,
        ));
    }
    api.layer(middleware::map_response_with_state(state.clone(), compat))
        .with_state(state)
        .layer(middleware::from_fn_with_state(service, count))
        // Outermost: a preflight is answered before auth asks for a token,
        // and every answer (401s too) carries the CORS headers.
        .layer(cors)
}

async fn client_token(State(service): State<Arc<Service>>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(herald_runtime::bearer);
    match token.map(|t| service.check_client_token(t.as_bytes())) {
        Some(Ok(())) => next.run(req).await,
        Some(Err(err)) => {
            tracing::debug!(cause = %err, "client listener: token refused");
            Error::Unauthorized.into_response()
        }
        None => Error::Unauthorized.into_response(),
    }
}
