//! The read-only HTTP API on the service's tokio runtime: Prometheus metrics, health and
//! readiness, snapshots, cluster profiles, user lookups and the OpenAPI document. Every error
//! is a 4xx with a JSON body; an optional bearer token guards all but health and metrics.

pub mod serving;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use crate::pipeline::Health;
use crate::store::{AssignmentChunks, SnapshotStore};
use crate::telemetry::Metrics;
use serving::Serving;

/// The OpenAPI document of every route, kept in the repo.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");
/// The live page at `/`: one self-contained file, no CDN, no fonts.
const PAGE: &str = include_str!("page.html");
/// Snapshots shown by the charts over time.
const CHART_HISTORY: usize = 20;

/// Requests that read stored snapshots (charts, the snapshot list, an old version, histories,
/// assignments downloads) run at most this many at once; the others wait their turn, so memory
/// stays flat under any load.
const STORED_READS_IN_FLIGHT: usize = 4;
/// The shortest wait for a turn before a request is answered 503. A request waits at least
/// `[http] stored_read_deadline_ms` too: every holder gives its turn up by then.
const STORED_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

// Longest user id accepted in a path: the limit every source applies to ids, so every user
// the engine holds can be looked up.
use crate::event::MAX_ID_BYTES;
/// Largest `limit` of a cluster profile request.
const MAX_LIMIT: usize = 1000;

pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub serving: Arc<RwLock<Option<Arc<Serving>>>>,
    pub snapshots: SnapshotStore,
    pub token: Option<String>,
    /// The turns of requests that read stored snapshots ([`STORED_READS_IN_FLIGHT`]).
    pub stored_reads: Arc<tokio::sync::Semaphore>,
    /// `[http] stored_read_deadline_ms`: the longest a request holds its turn.
    pub stored_read_deadline: std::time::Duration,
    /// The latest model of the whole consumer group (see `kafka::rounds`).
    pub group: crate::kafka::rounds::GroupSlot,
    /// Every user's segment in it.
    pub group_assignments: crate::kafka::rounds::GroupAssignments,
    /// `[kafka] group_model_interval_ms` is set: the snapshots are the group's, whose users
    /// this instance does not all hold.
    pub group_mode: bool,
}

impl AppState {
    /// The turns for reading stored snapshots, all free.
    pub fn stored_read_turns() -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(STORED_READS_IN_FLIGHT))
    }

    /// A turn to read stored snapshots, or the documented 503 when none comes in time.
    async fn stored_read_turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let wait = STORED_READ_WAIT.max(self.stored_read_deadline);
        match tokio::time::timeout(wait, self.stored_reads.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests for stored snapshots in flight; retry shortly",
            )),
        }
    }

    fn latest(&self) -> Option<Arc<Serving>> {
        self.serving.read().ok().and_then(|s| s.clone())
    }

    /// The documented 404 of a user's history with a group's snapshots.
    fn refuse_group_history(&self) -> Result<(), ApiError> {
        if self.group_mode {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "the snapshots are the consumer group's, and no instance keeps a user's history: \
                 read a user's segment at /users/{id}, and its changes from the change feed \
                 ([kafka] changes_topic)",
            ));
        }
        Ok(())
    }

    /// User `id`'s segment in the group model, or a 404 saying `missing`.
    fn require_group_assignment(
        &self,
        id: &str,
        missing: impl FnOnce() -> String,
    ) -> Result<crate::kafka::rounds::GroupAssignment, ApiError> {
        self.group_assignments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .copied()
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, missing()))
    }

    /// The latest snapshot, or the documented 404 before the first one.
    fn require_latest(&self) -> Result<Arc<Serving>, ApiError> {
        self.latest()
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no snapshot yet"))
    }
}

/// A JSON error response.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.message, "status": self.status.as_u16()});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

/// `Path` whose rejections (bad percent-encoding, wrong type) are the documented JSON error.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(ApiError::new(e.status(), e.body_text())),
        }
    }
}

/// `Query` whose rejections (a repeated or malformed parameter) are the documented JSON error.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(e) => Err(ApiError::new(e.status(), e.body_text())),
        }
    }
}

