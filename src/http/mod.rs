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
use crate::store::SnapshotStore;
use crate::telemetry::Metrics;
use serving::Serving;

/// The OpenAPI document of every route, kept in the repo.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");
/// The live page at `/`: one self-contained file, no CDN, no fonts.
const PAGE: &str = include_str!("page.html");
/// Snapshots shown by the charts over time.
const CHART_HISTORY: usize = 20;

/// Requests that read stored snapshots (charts, the snapshot list, an old version) run at most
/// this many at once; the others wait their turn, so memory stays flat under any load.
const STORED_READS_IN_FLIGHT: usize = 4;
/// How long such a request waits for its turn before it is answered 503.
const STORED_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
static STORED_READS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(STORED_READS_IN_FLIGHT);

/// A turn to read stored snapshots, or the documented 503 when none comes in time.
async fn stored_read_turn() -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
    match tokio::time::timeout(STORED_READ_WAIT, STORED_READS.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests for stored snapshots in flight; retry shortly",
        )),
    }
}

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
}

impl AppState {
    fn latest(&self) -> Option<Arc<Serving>> {
        self.serving.read().ok().and_then(|s| s.clone())
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
    let app = router(state);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%e, "HTTP server failed");
        }
    }))
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

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let h = &state.health;
    let ready = h.ready();
    let body = json!({
        "ready": ready,
        "state_open": h.state_open.load(Relaxed),
        "consuming": h.consuming.load(Relaxed),
        "broker_reachable": h.broker_reachable.load(Relaxed),
        "dead_letters_refused": h.dead_letters_refused.load(Relaxed),
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
    let _turn = stored_read_turn().await?;
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
    let _turn = stored_read_turn().await?;
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
    let _turn = stored_read_turn().await?;
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

/// Assignments go out in pieces of about this many bytes.
const ASSIGNMENT_CHUNK_BYTES: usize = 64 * 1024;
/// How long a client may stop reading assignments before the response is dropped.
const ASSIGNMENT_SEND_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A snapshot's assignments (`user`, `cluster`), in user order, streamed as NDJSON (default) or
/// CSV. `version` may be `latest`.
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
    let turn = stored_read_turn().await?;
    let snapshots = state.snapshots.clone();
    let found = tokio::task::spawn_blocking(move || snapshots.assignments(version))
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "assignments read failed"))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let assignments = found.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no snapshot {version} (it may have been removed by [snapshot] retention)"),
        )
    })?;
    let (pieces, received) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::spawn(async move {
        // The turn is held until the last piece is handed over, or until the client stops
        // reading for ASSIGNMENT_SEND_WAIT: a stalled download must not hold it for ever.
        let _turn = turn;
        for rows in encode_assignments(&assignments, csv) {
            match tokio::time::timeout(ASSIGNMENT_SEND_WAIT, pieces.send(Ok(rows))).await {
                Ok(Ok(())) => {}
                _ => return, // the client went away or stalled: the response ends cut short
            }
        }
    });
    let body = axum::body::Body::from_stream(futures_util::stream::unfold(
        received,
        |mut received| async move { received.recv().await.map(|piece| (piece, received)) },
    ));
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response())
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

/// Assignments as NDJSON lines or CSV rows (with a header), in pieces of about
/// [`ASSIGNMENT_CHUNK_BYTES`].
fn encode_assignments(
    assignments: &[(String, u32)],
    csv: bool,
) -> impl Iterator<Item = Vec<u8>> + '_ {
    let header = csv.then(|| b"user,cluster\n".to_vec());
    let mut rows = assignments.iter().peekable();
    let pieces = std::iter::from_fn(move || {
        rows.peek()?;
        let mut piece = Vec::with_capacity(ASSIGNMENT_CHUNK_BYTES + 512);
        while piece.len() < ASSIGNMENT_CHUNK_BYTES {
            let Some((user, cluster)) = rows.next() else {
                break;
            };
            if csv {
                push_csv_field(&mut piece, user);
                let _ = writeln!(piece, ",{cluster}");
            } else {
                let line = json!({"user": user, "cluster": cluster});
                let _ = serde_json::to_writer(&mut piece, &line);
                piece.push(b'\n');
            }
        }
        Some(piece)
    });
    header.into_iter().chain(pieces)
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

/// The user's segment in every retained snapshot, oldest first.
async fn user_history(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult {
    check_user_id(&id)?;
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
    let _turn = stored_read_turn().await?;
    let snapshots = state.snapshots.clone();
    let history = tokio::task::spawn_blocking(move || snapshots.user_history(index))
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
    use super::*;

    #[test]
    fn assignments_encode_as_ndjson_or_csv_in_pieces() {
        let assignments: Vec<(String, u32)> = (0..20_000)
            .map(|i| (format!("u{i}"), i % 7))
            .chain([("a,b \"c\"".to_string(), 3)])
            .collect();
        let ndjson: Vec<Vec<u8>> = encode_assignments(&assignments, false).collect();
        assert!(ndjson.len() > 1, "several pieces");
        let text = String::from_utf8(ndjson.concat()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), assignments.len());
        assert_eq!(lines[5], json!({"user": "u5", "cluster": 5}));
        assert_eq!(lines[20_000]["user"], "a,b \"c\"");

        let csv = String::from_utf8(
            encode_assignments(&assignments, true)
                .collect::<Vec<_>>()
                .concat(),
        )
        .unwrap();
        let mut reader = ::csv::Reader::from_reader(csv.as_bytes());
        let rows: Vec<(String, u32)> = reader.deserialize().map(|r| r.unwrap()).collect();
        assert_eq!(rows, assignments);
        assert_eq!(encode_assignments(&[], true).count(), 1, "a header only");
        assert_eq!(encode_assignments(&[], false).count(), 0);
    }
}
