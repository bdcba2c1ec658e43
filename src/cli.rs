//! Command-line interface: argument parsing and dispatch to the library. Exit codes: 0 success,
//! 1 runtime failure (I/O, state), 2 bad usage or configuration.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::bench;
use crate::config::{Config, LogFormat};
use crate::decode::FileFormat;
use crate::event::Mode;
use crate::generator::{self, GeneratorParams};
use crate::replay::{self, ReplayOptions};
use crate::snapshot::report::seed_report;

#[derive(Debug, Parser)]
#[command(
    name = "segmenter",
    version,
    about = "Streaming, incremental customer segmentation"
)]
pub struct Cli {
    /// Config file (TOML). Without it the built-in defaults apply (the same as
    /// config/segmenter.toml); SEGMENTER_<SECTION>__<KEY> variables override either.
    #[arg(long, global = true, env = "SEGMENTER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream a ratings file through the engine in timestamp order, then build, store and
    /// print the final snapshot.
    Replay {
        /// Ratings file: MovieLens u.data, CSV with a header, or JSON lines.
        #[arg(long)]
        ratings: PathBuf,
        /// Item catalogue: MovieLens u.item, or CSV/TSV `item,title`.
        #[arg(long)]
        items: Option<PathBuf>,
        /// File layout; guessed from the extension when absent (.csv, .json/.jsonl, else movielens).
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Overrides [model] components.
        #[arg(long)]
        components: Option<usize>,
        /// Overrides [model] clusters.
        #[arg(long)]
        clusters: Option<usize>,
        /// Overrides [state] dir.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Write the snapshot JSON here.
        #[arg(long)]
        snapshot_out: Option<PathBuf>,
        /// Write the assignments here as CSV `user,cluster`.
        #[arg(long)]
        assignments_out: Option<PathBuf>,
        /// Items printed per cluster in the report.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Run the service: consume rating events from Kafka ([kafka] in the config) into the state
    /// dir, taking snapshots, until SIGTERM/SIGINT. With --demo, consume an endless generated
    /// stream with planted segments instead (no broker needed).
    Run {
        /// Use the generated demo stream instead of Kafka.
        #[arg(long)]
        demo: bool,
        /// Overrides [state] dir (demo default: a fresh temporary directory, removed at exit).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Demo only: stop the stream after this many events.
        #[arg(long)]
        max_events: Option<u64>,
        /// Demo only: once the stream stopped (--max-events), keep serving the HTTP API until
        /// Ctrl-C/SIGTERM.
        #[arg(long, requires = "max_events")]
        keep_serving: bool,
        /// Stop gracefully once this many valid events have been applied in total (state dir
        /// included): for loading history and for benchmarks.
        #[arg(long)]
        exit_at_events: Option<u64>,
    },
    /// Load a ratings file (and a catalogue) into Kafka topics, key = user id, in timestamp order.
    Produce {
        /// Bootstrap servers (default: [kafka] brokers).
        #[arg(long)]
        brokers: Option<String>,
        /// Ratings topic (default: [kafka] topic).
        #[arg(long)]
        topic: Option<String>,
        #[arg(long)]
        ratings: PathBuf,
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Item catalogue to load into --items-topic as {"item","title"} records.
        #[arg(long, requires = "items_topic")]
        items: Option<PathBuf>,
        #[arg(long)]
        items_topic: Option<String>,
        /// Create missing topics with this many partitions (catalogue: 1).
        #[arg(long)]
        partitions: Option<i32>,
    },
    /// Read snapshots from a running service (--url) or from a state dir (--state-dir, while
    /// no service holds it), and print the seed-style report or JSON.
    Snapshot {
        #[command(subcommand)]
        which: SnapshotCommand,
        /// Base URL of a running service, e.g. http://127.0.0.1:9464.
        #[arg(long, global = true, conflicts_with = "state_dir")]
        url: Option<String>,
        /// A state dir to read directly (default: [state] dir when --url is absent).
        #[arg(long, global = true)]
        state_dir: Option<PathBuf>,
        /// Print JSON instead of the report.
        #[arg(long, global = true)]
        json: bool,
        /// Bearer token for --url (default: [http] token / SEGMENTER_HTTP__TOKEN).
        #[arg(long, global = true)]
        token: Option<String>,
        /// Items per cluster in the report.
        #[arg(long, global = true, default_value_t = 10)]
        top: usize,
    },
    /// Write a self-contained HTML report (charts, figures, cluster profiles) of a snapshot,
    /// from a running service (--url) or a state dir; it opens offline.
    Report {
        /// Directory to write index.html (and one SVG per chart) into.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, conflicts_with = "state_dir")]
        url: Option<String>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        token: Option<String>,
        /// Snapshot version (default: the latest).
        #[arg(long)]
        version: Option<u64>,
        /// Items per cluster profile.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Write a generated ratings file with planted segments (and its ground truth).
    Generate {
        #[arg(long, default_value_t = 943)]
        users: usize,
        #[arg(long, default_value_t = 1682)]
        items: usize,
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        #[arg(long, default_value_t = 12)]
        segments: usize,
        /// Probability that an event picks from the user's segment's items (separation).
        #[arg(long, default_value_t = 0.8)]
        affinity: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = Mode::Explicit)]
        mode: Mode,
        /// Output ratings file; `.json`/`.jsonl` writes JSON lines, anything else CSV
        /// `user,item,rating,ts`.
        #[arg(long)]
        out: PathBuf,
        /// Write the planted segments as CSV `user,segment`.
        #[arg(long)]
        truth_out: Option<PathBuf>,
        /// Write the item catalogue as CSV `item,title`.
        #[arg(long)]
        items_out: Option<PathBuf>,
    },
    /// Measure engine throughput and snapshot build time on generated streams.
    Bench {
        #[arg(long, value_enum)]
        shape: Vec<bench::Shape>,
        #[arg(long, default_value_t = 10_000)]
        batch_size: usize,
        /// Periodic refresh interval in events (default: per shape, about 5 refreshes per run).
        #[arg(long)]
        refresh_every: Option<u64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// The latest snapshot.
    Latest,
    /// One snapshot by version.
    Show { version: u64 },
    /// Stored snapshots with their times and counts.
    List,
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn wait_for_stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

fn init_tracing(config: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::try_new(&config.log.level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Parses arguments, loads the config and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match &cli.command {
        Command::Replay {
            components,
            clusters,
            state_dir,
            ..
        } => {
            if let Some(c) = components {
                config.model.components = *c;
                config.model.curve_components = config.model.curve_components.max(*c);
            }
            if let Some(k) = clusters {
                config.model.clusters = *k;
            }
            if let Some(dir) = state_dir {
                config.state.dir = dir.clone();
            }
            if let Err(e) = config.validate() {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
        Command::Run {
            demo: false,
            state_dir: Some(dir),
            ..
        } => config.state.dir = dir.clone(),
        Command::Run { demo: true, .. } => {
            if let Err(e) = config.validate_demo() {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
        Command::Run { .. }
        | Command::Report { .. }
        | Command::Snapshot { .. }
        | Command::Produce { .. }
        | Command::Generate { .. }
        | Command::Bench { .. } => {}
    }
    init_tracing(&config);
    match run(cli.command, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command, config: &Config) -> anyhow::Result<()> {
    match command {
        Command::Replay {
            ratings,
            items,
            format,
            snapshot_out,
            assignments_out,
            top,
            ..
        } => {
            let format = format.unwrap_or_else(|| FileFormat::guess(&ratings));
            let outcome = replay::replay(
                config,
                &ReplayOptions {
                    ratings,
                    items,
                    format,
                    snapshot_out,
                    assignments_out,
                    progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                },
            )?;
            eprintln!(
                "replayed {} events ({} skipped as already applied), {}",
                outcome.applied,
                outcome.skipped,
                outcome.rejected.summary()
            );
            for (line, message) in &outcome.rejected.examples {
                eprintln!("  record {line}: {message}");
            }
            if outcome.catalogue_bad_lines > 0 {
                eprintln!(
                    "item catalogue: {} unreadable lines skipped",
                    outcome.catalogue_bad_lines
                );
            }
            match &outcome.snapshot {
                Some((snap, _)) => print!("{}", seed_report(snap, top)),
                None => eprintln!(
                    "not enough data for a snapshot yet: need at least {} items and {} users",
                    config.model.components, config.model.clusters
                ),
            }
            Ok(())
        }
        Command::Run {
            demo: true,
            state_dir,
            max_events,
            keep_serving,
            ..
        } => {
            let shutdown = Arc::new(AtomicBool::new(false));
            let flag = shutdown.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.spawn(async move {
                wait_for_stop_signal().await;
                tracing::info!("stopping: finishing the current batch");
                flag.store(true, Ordering::Relaxed);
            });
            let temp;
            let dir = match state_dir {
                Some(d) => d,
                None => {
                    temp = tempfile::Builder::new()
                        .prefix("segmenter-demo-")
                        .tempdir()?;
                    temp.path().to_path_buf()
                }
            };
            let store = std::sync::Arc::new(
                crate::config::StateConfig {
                    dir,
                    ..config.state.clone()
                }
                .open()?,
            );
            let shared = crate::service::Shared::default();
            let listen = config.http.listen_addr()?;
            let summary = runtime.block_on(async {
                let state = std::sync::Arc::new(crate::http::AppState {
                    metrics: shared.metrics.clone(),
                    health: shared.health.clone(),
                    serving: shared.serving.clone(),
                    store: store.clone(),
                    token: config.http.token(),
                });
                let (stop_http, mut http_stopped) = tokio::sync::watch::channel(false);
                let server = crate::http::serve(listen, state, async move {
                    let _ = http_stopped.wait_for(|v| *v).await;
                })
                .await?;
                let (config, shutdown, store, shared) = (
                    config.clone(),
                    shutdown.clone(),
                    store.clone(),
                    shared.clone(),
                );
                let stopped = shutdown.clone();
                let summary = tokio::task::spawn_blocking(move || {
                    crate::demo::run_demo(&config, &store, max_events, &shutdown, &shared)
                })
                .await;
                if keep_serving && !stopped.load(Ordering::Relaxed) {
                    tracing::info!("stream stopped; still serving the HTTP API until Ctrl-C");
                    wait_for_stop_signal().await;
                }
                let _ = stop_http.send(true);
                let _ = server.await;
                anyhow::Ok(summary??)
            })?;
            eprintln!(
                "demo stopped after {} events and {} snapshots (last version {:?})",
                summary.events_applied, summary.snapshots, summary.last_version
            );
            Ok(())
        }
        Command::Run {
            demo: false,
            exit_at_events,
            ..
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    wait_for_stop_signal().await;
                    let _ = stop_tx.send(true);
                });
                crate::service::run(
                    config.clone(),
                    stop_rx,
                    crate::service::RunOptions { exit_at_events },
                    crate::service::Shared::default(),
                )
                .await
            })?;
            Ok(())
        }
        Command::Produce {
            brokers,
            topic,
            ratings,
            format,
            items,
            items_topic,
            partitions,
        } => {
            let options = crate::kafka::produce::ProduceOptions {
                brokers: brokers.unwrap_or_else(|| config.kafka.brokers.clone()),
                topic: topic.unwrap_or_else(|| config.kafka.topic.clone()),
                format: format.unwrap_or_else(|| FileFormat::guess(&ratings)),
                ratings,
                items,
                items_topic,
                partitions,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let started = std::time::Instant::now();
            let outcome = runtime.block_on(crate::kafka::produce::produce(config, &options))?;
            eprintln!(
                "produced {} events to {} ({} catalogue records) in {:.1} s; {}",
                outcome.produced,
                options.topic,
                outcome.items_produced,
                started.elapsed().as_secs_f64(),
                outcome.rejected.summary()
            );
            Ok(())
        }
        Command::Snapshot {
            which,
            url,
            state_dir,
            json,
            token,
            top,
        } => {
            let source = SnapshotSource::new(url, state_dir, token, config);
            match which {
                SnapshotCommand::List => {
                    let list = source.list()?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else {
                        println!(
                            "{:>8}  {:<22}  {:>9}  {:>10}  {:>14}",
                            "version", "created_at", "users", "ratings", "events_applied"
                        );
                        for s in list {
                            println!(
                                "{:>8}  {:<22}  {:>9}  {:>10}  {:>14}",
                                s.version, s.created_at, s.users, s.ratings, s.events_applied
                            );
                        }
                    }
                }
                SnapshotCommand::Latest | SnapshotCommand::Show { .. } => {
                    let version = match which {
                        SnapshotCommand::Show { version } => Some(version),
                        _ => None,
                    };
                    let snapshot = source.snapshot(version)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&snapshot)?);
                    } else {
                        print!("{}", seed_report(&snapshot, top));
                    }
                }
            }
            Ok(())
        }
        Command::Report {
            out,
            url,
            state_dir,
            token,
            version,
            top,
        } => {
            let source = SnapshotSource::new(url, state_dir, token, config);
            let snapshot = source.snapshot(version)?;
            let history = source.summaries(snapshot.version, 20)?;
            let charts = crate::charts::ChartInputs::gather(snapshot, history, |v| {
                source.snapshot(Some(v)).map(Some)
            })?;
            let snapshot = &charts.snapshot;
            std::fs::create_dir_all(&out)?;
            let html = crate::report::html_report(&charts, top);
            std::fs::write(out.join("index.html"), html)?;
            for name in crate::charts::CHART_NAMES {
                if let Some(svg) = charts.render(name) {
                    std::fs::write(out.join(format!("{name}.svg")), svg)?;
                }
            }
            eprintln!(
                "wrote the report of snapshot v{} to {}",
                snapshot.version,
                out.join("index.html").display()
            );
            Ok(())
        }
        Command::Generate {
            users,
            items,
            events,
            segments,
            affinity,
            seed,
            mode,
            out,
            truth_out,
            items_out,
        } => {
            let params = GeneratorParams {
                users,
                items,
                events,
                segments,
                affinity,
                seed,
                mode,
                ..GeneratorParams::default()
            };
            // Streamed to the file: a 100M-event file never sits in memory.
            let file = std::fs::File::create(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let json = matches!(FileFormat::guess(&out), FileFormat::Json);
            if !json {
                writeln!(w, "user,item,rating,ts")?;
            }
            let mut written = 0u64;
            let mut failure: Option<std::io::Error> = None;
            let (truth, catalogue) = generator::generate_into(&params, |e| {
                if failure.is_some() {
                    return;
                }
                let result = if json {
                    generator::write_json_line(&e, &mut w)
                } else {
                    generator::write_csv_line(&e, &mut w)
                };
                match result {
                    Ok(()) => written += 1,
                    Err(e) => failure = Some(e),
                }
            });
            if let Some(e) = failure {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot write {}", out.display()))
                );
            }
            w.flush()
                .with_context(|| format!("cannot write {}", out.display()))?;
            if let Some(path) = truth_out {
                let mut w = csv::Writer::from_path(path)?;
                w.write_record(["user", "segment"])?;
                for (u, s) in &truth {
                    w.write_record([u.as_str(), &s.to_string()])?;
                }
                w.flush()?;
            }
            if let Some(path) = items_out {
                let mut w = csv::Writer::from_path(path)?;
                w.write_record(["item", "title"])?;
                for (i, t) in &catalogue {
                    w.write_record([i.as_str(), t.as_str()])?;
                }
                w.flush()?;
            }
            eprintln!("wrote {written} events to {}", out.display());
            Ok(())
        }
        Command::Bench {
            shape,
            batch_size,
            refresh_every,
            json,
        } => {
            let shapes = if shape.is_empty() {
                vec![bench::Shape::Ml100k, bench::Shape::Large]
            } else {
                shape
            };
            for s in shapes {
                let result = bench::run(s, batch_size, refresh_every);
                if json {
                    println!("{}", serde_json::to_string(&result)?);
                } else {
                    bench::print(&result);
                }
            }
            Ok(())
        }
    }
}

/// Where `segmenter snapshot` reads from.
enum SnapshotSource {
    Url { base: String, token: Option<String> },
    Dir(PathBuf),
}

impl SnapshotSource {
    /// `--url` (with `--token` or `[http] token`), else `--state-dir`, else `[state] dir`.
    fn new(
        url: Option<String>,
        state_dir: Option<PathBuf>,
        token: Option<String>,
        config: &Config,
    ) -> SnapshotSource {
        match url {
            Some(url) => SnapshotSource::Url {
                base: url.trim_end_matches('/').to_string(),
                token: token.or_else(|| config.http.token()),
            },
            None => SnapshotSource::Dir(state_dir.unwrap_or_else(|| config.state.dir.clone())),
        }
    }

    fn get(&self, path: &str) -> anyhow::Result<String> {
        let SnapshotSource::Url { base, token } = self else {
            anyhow::bail!("not a URL source");
        };
        let mut request = ureq::get(&format!("{base}{path}"));
        if let Some(t) = token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        match request.call() {
            Ok(response) => Ok(response.into_string()?),
            Err(ureq::Error::Status(code, response)) => {
                let body = response.into_string().unwrap_or_default();
                anyhow::bail!("{base}{path} answered {code}: {body}")
            }
            Err(e) => anyhow::bail!("cannot reach {base}{path}: {e}"),
        }
    }

    fn open(dir: &std::path::Path) -> anyhow::Result<crate::store::Store> {
        crate::store::Store::open(dir).map_err(|e| {
            anyhow::anyhow!("{e}; if a service is running on this state dir, use --url instead")
        })
    }

    fn snapshot(&self, version: Option<u64>) -> anyhow::Result<crate::snapshot::Snapshot> {
        match self {
            SnapshotSource::Url { .. } => {
                let path = match version {
                    Some(v) => format!("/snapshots/{v}"),
                    None => "/snapshots/latest".to_string(),
                };
                Ok(serde_json::from_str(&self.get(&path)?)?)
            }
            SnapshotSource::Dir(dir) => {
                let store = Self::open(dir)?;
                let found = match version {
                    Some(v) => store.snapshot(v)?,
                    None => store.latest_snapshot()?,
                };
                found.ok_or_else(|| match version {
                    Some(v) => anyhow::anyhow!("no snapshot {v} in {}", dir.display()),
                    None => anyhow::anyhow!("no snapshot yet in {}", dir.display()),
                })
            }
        }
    }

    /// The summaries of up to `count` snapshots with versions `<= up_to`, oldest first.
    fn summaries(
        &self,
        up_to: u64,
        count: usize,
    ) -> anyhow::Result<Vec<crate::snapshot::SnapshotSummary>> {
        match self {
            SnapshotSource::Dir(dir) => Ok(Self::open(dir)?.summaries(up_to, count)?),
            SnapshotSource::Url { .. } => {
                let versions: Vec<u64> = self
                    .list()?
                    .into_iter()
                    .map(|i| i.version)
                    .filter(|&v| v <= up_to)
                    .collect();
                versions[versions.len().saturating_sub(count)..]
                    .iter()
                    .map(|&v| Ok((&self.snapshot(Some(v))?).into()))
                    .collect()
            }
        }
    }

    fn list(&self) -> anyhow::Result<Vec<crate::store::SnapshotInfo>> {
        match self {
            SnapshotSource::Url { .. } => {
                #[derive(serde::Deserialize)]
                struct List {
                    snapshots: Vec<crate::store::SnapshotInfo>,
                }
                Ok(serde_json::from_str::<List>(&self.get("/snapshots")?)?.snapshots)
            }
            SnapshotSource::Dir(dir) => Ok(Self::open(dir)?.snapshot_infos()?),
        }
    }
}