fn json_bytes(bytes: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

pub fn router(state: Arc<AppState>) -> Router {
    let guarded = Router::new()
        .route("/snapshots", get(list_snapshots))
        .route("/snapshots/latest", get(latest_snapshot))
        .route("/snapshots/{version}", get(snapshot_by_version))
        .route(
            "/snapshots/{version}/assignments",
            get(snapshot_assignments),
        )
        .route("/clusters/{id}", get(cluster))
        .route("/clusters/{id}/members", get(cluster_members))
        .route("/users/{id}", get(user))
        .route("/users/{id}/history", get(user_history))
        .route("/openapi.json", get(openapi))
        .route("/charts/{file}", get(chart))
        .route("/group", get(group_model))
        .route("/group/users/{id}", get(group_user))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(guarded)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "the API is read-only: use GET",
            )
        })
        .with_state(state)
}

/// A running HTTP server and the switch that stops it.
pub struct RunningServer {
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    /// Stops serving and waits for in-flight requests to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
    }
}

/// Serves the API of a pipeline's readers (`shared`) and the stored `snapshots` on `[http] listen` until
/// [`RunningServer::stop`], or until `also_stop_on` completes.
pub async fn start(
    config: &crate::config::Config,
    shared: &crate::pipeline::Shared,
    snapshots: &SnapshotStore,
    also_stop_on: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningServer> {
    let state = Arc::new(AppState {
        metrics: shared.metrics.clone(),
        health: shared.health.clone(),
        serving: shared.serving.clone(),
        snapshots: snapshots.clone(),
        token: config.http.token(),
        stored_reads: AppState::stored_read_turns(),
        stored_read_deadline: config.http.stored_read_deadline(),
        group: shared.group.clone(),
        group_assignments: shared.group_assignments.clone(),
        group_mode: config.kafka.group_model_on(),
    });
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let server = serve(config.http.listen_addr()?, state, async move {
        tokio::select! {
            _ = stopped.wait_for(|v| *v) => {}
            _ = also_stop_on => {}
        }
    })
    .await?;
    Ok(RunningServer { stop, server })
}

/// Binds `listen` and serves until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} ([http] listen): {e}"))?;
    tracing::info!(%listen, "HTTP API listening");
    Ok(serve_on(listener, state, shutdown))
}

/// Serves on a bound `listener` until `shutdown` resolves.
pub fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let app = router(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%e, "HTTP server failed");
        }
    })
}

async fn require_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
                .into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The latest model of the whole consumer group, as its coordinator published it.
async fn group_model(State(state): State<Arc<AppState>>) -> Response {
    let latest = state
        .group
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    match latest {
        Some(model) => axum::Json(&*model).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "no group model yet (set [kafka] group_model_interval_ms; the instance owning \
             partition 0 publishes one once every partition is held)",
        )
        .into_response(),
    }
}

/// A user's segment in the group model, whichever instance holds the user.
async fn group_user(State(state): State<Arc<AppState>>, ApiPath(id): ApiPath<String>) -> ApiResult {
    check_user_id(&id)?;
    let a = state.require_group_assignment(&id, || {
        format!("user {} is in no group model segment", truncate(&id))
    })?;
    Ok(axum::Json(json!({
        "user": id,
        "segment": a.segment,
        "version": a.version,
        "distance": a.distance,
    }))
    .into_response())
}

/// Every user's segment in the group's latest snapshot, from the assignments this instance has
/// read (the latest version's once its assignments are read, moments after it is served),
/// sorted by user id: the group's answer to `/snapshots/{version}/assignments`, for the latest
/// version only (no instance keeps older versions' assignments).
async fn group_assignments_body(
    state: &AppState,
    version: u64,
    csv: bool,
) -> Result<Vec<u8>, ApiError> {
    let latest = state.require_latest()?.snapshot.version;
    if version != latest {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the group's assignments are served for its latest snapshot ({latest}) only: \
                 older versions' are on the assignments topic (<group_id>-assignments) and the \
                 change feed"
            ),
        ));
    }
    let assignments = state.group_assignments.clone();
    tokio::task::spawn_blocking(move || {
        let mut rows: Vec<(String, u32)> = assignments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(user, a)| (user.clone(), a.segment))
            .collect();
        rows.sort_unstable();
        let mut body = if csv {
            b"user,cluster\n".to_vec()
        } else {
            vec![]
        };
        body.extend(encode_assignments(&rows, csv));
        body
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "assignments listing failed",
        )
    })
}

