//! The shared token that Herald's internal gRPC ports require (comet's
//! `goim.comet.Comet`, `herald.push.v1.CometPush` and
//! `herald.admin.v1.CometAdmin`; logic's `goim.logic.Logic`): without it,
//! anyone who reaches comet's port can push to every client or drain it,
//! and anyone who reaches logic's can register routes.
//!
//! One token for the whole cluster, sent as `authorization: Bearer <token>`
//! metadata by every caller ([`ClientAuth`], over an [`AuthChannel`]) and
//! checked by every server ([`ServerAuth`], in constant time, refusals
//! counted by reason in [`Refusals`]). Off unless configured ([`TokenArgs`]):
//! goim's job, comet and logic send no token, so a cluster that mixes goim
//! and Herald components, and `herald standalone`, run without it.
//!
//! # The token file
//! `--grpc-token-file` names a file (a mounted Secret) holding one token per
//! line; blank lines and surrounding whitespace are ignored, a token is
//! visible ASCII without spaces. Callers send the first token; servers
//! accept any of them. The file is read again every [`FILE_POLL`], so a
//! Secret rotation needs no restart and refuses nothing when done in three
//! writes, each after every pod has seen the previous one: `old` + `new`
//! (everyone accepts both, still sends `old`), `new` + `old` (everyone
//! sends `new`), `new`. A file that becomes unreadable or empty keeps the
//! tokens last read: a half-written Secret must not open the port.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::{InterceptedService, Interceptor, InterceptorLayer};
use tonic::{Request, Status};
use tracing::{Instrument, info, info_span, warn};

/// How often a token file is read again.
pub const FILE_POLL: Duration = Duration::from_secs(2);

/// The metadata key the token travels in.
const AUTHORIZATION: &str = "authorization";

/// Set on the statuses [`ServerAuth`] answers, so a caller can tell "the
/// gRPC token was refused" (a deployment error) from a server's own
/// `Unauthenticated`.
const REFUSED_MARK: &str = "herald-grpc-auth";

/// Why a token could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the token file failed.
    #[error("reading the gRPC token file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds no token: a file was named, so the port was
    /// meant to be protected, and starting open would hide the mistake.
    #[error("the gRPC token file {path} holds no token")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A token has a character a header cannot carry (the token itself is
    /// never shown).
    #[error("{what}: a gRPC token must be visible ASCII without spaces")]
    Invalid {
        /// Where the token came from.
        what: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The gRPC token flags of every role, flattened into each role's
/// arguments: one definition, so callers and servers cannot drift apart in
/// names or variables.
#[derive(Clone, Default, clap::Args)]
pub struct TokenArgs {
    /// File holding the shared token of the internal gRPC ports (one token
    /// per line: callers send the first, servers accept any), read again
    /// every 2 s so a rotated Secret needs no restart. Empty, or neither
    /// this nor `--grpc-token`: the ports take calls from anyone (goim's
    /// behaviour).
    #[arg(
        long,
        env = crate::contract::GRPC_TOKEN_FILE,
        conflicts_with = "grpc_token",
        value_parser = any_path
    )]
    pub grpc_token_file: Option<PathBuf>,
    /// The shared token itself, for tests and single hosts; prefer
    /// `--grpc-token-file` (a flag shows in the process list). Empty = off.
    #[arg(long, env = crate::contract::GRPC_TOKEN, hide_env_values = true)]
    pub grpc_token: Option<String>,
}

/// A path, the empty one included (clap's own parser refuses it): an empty
/// `HERALD_GRPC_TOKEN_FILE` means off, like an unset one.
fn any_path(value: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(value))
}