/// A page of a cluster's members in the group's latest snapshot, from the assignments this
/// instance has read, in id order (each page filters and sorts every user: O(users)).
async fn group_members(
    state: &AppState,
    snapshot: &crate::snapshot::Snapshot,
    id: u32,
    cursor: Option<String>,
    limit: usize,
) -> ApiResult {
    let (version, k) = (snapshot.version, snapshot.kmeans.k);
    if id as usize >= k {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no cluster {id} (k = {k})"),
        ));
    }
    let assignments = state.group_assignments.clone();
    let (members, next) = tokio::task::spawn_blocking(move || {
        let mut members: Vec<String> = assignments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(user, a)| {
                a.segment == id && cursor.as_deref().is_none_or(|c| user.as_str() > c)
            })
            .map(|(user, _)| user.clone())
            .collect();
        members.sort_unstable();
        let next = (members.len() > limit).then(|| members[limit - 1].clone());
        members.truncate(limit);
        (members, next)
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "member listing failed"))?;
    Ok(axum::Json(json!({
        "snapshot_version": version,
        "id": id,
        "members": members,
        "next_cursor": next,
    }))
    .into_response())
}

/// `/users/{id}` of a group's snapshot `version`: the segment its assignments topic holds for
/// the user (published by the instance holding the user at that version or an earlier one,
/// when the user's segment last changed).
fn group_user_segment(state: &AppState, id: &str, version: u64) -> ApiResult {
    let a = state.require_group_assignment(id, || {
        format!(
            "unknown user `{}` (not in snapshot {version} of the group)",
            truncate(id)
        )
    })?;
    Ok(axum::Json(json!({
        "user": id,
        "snapshot_version": version,
        "cluster": a.segment,
        "distance": a.distance,
        "assigned_in_version": a.version,
    }))
    .into_response())
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let h = &state.health;
    let ready = h.ready();
    let body = json!({
        "ready": ready,
        "status": h.status(),
        "state_open": h.state_open.load(Relaxed),
        "consuming": h.consuming.load(Relaxed),
        "broker_reachable": h.broker_reachable.load(Relaxed),
        "dead_letters_refused": h.dead_letters_refused.load(Relaxed),
        "partitions_assigned": h.partitions_assigned(),
        "feed_behind": h.feed_behind.load(Relaxed),
        "feed_stopped": h.feed_stopped.load(Relaxed),
        "restoring": h.restoring.load(Relaxed),
        "changelog_behind": h.changelog_behind.load(Relaxed),
        "standby": h.standby.load(Relaxed),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.ready.set(i64::from(state.health.ready()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn page() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        PAGE,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct VersionQuery {
    version: Option<String>,
}

async fn chart(
    State(state): State<Arc<AppState>>,
    ApiPath(file): ApiPath<String>,
    ApiQuery(query): ApiQuery<VersionQuery>,
) -> ApiResult {
    let name = file
        .strip_suffix(".svg")
        .filter(|n| crate::charts::CHART_NAMES.contains(n))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no chart `{}`; charts: {}",
                    truncate(&file),
                    crate::charts::CHART_NAMES
                        .map(|c| format!("{c}.svg"))
                        .join(", ")
                ),
            )
        })?
        .to_string();
    let version = match query.version.as_deref() {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "version must be a non-negative integer, got `{}`",
                    truncate(v)
                ),
            )
        })?),
    };
    let latest = state.latest();
    let version = match (version, &latest) {
        (Some(v), _) => v,
        (None, Some(l)) => l.snapshot.version,
        (None, None) => return Err(ApiError::new(StatusCode::NOT_FOUND, "no snapshot yet")),
    };
    let _turn = state.stored_read_turn().await?;
    let snapshots = state.snapshots.clone();
    // Summaries for the charts over time: at most two whole snapshots are parsed.
    let inputs = tokio::task::spawn_blocking(move || {
        let Some(snapshot) = snapshots.snapshot(version)? else {
            return Ok(None);
        };
        let history = snapshots.summaries(version, CHART_HISTORY)?;
        crate::charts::ChartInputs::gather(snapshot, history, |v| snapshots.snapshot(v)).map(Some)
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "snapshot read failed"))?
    .map_err(|e: crate::store::StoreError| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    })?
    .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no snapshot {version}")))?;
    let svg = inputs.render(&name).unwrap_or_default();
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("image/svg+xml"),
        )],
        svg,
    )
        .into_response())
}

async fn openapi() -> Response {
    json_bytes(OPENAPI.as_bytes().to_vec())
}