impl std::fmt::Debug for TokenArgs {
    /// The token is never printed (`--check-config` shows these).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenArgs")
            .field("grpc_token_file", &self.grpc_token_file)
            .field(
                "grpc_token",
                &self.grpc_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl TokenArgs {
    /// Where the token comes from; empty values mean off.
    pub fn source(self) -> TokenSource {
        let TokenArgs {
            grpc_token_file,
            grpc_token,
        } = self;
        match (grpc_token_file, grpc_token) {
            (Some(path), _) if !path.as_os_str().is_empty() => TokenSource::File(path),
            (_, Some(token)) => TokenSource::literal(token),
            _ => TokenSource::Off,
        }
    }
}

/// Where a role's gRPC token comes from.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum TokenSource {
    /// No token: servers take every call, callers send none.
    #[default]
    Off,
    /// A token given directly.
    Literal(String),
    /// A file read at start and every [`FILE_POLL`].
    File(PathBuf),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Off => f.write_str("Off"),
            TokenSource::Literal(_) => f.write_str("Literal(<redacted>)"),
            TokenSource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl TokenSource {
    /// `token` itself; an empty (or blank) one means off.
    pub fn literal(token: impl Into<String>) -> TokenSource {
        let token = token.into();
        if token.trim().is_empty() {
            TokenSource::Off
        } else {
            TokenSource::Literal(token.trim().to_owned())
        }
    }

    /// The token this source holds now, and for a file a task that reads it
    /// again every [`FILE_POLL`] for as long as a clone of the returned
    /// [`Token`] lives. Call it inside the role's runtime.
    ///
    /// # Errors
    /// A token file that cannot be read, holds no token, or a token that a
    /// header cannot carry.
    pub fn start(&self) -> Result<Token> {
        self.start_polling(FILE_POLL)
    }

    fn start_polling(&self, poll: Duration) -> Result<Token> {
        match self {
            TokenSource::Off => Ok(Token::off()),
            TokenSource::Literal(token) => {
                let tokens = parse(token).map_err(|()| Error::Invalid {
                    what: "--grpc-token".to_owned(),
                })?;
                Ok(Token::new(Current::new(tokens)))
            }
            TokenSource::File(path) => {
                let token = Token::new(Current::new(read(path)?));
                let watch = watch(Arc::downgrade(&token.current), path.clone(), poll);
                tokio::spawn(watch.instrument(info_span!("grpc_token_file")));
                Ok(token)
            }
        }
    }
}

/// The tokens of a file: one per line, blank lines skipped.
///
/// # Errors
/// Unreadable, empty, or a token a header cannot carry.
fn read(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let tokens = parse(&text).map_err(|()| Error::Invalid {
        what: format!("the gRPC token file {}", path.display()),
    })?;
    if tokens.is_empty() {
        return Err(Error::Empty {
            path: path.to_owned(),
        });
    }
    Ok(tokens)
}

/// The non-blank lines of `text`, trimmed; `Err` when one of them is not
/// visible ASCII (which is what a header value can carry).
fn parse(text: &str) -> Result<Vec<String>, ()> {
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    let visible = |token: &String| token.bytes().all(|b| b.is_ascii_graphic());
    if tokens.iter().all(visible) {
        Ok(tokens)
    } else {
        Err(())
    }
}

/// Reads `path` every `poll` and swaps in what changed, until the role's
/// [`Token`] is dropped. Trouble is logged once per kind, and keeps the
/// tokens in force.
async fn watch(current: Weak<RwLock<Arc<Current>>>, path: PathBuf, poll: Duration) {
    let mut problem: Option<String> = None;
    loop {
        tokio::time::sleep(poll).await;
        let Some(current) = current.upgrade() else {
            return;
        };
        match read(&path) {
            Ok(tokens) => {
                problem = None;
                let mut guard = current.write().unwrap_or_else(PoisonError::into_inner);
                if guard.accepted != tokens {
                    *guard = Arc::new(Current::new(tokens));
                    info!(path = %path.display(), tokens = guard.accepted.len(), "gRPC token file changed: reloaded");
                }
            }
            Err(err) => {
                let cause = crate::error_chain(&err);
                if problem.as_ref() != Some(&cause) {
                    warn!(%cause, "gRPC token file unusable: keeping the tokens last read");
                    problem = Some(cause);
                }
            }
        }
    }
}

/// The tokens in force, replaced whole when the file changes.
#[derive(Default)]
struct Current {
    /// Every token a server accepts; empty = the check is off.
    accepted: Vec<String>,
    /// `Bearer <first token>`, ready to clone into each call.
    header: Option<MetadataValue<Ascii>>,
}

impl Current {
    fn new(accepted: Vec<String>) -> Current {
        let header = accepted
            .first()
            .and_then(|token| MetadataValue::try_from(format!("Bearer {token}")).ok());
        Current { accepted, header }
    }
}

/// A role's gRPC token, shared by its server check and its clients; cheap
/// to clone.
#[derive(Clone, Default)]
pub struct Token {
    // std RwLock: read on every call for a pointer copy, written once per
    // file change; never held across an await.
    current: Arc<RwLock<Arc<Current>>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = self.current().accepted.len();
        f.debug_struct("Token").field("tokens", &tokens).finish()
    }
}

impl Token {
    /// No token: nothing sent, nothing checked.
    pub fn off() -> Token {
        Token::default()
    }

    fn new(current: Current) -> Token {
        Token {
            current: Arc::new(RwLock::new(Arc::new(current))),
        }
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether calls are checked (and sent with a token).
    pub fn is_on(&self) -> bool {
        !self.current().accepted.is_empty()
    }

    /// The interceptor that adds the token to a client's calls.
    pub fn client(&self) -> ClientAuth {
        ClientAuth {
            token: self.clone(),
        }
    }

    /// `channel` with every call carrying the token.
    pub fn channel(&self, channel: tonic::transport::Channel) -> AuthChannel {
        InterceptedService::new(channel, self.client())
    }

    /// The layer for `tonic::transport::Server::builder().layer(..)` that
    /// refuses calls without the token, counting them in `refusals`.
    pub fn server_layer(&self, refusals: Refusals) -> InterceptorLayer<ServerAuth> {
        InterceptorLayer::new(ServerAuth {
            token: self.clone(),
            refusals,
        })
    }
}

/// A gRPC channel whose calls carry the role's token: what every Herald
/// gRPC client (`CometClient<AuthChannel>`, ...) is built on.
pub type AuthChannel = InterceptedService<tonic::transport::Channel, ClientAuth>;

/// Adds `authorization: Bearer <token>` to each call (nothing when off).
#[derive(Clone, Debug)]
pub struct ClientAuth {
    token: Token,
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = self.token.current().header.clone() {
            request.metadata_mut().insert(AUTHORIZATION, header);
        }
        Ok(request)
    }
}

/// Refuses calls that lack an accepted token with `Unauthenticated`.
#[derive(Clone, Debug)]
pub struct ServerAuth {
    token: Token,
    refusals: Refusals,
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let current = self.token.current();
        if current.accepted.is_empty() {
            return Ok(request);
        }
        match check(&current.accepted, request.metadata().get(AUTHORIZATION)) {
            Ok(()) => Ok(request),
            Err(refusal) => {
                self.refusals.count(refusal);
                Err(refusal.status())
            }
        }
    }
}

/// Why a call was refused: the `reason` label of [`Refusals`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// No `authorization` metadata.
    Missing,
    /// `authorization` metadata that is not `Bearer <an accepted token>`.
    Wrong,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Wrong => "wrong",
        }
    }

    /// What the caller is told: what is missing or wrong, never a token.
    fn status(self) -> Status {
        let message = match self {
            Refusal::Missing => {
                "this gRPC port requires `authorization: Bearer <token>` metadata with the cluster's shared token (--grpc-token-file); the call carried none"
            }
            Refusal::Wrong => {
                "the `authorization` metadata does not carry an accepted gRPC token (`Bearer <token>` from the same --grpc-token-file as this server's)"
            }
        };
        let mut status = Status::unauthenticated(message);
        status
            .metadata_mut()
            .insert(REFUSED_MARK, MetadataValue::from_static("refused"));
        status
    }
}

/// Whether `status` is a refusal by a server's token check ([`ServerAuth`]),
/// as opposed to the server's own answer: callers count these as failed
/// calls (a deployment error), not as a refused client.
pub fn is_refusal(status: &Status) -> bool {
    status.code() == tonic::Code::Unauthenticated && status.metadata().get(REFUSED_MARK).is_some()
}

/// `Ok` when `header` is `Bearer <one of accepted>`. Every token is compared
/// in full whatever the others gave, so timing does not reveal how much of
/// a guess was right (only its length).
fn check(accepted: &[String], header: Option<&MetadataValue<Ascii>>) -> Result<(), Refusal> {
    let header = header.ok_or(Refusal::Missing)?.as_bytes();
    let given = match header.split_at_checked(7) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"Bearer ") => token,
        _ => return Err(Refusal::Wrong),
    };
    let matched = accepted.iter().fold(subtle::Choice::from(0), |any, token| {
        any | token.as_bytes().ct_eq(given)
    });
    if bool::from(matched) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

type RefusalLabels = [(&'static str, &'static str); 1];

/// Calls refused by the token check, by reason (`missing`, `wrong`): a role
/// registers it in its own registry, as `<prefix>_grpc_auth_refusals_total`.
#[derive(Clone, Debug, Default)]
pub struct Refusals(Family<RefusalLabels, Counter>);

impl Refusals {
    /// Registers the counter in `registry`, both reasons present from 0 so
    /// an alert on their rate needs no first refusal.
    pub fn register(registry: &mut Registry) -> Refusals {
        let refusals = Refusals::default();
        registry.register(
            "grpc_auth_refusals",
            "gRPC calls refused for a missing or wrong shared token (--grpc-token-file), by reason",
            refusals.0.clone(),
        );
        for reason in [Refusal::Missing, Refusal::Wrong] {
            let _ = refusals.0.get_or_create(&[("reason", reason.label())]);
        }
        refusals
    }