async fn list_snapshots(State(state): State<Arc<AppState>>) -> ApiResult {
    let _turn = state.stored_read_turn().await?;
    let snapshots = state.snapshots.clone();
    let infos = tokio::task::spawn_blocking(move || snapshots.snapshot_infos())
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "snapshot listing failed"))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(axum::Json(json!({"snapshots": infos})).into_response())
}

async fn latest_snapshot(State(state): State<Arc<AppState>>) -> ApiResult {
    Ok(json_bytes(state.require_latest()?.snapshot_json.clone()))
}

async fn snapshot_by_version(
    State(state): State<Arc<AppState>>,
    ApiPath(version): ApiPath<String>,
) -> ApiResult {
    let version = parse_version(&version)?;
    if let Some(s) = state.latest().filter(|s| s.snapshot.version == version) {
        return Ok(json_bytes(s.snapshot_json.clone()));
    }
    let _turn = state.stored_read_turn().await?;
    let snapshots = state.snapshots.clone();
    let found = tokio::task::spawn_blocking(move || snapshots.snapshot(version))
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "snapshot read failed"))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    match found {
        Some(s) => Ok(json_bytes(serde_json::to_vec(&s).unwrap_or_default())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no snapshot {version} (it may have been removed by [snapshot] retention)"),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct AssignmentsQuery {
    format: Option<String>,
}

/// Users read from the store, resolved and encoded per piece of an assignments download: the
/// memory a download holds beyond the stored pairs record (8 bytes a user).
const ASSIGNMENT_CHUNK_USERS: usize = 2048;

/// A snapshot's assignments (`user`, `cluster`), in user order, streamed as NDJSON (default) or
/// CSV. `version` may be `latest`. The rows are read from the store a chunk of users at a time
/// as the client takes them; a download not finished by `[http] stored_read_deadline_ms` is cut
/// off with the connection aborted, so the client sees an error rather than a clean end.
async fn snapshot_assignments(
    State(state): State<Arc<AppState>>,
    ApiPath(version): ApiPath<String>,
    ApiQuery(query): ApiQuery<AssignmentsQuery>,
) -> ApiResult {
    let csv = match query.format.as_deref() {
        None | Some("ndjson") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("format must be ndjson or csv, got `{}`", truncate(other)),
            ));
        }
    };
    let version = match version.as_str() {
        "latest" => state.require_latest()?.snapshot.version,
        v => parse_version(v)?,
    };
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    if state.group_mode {
        let body = group_assignments_body(&state, version, csv).await?;
        return Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response());
    }
    let turn = state.stored_read_turn().await?;
    let deadline = tokio::time::Instant::now() + state.stored_read_deadline;
    let snapshots = state.snapshots.clone();
    let found = tokio::task::spawn_blocking(move || snapshots.assignment_chunks(version))
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "assignments read failed"))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let chunks = found.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no snapshot {version} (it may have been removed by [snapshot] retention)"),
        )
    })?;
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        assignments_body(chunks, csv, turn, deadline),
    )
        .into_response())
}

/// What an assignments download keeps between pieces.
struct Download {
    /// The stored assignments still to send; emptied at the deadline, so a connection the
    /// client stopped reading holds no stored data past it.
    rows: Arc<std::sync::Mutex<Option<AssignmentChunks>>>,
    header: Option<Vec<u8>>,
    csv: bool,
    deadline: tokio::time::Instant,
    /// Dropped with the download (finished, failed or abandoned): the turn is given back then.
    _finished: tokio::sync::oneshot::Sender<()>,
}

/// The error that ends a body cut short: hyper then aborts the connection without the
/// chunked terminator, so the client sees the download fail instead of a clean, short end.
fn cut_short(why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("assignments download cut short: {why}"))
}