    fn count(&self, refusal: Refusal) {
        self.0.get_or_create(&[("reason", refusal.label())]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> MetadataValue<Ascii> {
        MetadataValue::try_from(value).unwrap()
    }

    #[test]
    fn the_check_wants_a_bearer_with_an_accepted_token() {
        let accepted = ["new".to_owned(), "old".to_owned()];
        assert_eq!(check(&accepted, None), Err(Refusal::Missing));
        assert_eq!(check(&accepted, Some(&header("Bearer new"))), Ok(()));
        assert_eq!(check(&accepted, Some(&header("bearer old"))), Ok(()));
        assert_eq!(
            check(&accepted, Some(&header("Bearer ne"))),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            check(&accepted, Some(&header("Bearer newer"))),
            Err(Refusal::Wrong)
        );
        assert_eq!(check(&accepted, Some(&header("new"))), Err(Refusal::Wrong));
        assert_eq!(
            check(&accepted, Some(&header("Basic new"))),
            Err(Refusal::Wrong)
        );
    }

    #[test]
    fn a_refusal_names_the_problem_but_not_the_token() {
        for refusal in [Refusal::Missing, Refusal::Wrong] {
            let status = refusal.status();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(status.message().contains("authorization"), "{status:?}");
            assert!(is_refusal(&status));
        }
        assert!(!is_refusal(&Status::unauthenticated("bad client token")));
    }

    #[test]
    fn flags_name_the_source_and_empty_means_off() {
        let source = |flags: &[&str]| crate::args::parse::<TokenArgs>(flags).unwrap().source();
        crate::args::assert_consistent::<TokenArgs>();
        assert_eq!(source(&[]), TokenSource::Off);
        assert_eq!(source(&["--grpc-token", ""]), TokenSource::Off);
        assert_eq!(source(&["--grpc-token-file", ""]), TokenSource::Off);
        assert_eq!(
            source(&["--grpc-token", " s3cret "]),
            TokenSource::Literal("s3cret".to_owned())
        );
        assert_eq!(
            source(&["--grpc-token-file", "/run/t"]),
            TokenSource::File("/run/t".into())
        );
        assert!(
            crate::args::parse::<TokenArgs>(&["--grpc-token", "a", "--grpc-token-file", "/t"])
                .is_err()
        );
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let args: TokenArgs = crate::args::parse(&["--grpc-token", "s3cret"]).unwrap();
        let shown = format!("{args:?} {:?}", args.clone().source());
        assert!(!shown.contains("s3cret"), "{shown}");
        let token = TokenSource::literal("s3cret").start().unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn files_hold_one_token_per_line() {
        assert_eq!(parse("a\n\n  b \r\n").unwrap(), ["a", "b"]);
        assert!(parse("").unwrap().is_empty());
        assert!(parse("has space").is_err());
        assert!(parse("caf\u{e9}").is_err());
        assert!(matches!(
            TokenSource::literal("two words").start(),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn the_client_sends_the_first_token_and_nothing_when_off() {
        let mut on = Token::new(Current::new(vec!["a".to_owned(), "b".to_owned()])).client();
        let request = on.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get(AUTHORIZATION),
            Some(&header("Bearer a"))
        );
        let mut off = Token::off().client();
        let request = off.call(Request::new(())).unwrap();
        assert!(request.metadata().get(AUTHORIZATION).is_none());
    }

    /// The file is read at start (an empty one refuses to start) and again
    /// after a change; a file that turns empty keeps the last tokens.
    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_an_emptied_one_ignored() {
        const POLL: Duration = Duration::from_millis(20);
        let dir = std::env::temp_dir().join(format!("herald-grpc-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "\n").unwrap();
        let source = TokenSource::File(path.clone());
        assert!(matches!(
            source.start_polling(POLL),
            Err(Error::Empty { .. })
        ));

        std::fs::write(&path, "first\n").unwrap();
        let token = source.start_polling(POLL).unwrap();
        let accepted = |token: &Token| token.current().accepted.clone();
        assert_eq!(accepted(&token), ["first"]);

        std::fs::write(&path, "second\nfirst\n").unwrap();
        tokio::time::sleep(POLL * 10).await;
        assert_eq!(accepted(&token), ["second", "first"]);

        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(POLL * 10).await;
        assert_eq!(accepted(&token), ["second", "first"], "kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