/// The body of an assignments download: pieces read from `rows` as the client takes them, ended
/// by an error (the connection aborted) at `deadline`. The `turn` is held until the download
/// ends or the deadline passes, whichever is first, even if the client never reads again (the
/// server then stops asking for pieces, so the body alone could not notice).
fn assignments_body(
    rows: AssignmentChunks,
    csv: bool,
    turn: tokio::sync::OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
) -> axum::body::Body {
    let rows = Arc::new(std::sync::Mutex::new(Some(rows)));
    let (finished, until_finished) = tokio::sync::oneshot::channel::<()>();
    let expiring = rows.clone();
    tokio::spawn(async move {
        let _turn = turn;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if let Ok(mut rows) = expiring.lock() {
                    rows.take();
                }
            }
            _ = until_finished => {}
        }
    });
    let download = Download {
        rows,
        header: csv.then(|| b"user,cluster\n".to_vec()),
        csv,
        deadline,
        _finished: finished,
    };
    axum::body::Body::from_stream(futures_util::stream::unfold(
        Some(download),
        |download| async move {
            let mut download = download?;
            if tokio::time::Instant::now() >= download.deadline {
                return Some((
                    Err(cut_short("[http] stored_read_deadline_ms passed")),
                    None,
                ));
            }
            if let Some(header) = download.header.take() {
                return Some((Ok(header), Some(download)));
            }
            let taken = download.rows.lock().ok().and_then(|mut rows| rows.take());
            let Some(mut rows) = taken else {
                return Some((
                    Err(cut_short("[http] stored_read_deadline_ms passed")),
                    None,
                ));
            };
            let csv = download.csv;
            let read = tokio::task::spawn_blocking(move || {
                let piece = rows
                    .next_chunk(ASSIGNMENT_CHUNK_USERS)
                    .map(|chunk| chunk.map(|chunk| encode_assignments(&chunk, csv)));
                (rows, piece)
            })
            .await;
            match read {
                Ok((rows, Ok(Some(piece)))) => {
                    // Put back only before the deadline, under the lock the expiry takes too:
                    // past it the rows are dropped here, not kept by a stalled connection.
                    if let Ok(mut slot) = download.rows.lock()
                        && tokio::time::Instant::now() < download.deadline
                    {
                        *slot = Some(rows);
                    }
                    Some((Ok(piece), Some(download)))
                }
                Ok((_, Ok(None))) => None,
                Ok((_, Err(e))) => Some((Err(cut_short(e)), None)),
                Err(e) => Some((Err(cut_short(e)), None)),
            }
        },
    ))
}

/// `field` as one CSV field: quoted (quotes doubled) when it holds a comma, a quote or a line
/// break, as RFC 4180 has it.
fn push_csv_field(out: &mut Vec<u8>, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        out.push(b'"');
        out.extend_from_slice(field.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(field.as_bytes());
    }
}

/// Assignments as NDJSON lines or CSV rows (the CSV header is sent first, apart).
fn encode_assignments(assignments: &[(String, u32)], csv: bool) -> Vec<u8> {
    let mut piece = Vec::with_capacity(assignments.len() * 32);
    for (user, cluster) in assignments {
        if csv {
            push_csv_field(&mut piece, user);
            let _ = writeln!(piece, ",{cluster}");
        } else {
            let line = json!({"user": user, "cluster": cluster});
            let _ = serde_json::to_writer(&mut piece, &line);
            piece.push(b'\n');
        }
    }
    piece
}

#[derive(Debug, Deserialize)]
struct LimitQuery {
    limit: Option<String>,
}

fn parse_limit(raw: Option<&str>, default: usize) -> Result<usize, ApiError> {
    match raw {
        None => Ok(default),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}, got `{}`",
                    truncate(s)
                ),
            )),
        },
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[derive(Debug, Deserialize)]
struct MembersQuery {
    cursor: Option<String>,
    limit: Option<String>,
}

/// One page of a cluster's members at the latest snapshot, in id order.
async fn cluster_members(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<MembersQuery>,
) -> ApiResult {
    let limit = parse_limit(query.limit.as_deref(), 100)?;
    let id = parse_cluster_id(&id)?;
    let latest = state.require_latest()?;
    if state.group_mode {
        return group_members(&state, &latest.snapshot, id, query.cursor, limit).await;
    }
    // The first listing of a snapshot sorts every member id: not on an async worker.
    let version = latest.snapshot.version;
    let k = latest.snapshot.kmeans.k;
    let body = tokio::task::spawn_blocking(move || {
        latest
            .members(id, query.cursor.as_deref(), limit)
            .map(|(members, next)| {
                json!({
                    "snapshot_version": version,
                    "id": id,
                    "members": members,
                    "next_cursor": next,
                })
            })
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "member listing failed"))?
    .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no cluster {id} (k = {k})")))?;
    Ok(axum::Json(body).into_response())
}

fn parse_version(version: &str) -> Result<u64, ApiError> {
    version.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "snapshot version must be a non-negative integer or `latest`, got `{}`",
                truncate(version)
            ),
        )
    })
}

fn parse_cluster_id(id: &str) -> Result<u32, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "cluster id must be a non-negative integer, got `{}`",
                truncate(id)
            ),
        )
    })
}

async fn cluster(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<LimitQuery>,
) -> ApiResult {
    let limit = parse_limit(query.limit.as_deref(), 10)?;
    let id = parse_cluster_id(&id)?;
    let latest = state.require_latest()?;
    let profile = latest
        .snapshot
        .clusters
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no cluster {id} (k = {})", latest.snapshot.kmeans.k),
            )
        })?;
    let body = json!({
        "snapshot_version": latest.snapshot.version,
        "id": profile.id,
        "size": profile.size,
        "centroid": profile.centroid,
        "n_items": profile.n_items,
        "top_items": profile.top_items.iter().take(limit).collect::<Vec<_>>(),
    });
    Ok(axum::Json(body).into_response())
}

#[derive(Debug, Deserialize)]
struct UserQuery {
    items: Option<String>,
}

/// Snapshots a history covers unless `limit` says otherwise.
const HISTORY_DEFAULT: usize = 20;
/// Largest `limit` of a history: each snapshot it covers is one stored assignments record read.
const MAX_HISTORY: usize = 100;

/// The user's segment in the newest `limit` retained snapshots, oldest first. Older snapshots
/// are not read: the work is bounded by `limit`, whatever the retention.
async fn user_history(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<LimitQuery>,
) -> ApiResult {
    check_user_id(&id)?;
    state.refuse_group_history()?;
    let limit = match query.limit.as_deref() {
        None => HISTORY_DEFAULT,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=MAX_HISTORY).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "limit must be an integer from 1 to {MAX_HISTORY}, got `{}`",
                        truncate(raw)
                    ),
                ));
            }
        },
    };
    let latest = state.require_latest()?;
    let index = latest.engine_index(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown user `{}` (not in snapshot {})",
                truncate(&id),
                latest.snapshot.version
            ),
        )
    })?;
    let _turn = state.stored_read_turn().await?;
    let snapshots = state.snapshots.clone();
    let history = tokio::task::spawn_blocking(move || snapshots.recent_user_history(index, limit))
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "history read failed"))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(axum::Json(json!({"user": id, "history": history})).into_response())
}

fn check_user_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("user id must be 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    Ok(())
}

async fn user(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<UserQuery>,
) -> ApiResult {
    check_user_id(&id)?;
    let items = parse_limit(query.items.as_deref(), 10)?;
    let latest = state.require_latest()?;
    if state.group_mode {
        return group_user_segment(&state, &id, latest.snapshot.version);
    }
    match latest.user(&id, items) {
        Some(segment) => Ok(axum::Json(segment).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown user `{}` (not in snapshot {})",
                truncate(&id),
                latest.snapshot.version
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::engine::Engine;

    #[test]
    fn assignments_encode_as_ndjson_or_csv() {
        let assignments: Vec<(String, u32)> = (0..2_000)
            .map(|i| (format!("u{i}"), i % 7))
            .chain([("a,b \"c\"".to_string(), 3)])
            .collect();
        let text = String::from_utf8(encode_assignments(&assignments, false)).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), assignments.len());
        assert_eq!(lines[5], json!({"user": "u5", "cluster": 5}));
        assert_eq!(lines[2_000]["user"], "a,b \"c\"");

        let mut csv = b"user,cluster\n".to_vec();
        csv.extend(encode_assignments(&assignments, true));
        let mut reader = ::csv::Reader::from_reader(csv.as_slice());
        let rows: Vec<(String, u32)> = reader.deserialize().map(|r| r.unwrap()).collect();
        assert_eq!(rows, assignments);
        assert!(encode_assignments(&[], true).is_empty());
    }

    use crate::snapshot::test_support::small_engine;

    /// Snapshot `version` of `engine` and the serving copy of it.
    fn snapshot_of(engine: &Engine, version: u64) -> (crate::snapshot::Snapshot, Serving) {
        let titles = rustc_hash::FxHashMap::default();
        let mut input = crate::snapshot::BuildInput::standalone(&titles, false);
        input.version = version;
        let view = engine.view();
        let built = crate::snapshot::build_with_model(&view, &Default::default(), input)
            .expect("enough data for a snapshot");
        let snapshot = built.snapshot.clone();
        let serving = Serving::new(&view, &built.model, built.snapshot, titles);
        (snapshot, serving)
    }

    /// The API over a store of its own, on a runtime of its own.
    struct Served {
        state: Arc<AppState>,
        addr: SocketAddr,
        _runtime: tokio::runtime::Runtime,
        _stores: crate::store::Stores,
        _dir: tempfile::TempDir,
    }

    /// Serves a store whose snapshot 1 assigns `users` users with ids of about `id_bytes`
    /// bytes (user `u` in cluster `u % 5`), stored reads cut at `deadline`.
    fn serve_assignments(users: usize, id_bytes: usize, deadline: Duration) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let stores = crate::store::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..users)
            .map(|u| format!("{u:08}-{}", "x".repeat(id_bytes)))
            .collect();
        stores.snapshots.put_user_ids_for_tests(&ids).unwrap();
        let labels: Vec<u32> = (0..users).map(|u| (u % 5) as u32).collect();
        let (snapshot, _) = snapshot_of(&small_engine(), 1);
        stores
            .snapshots
            .put_snapshot(&snapshot, &labels, 10)
            .unwrap();
        serve(stores, dir, None, deadline)
    }

    fn serve(
        stores: crate::store::Stores,
        dir: tempfile::TempDir,
        latest: Option<Serving>,
        deadline: Duration,
    ) -> Served {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(AppState {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
            serving: Arc::new(RwLock::new(latest.map(Arc::new))),
            snapshots: stores.snapshots.clone(),
            token: None,
            stored_reads: AppState::stored_read_turns(),
            stored_read_deadline: deadline,
            group: Default::default(),
            group_assignments: Default::default(),
            group_mode: false,
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let _guard = runtime.enter();
        serve_on(listener, state.clone(), std::future::pending());
        Served {
            state,
            addr,
            _runtime: runtime,
            _stores: stores,
            _dir: dir,
        }
    }

    /// Polls `condition` until it holds; panics naming `what` after a minute.
    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let give_up = Instant::now() + Duration::from_secs(60);
        while !condition() {
            assert!(Instant::now() < give_up, "waited a minute for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A raw GET of `path` whose response head has been read (the rest is left unread): the
    /// head and what came with it.
    fn start_download(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut got = vec![];
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed before the response head");
            got.extend_from_slice(&buf[..n]);
        }
        (stream, got)
    }

    /// The rest of a response until the server closes the connection (an abort included).
    fn read_rest(mut stream: TcpStream, mut got: Vec<u8>) -> Vec<u8> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The end of a complete chunked body.
    const CHUNKED_END: &[u8] = b"\r\n0\r\n\r\n";

    fn ndjson_lines(response: &[u8]) -> usize {
        response
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"{") && l.ends_with(b"}"))
            .count()
    }

    #[test]
    fn a_download_read_promptly_is_complete_and_in_user_order() {
        let served = serve_assignments(5_000, 20, Duration::from_secs(60));
        let (stream, head) = start_download(served.addr, "/snapshots/1/assignments");
        assert!(head.starts_with(b"HTTP/1.1 200"));
        let response = read_rest(stream, head);
        assert!(response.ends_with(CHUNKED_END), "a clean end");
        assert_eq!(ndjson_lines(&response), 5_000);
        let (stream, head) = start_download(served.addr, "/snapshots/1/assignments?format=csv");
        let response = String::from_utf8(read_rest(stream, head)).unwrap();
        let rows: Vec<&str> = response.lines().filter(|l| l.contains("-xxx")).collect();
        assert_eq!(rows.len(), 5_000);
        assert!(rows[0].starts_with("00000000-") && rows[0].ends_with(",0"));
        assert!(rows[4_999].starts_with("00004999-") && rows[4_999].ends_with(",4"));
        wait_until("every turn given back", || {
            served.state.stored_reads.available_permits() == STORED_READS_IN_FLIGHT
        });
    }

    #[test]
    fn a_download_stalled_past_the_deadline_is_aborted_never_ended_cleanly() {
        // About 14 MB of NDJSON: more than the socket buffers hold while the client waits.
        let users = 60_000;
        let served = serve_assignments(users, 200, Duration::from_secs(1));
        let (stream, head) = start_download(served.addr, "/snapshots/1/assignments");
        assert!(head.starts_with(b"HTTP/1.1 200"));
        // The client stops reading; the server gives the turn back at the deadline...
        wait_until("the stalled download's turn given back", || {
            served.state.stored_reads.available_permits() == STORED_READS_IN_FLIGHT
        });
        // ...and a client that reads on finds the download cut off, not ended.
        let response = read_rest(stream, head);
        assert!(
            !response.ends_with(CHUNKED_END),
            "the body must not end cleanly"
        );
        assert!(ndjson_lines(&response) < users);
    }

    #[test]
    fn slow_readers_holding_every_turn_keep_others_out_only_until_the_deadline() {
        let served = serve_assignments(60_000, 200, Duration::from_secs(1));
        let stalled: Vec<(TcpStream, Vec<u8>)> = (0..STORED_READS_IN_FLIGHT)
            .map(|_| start_download(served.addr, "/snapshots/1/assignments"))
            .collect();
        assert_eq!(
            served.state.stored_reads.available_permits(),
            0,
            "the stalled downloads hold every turn"
        );
        let (status, body) = match ureq::get(&format!("http://{}/snapshots", served.addr)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET /snapshots: {e}"),
        };
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["snapshots"][0]["version"],
            1
        );
        for (stream, head) in stalled {
            assert!(!read_rest(stream, head).ends_with(CHUNKED_END));
        }
    }

    #[test]
    fn a_download_streams_rows_before_the_whole_list_is_read() {
        // The last user's id is missing from the store: a list built whole before the first
        // byte fails outright; a stream sends the rows before it, then aborts where it breaks.
        let users = 10_000;
        let dir = tempfile::tempdir().unwrap();
        let stores = crate::store::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..users - 1).map(|u| format!("user{u}")).collect();
        stores.snapshots.put_user_ids_for_tests(&ids).unwrap();
        let (snapshot, _) = snapshot_of(&small_engine(), 1);
        stores
            .snapshots
            .put_snapshot(&snapshot, &vec![1; users], 10)
            .unwrap();
        let served = serve(stores, dir, None, Duration::from_secs(60));
        let (stream, head) = start_download(served.addr, "/snapshots/1/assignments");
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let response = read_rest(stream, head);
        assert!(!response.ends_with(CHUNKED_END), "cut short, not ended");
        let sent = ndjson_lines(&response);
        assert!(
            sent >= ASSIGNMENT_CHUNK_USERS && sent < users,
            "{sent} rows"
        );
    }

    #[test]
    fn a_history_covers_the_newest_limit_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let stores = crate::store::open(dir.path()).unwrap();
        let engine = small_engine();
        let mut latest = None;
        for v in 1..=5 {
            let (snapshot, serving) = snapshot_of(&engine, v);
            // User 3 (`u3`) is in cluster v % 2 in snapshot v.
            let labels: Vec<u32> = (0..20).map(|u| (u + v as u32 % 2) % 2).collect();
            stores
                .snapshots
                .put_snapshot(&snapshot, &labels, 50)
                .unwrap();
            latest = Some(serving);
        }
        let served = serve(stores, dir, latest, Duration::from_secs(60));
        let get = |path: &str| -> (u16, String) {
            let url = format!("http://{}{path}", served.addr);
            match ureq::get(&url).call() {
                Ok(r) => (r.status(), r.into_string().unwrap()),
                Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
                Err(e) => panic!("GET {path}: {e}"),
            }
        };
        let get = |path: &str| {
            let (status, body) = get(path);
            (
                status,
                serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            )
        };
        let versions = |history: &serde_json::Value| -> Vec<(u64, u64)> {
            history["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h["version"].as_u64().unwrap(),
                        h["cluster"].as_u64().unwrap(),
                    )
                })
                .collect()
        };
        let (status, body) = get("/users/u3/history?limit=2");
        assert_eq!(status, 200, "{body}");
        assert_eq!(versions(&body), vec![(4, 1), (5, 0)]);
        let (status, body) = get("/users/u3/history");
        assert_eq!(status, 200);
        assert_eq!(versions(&body).len(), 5, "the default covers all 5");
        for bad in ["0", "101", "x", "-1"] {
            let (status, body) = get(&format!("/users/u3/history?limit={bad}"));
            assert_eq!(status, 400, "limit={bad}: {body}");
            assert!(body["error"].as_str().unwrap().contains("limit"));
        }
    }
}
