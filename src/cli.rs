//! Command-line interface: argument parsing and dispatch to the library. Exit codes: 0 success,
//! 1 runtime failure (I/O, state), 2 bad usage or configuration.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::bench;
use crate::config::{Config, ConfigError, LogFormat, StateConfig};
use crate::decode::FileFormat;
use crate::demo::DemoSummary;
use crate::event::Mode;
use crate::generator::{self, GeneratorParams, Profile};
use crate::kafka::produce::ProduceOptions;
use crate::pipeline::Shared;
use crate::replay::{self, ReplayOptions};
use crate::snapshot::report::seed_report;
use crate::store::{SnapshotInfo, SnapshotStore, Stores};

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
    Replay(ReplayArgs),
    /// Run the service: consume rating events from Kafka ([kafka] in the config) into the state
    /// dir, taking snapshots, until SIGTERM/SIGINT. With --demo, consume an endless generated
    /// stream with planted segments instead (no broker needed).
    Run(RunArgs),
    /// Load a ratings file (and a catalogue) into Kafka topics, key = user id, in timestamp order.
    Produce(ProduceArgs),
    /// Read snapshots from a running service (--url) or from a state dir (--state-dir, while
    /// no service holds it), and print the seed-style report or JSON.
    Snapshot(SnapshotArgs),
    /// Write a self-contained HTML report (charts, figures, cluster profiles) of a snapshot,
    /// from a running service (--url) or a state dir; it opens offline.
    Report(ReportArgs),
    /// Write a generated ratings file with its ground truth: planted segments, or with
    /// --profile realistic data shaped like MovieLens with weak overlapping tastes.
    Generate(GenerateArgs),
    /// Measure engine throughput and snapshot build time on generated streams.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Ratings file: MovieLens u.data, CSV with a header, or JSON lines.
    #[arg(long)]
    pub ratings: PathBuf,
    /// Item catalogue: MovieLens u.item, or CSV/TSV `item,title`.
    #[arg(long)]
    pub items: Option<PathBuf>,
    /// File layout; guessed from the extension when absent (.csv, .json/.jsonl, else movielens).
    #[arg(long, value_enum)]
    pub format: Option<FileFormat>,
    /// Overrides [model] components.
    #[arg(long)]
    pub components: Option<usize>,
    /// Overrides [model] clusters.
    #[arg(long)]
    pub clusters: Option<usize>,
    /// Overrides [state] dir.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Write the snapshot JSON here.
    #[arg(long)]
    pub snapshot_out: Option<PathBuf>,
    /// Write the assignments here as CSV `user,cluster`.
    #[arg(long)]
    pub assignments_out: Option<PathBuf>,
    /// Items printed per cluster in the report.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Leave the diagnostics (explained-variance curve, inertia by k) out of the snapshot.
    #[arg(long)]
    pub no_diagnostics: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Use the generated demo stream instead of Kafka.
    #[arg(long)]
    pub demo: bool,
    /// Overrides [state] dir (demo default: a fresh temporary directory, removed at exit).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Demo only: stop the stream after this many events.
    #[arg(long)]
    pub max_events: Option<u64>,
    /// Demo only: once the stream stopped (--max-events), keep serving the HTTP API until
    /// Ctrl-C/SIGTERM.
    #[arg(long, requires = "max_events")]
    pub keep_serving: bool,
    /// Stop gracefully once this many valid events have been applied in total (state dir
    /// included): for loading history and for benchmarks.
    #[arg(long)]
    pub exit_at_events: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Bootstrap servers (default: [kafka] brokers).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Ratings topic (default: [kafka] topic).
    #[arg(long)]
    pub topic: Option<String>,
    #[arg(long)]
    pub ratings: PathBuf,
    #[arg(long, value_enum)]
    pub format: Option<FileFormat>,
    /// Item catalogue to load into --items-topic as {"item","title"} records.
    #[arg(long, requires = "items_topic")]
    pub items: Option<PathBuf>,
    #[arg(long)]
    pub items_topic: Option<String>,
    /// Send at most this many events per second (a steady stream for load tests; default: as
    /// fast as the broker takes them).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Create missing topics with this many partitions (catalogue: 1).
    #[arg(long)]
    pub partitions: Option<i32>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub which: SnapshotCommand,
    /// Base URL of a running service, e.g. http://127.0.0.1:9464.
    #[arg(long, global = true, conflicts_with = "state_dir")]
    pub url: Option<String>,
    /// A state dir to read directly (default: [state] dir when --url is absent).
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Print JSON instead of the report.
    #[arg(long, global = true)]
    pub json: bool,
    /// Bearer token for --url (default: [http] token / SEGMENTER_HTTP__TOKEN).
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// Items per cluster in the report.
    #[arg(long, global = true, default_value_t = 10)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Directory to write index.html (and one SVG per chart) into.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, conflicts_with = "state_dir")]
    pub url: Option<String>,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[arg(long)]
    pub token: Option<String>,
    /// Snapshot version (default: the latest).
    #[arg(long)]
    pub version: Option<u64>,
    /// Items per cluster profile.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[arg(long, default_value_t = 943)]
    pub users: usize,
    #[arg(long, default_value_t = 1682)]
    pub items: usize,
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Planted segments, or latent tastes with --profile realistic.
    #[arg(long, default_value_t = 12)]
    pub segments: usize,
    /// Probability that an event picks from the user's segment's items (separation; planted
    /// profile only). Default 0.8.
    #[arg(long)]
    pub affinity: Option<f64>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Mode::Explicit)]
    pub mode: Mode,
    /// `planted`: clearly separated segments. `realistic`: shaped like MovieLens (Zipf
    /// popularity, log-normal activity of at least 20 ratings a user, weak overlapping tastes,
    /// user bias and item quality, MovieLens' star shares; implicit: heavy-tailed sessions).
    #[arg(long, value_enum, default_value_t = Profile::Planted)]
    pub profile: Profile,
    /// Print the data set's statistics (ratings per user, item popularity, values) to stderr;
    /// keeps every event in memory.
    #[arg(long)]
    pub stats: bool,
    /// Output ratings file; `.json`/`.jsonl` writes JSON lines, anything else CSV
    /// `user,item,rating,ts`.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the planted segments as CSV `user,segment`.
    #[arg(long)]
    pub truth_out: Option<PathBuf>,
    /// Write the item catalogue as CSV `item,title`.
    #[arg(long)]
    pub items_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum)]
    pub shape: Vec<bench::Shape>,
    #[arg(long, default_value_t = 10_000)]
    pub batch_size: usize,
    /// Periodic refresh interval in events (default: per shape, about 5 refreshes per run).
    #[arg(long)]
    pub refresh_every: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Instead of the engine bench: a cold snapshot coordinated over this many instances
    /// (comma-separated, e.g. 1,2,3; users split by a hash of their id), in process: the rounds
    /// it takes and what each instance sends per round.
    #[arg(long, value_delimiter = ',')]
    pub instances: Vec<usize>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// The latest snapshot.
    Latest,
    /// One snapshot by version.
    Show { version: u64 },
    /// Stored snapshots with their times and counts.
    List,
    /// A user's segment in every retained snapshot, oldest first.
    History { user: String },
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
    if let Command::Generate(args) = &cli.command
        && let Err(problem) = args.params()
    {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, problem)
            .exit();
    }
    let config = match Config::load(cli.config.as_deref())
        .and_then(|config| with_command_overrides(&cli.command, config))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config);
    match run(cli.command, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The config with the command's own options applied, checked again where those options can
/// make it invalid, so such mistakes are configuration errors too (exit 2).
fn with_command_overrides(command: &Command, mut config: Config) -> Result<Config, ConfigError> {
    match command {
        Command::Replay(args) => {
            if let Some(components) = args.components {
                config.model.components = components;
                config.model.curve_components = config.model.curve_components.max(components);
            }
            if let Some(clusters) = args.clusters {
                config.model.clusters = clusters;
            }
            if let Some(dir) = &args.state_dir {
                config.state.dir = dir.clone();
            }
            config.validate()?;
        }
        Command::Run(RunArgs {
            demo: false,
            state_dir: Some(dir),
            ..
        }) => config.state.dir = dir.clone(),
        Command::Run(RunArgs { demo: true, .. }) => config.validate_demo()?,
        Command::Run(_)
        | Command::Report(_)
        | Command::Snapshot(_)
        | Command::Produce(_)
        | Command::Generate(_)
        | Command::Bench(_) => {}
    }
    Ok(config)
}

fn run(command: Command, config: &Config) -> anyhow::Result<()> {
    match command {
        Command::Replay(args) => replay_command(args, config),
        Command::Run(args) if args.demo => run_demo_service(args, config),
        Command::Run(args) => run_service(args, config),
        Command::Produce(args) => produce_command(args, config),
        Command::Snapshot(args) => snapshot_command(args, config),
        Command::Report(args) => report_command(args, config),
        Command::Generate(args) => generate_command(args),
        Command::Bench(args) => bench_command(args),
    }
}

fn stderr_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

fn replay_command(args: ReplayArgs, config: &Config) -> anyhow::Result<()> {
    let format = args
        .format
        .unwrap_or_else(|| FileFormat::guess(&args.ratings));
    let outcome = replay::replay(
        config,
        &ReplayOptions {
            ratings: args.ratings,
            items: args.items,
            format,
            snapshot_out: args.snapshot_out,
            assignments_out: args.assignments_out,
            progress: stderr_is_terminal(),
            diagnostics: !args.no_diagnostics,
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
        Some((snap, _)) => print!("{}", seed_report(snap, args.top)),
        None => eprintln!(
            "not enough data for a snapshot yet: need at least {} items and {} users",
            config.model.components, config.model.clusters
        ),
    }
    Ok(())
}

/// `run --demo`: the generated stream into a state dir (a temporary one unless given), with
/// the HTTP API, until the stream ends or a stop signal.
fn run_demo_service(args: RunArgs, config: &Config) -> anyhow::Result<()> {
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
    // Lives to the end of the demo: dropping it removes the temporary state dir.
    let temp_dir;
    let dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => {
            temp_dir = tempfile::Builder::new()
                .prefix("segmenter-demo-")
                .tempdir()?;
            temp_dir.path().to_path_buf()
        }
    };
    let stores = StateConfig {
        dir,
        ..config.state.clone()
    }
    .open()?;
    let summary = runtime.block_on(serve_demo(&args, config, stores, shutdown))?;
    eprintln!(
        "demo stopped after {} events and {} snapshots (last version {:?})",
        summary.events_applied, summary.snapshots, summary.last_version
    );
    Ok(())
}

/// Serves the HTTP API while the demo stream runs on a blocking thread; with --keep-serving,
/// serves on after the stream stopped by itself until a stop signal.
async fn serve_demo(
    args: &RunArgs,
    config: &Config,
    stores: Stores,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<DemoSummary> {
    let shared = Shared::default();
    let server =
        crate::http::start(config, &shared, &stores.snapshots, std::future::pending()).await?;
    let stopped = shutdown.clone();
    let (config, max_events) = (config.clone(), args.max_events);
    let summary = tokio::task::spawn_blocking(move || {
        crate::demo::run_demo(&config, stores, max_events, &shutdown, &shared)
    })
    .await;
    if args.keep_serving && !stopped.load(Ordering::Relaxed) {
        tracing::info!("stream stopped; still serving the HTTP API until Ctrl-C");
        wait_for_stop_signal().await;
    }
    server.stop().await;
    summary?
}

/// `run`: the Kafka service until a stop signal or --exit-at-events.
fn run_service(args: RunArgs, config: &Config) -> anyhow::Result<()> {
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
            crate::service::RunOptions {
                exit_at_events: args.exit_at_events,
            },
            Shared::default(),
        )
        .await
    })?;
    Ok(())
}

fn produce_command(args: ProduceArgs, config: &Config) -> anyhow::Result<()> {
    let options = ProduceOptions {
        brokers: args.brokers.unwrap_or_else(|| config.kafka.brokers.clone()),
        topic: args.topic.unwrap_or_else(|| config.kafka.topic.clone()),
        format: args
            .format
            .unwrap_or_else(|| FileFormat::guess(&args.ratings)),
        ratings: args.ratings,
        items: args.items,
        items_topic: args.items_topic,
        partitions: args.partitions,
        progress: stderr_is_terminal(),
        rate: args.rate,
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

fn snapshot_command(args: SnapshotArgs, config: &Config) -> anyhow::Result<()> {
    let source = SnapshotSource::new(args.url, args.state_dir, args.token, config);
    let version = match args.which {
        SnapshotCommand::List => return print_snapshot_list(&source.list()?, args.json),
        SnapshotCommand::History { user } => {
            return print_user_history(&user, &source.user_history(&user)?, args.json);
        }
        SnapshotCommand::Show { version } => Some(version),
        SnapshotCommand::Latest => None,
    };
    let snapshot = source.snapshot(version)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", seed_report(&snapshot, args.top));
    }
    Ok(())
}

fn print_user_history(
    user: &str,
    history: &[crate::store::HistoryEntry],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"user": user, "history": history}))?
        );
        return Ok(());
    }
    println!("{:>8}  {:<22}  cluster", "version", "created_at");
    for h in history {
        let cluster = h.cluster.map_or("-".to_string(), |c| c.to_string());
        println!("{:>8}  {:<22}  {cluster}", h.version, h.created_at);
    }
    Ok(())
}

fn print_snapshot_list(list: &[SnapshotInfo], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
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
    Ok(())
}

fn report_command(args: ReportArgs, config: &Config) -> anyhow::Result<()> {
    let source = SnapshotSource::new(args.url, args.state_dir, args.token, config);
    let snapshot = source.snapshot(args.version)?;
    let history = source.summaries(snapshot.version, 20)?;
    let charts = crate::charts::ChartInputs::gather(snapshot, history, |v| {
        source.snapshot(Some(v)).map(Some)
    })?;
    let snapshot = &charts.snapshot;
    let out = &args.out;
    std::fs::create_dir_all(out)?;
    let html = crate::report::html_report(&charts, args.top);
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

impl GenerateArgs {
    /// The generator's parameters, or why these options do not make a data set.
    pub fn params(&self) -> Result<GeneratorParams, String> {
        let defaults = GeneratorParams::default();
        if self.profile == Profile::Realistic {
            if self.affinity.is_some() {
                return Err("--affinity shapes the planted profile only; the realistic \
                            profile's tastes are calibrated (docs/generator.md): drop \
                            --affinity or use --profile planted"
                    .into());
            }
            let most = generator::realistic::max_events(self.users, self.items, self.mode);
            if self.events > most {
                return Err(format!(
                    "--events {} is more than {} users can rate of {} items in the realistic \
                     profile (each rates at most {:.0}% of the catalogue, once): raise --users \
                     or --items, or lower --events to at most {most}",
                    self.events,
                    self.users,
                    self.items,
                    100.0 * generator::realistic::MAX_CATALOGUE_SHARE,
                ));
            }
        }
        Ok(GeneratorParams {
            users: self.users,
            items: self.items,
            events: self.events,
            segments: self.segments,
            affinity: self.affinity.unwrap_or(defaults.affinity),
            seed: self.seed,
            mode: self.mode,
            profile: self.profile,
            ..defaults
        })
    }
}

fn generate_command(args: GenerateArgs) -> anyhow::Result<()> {
    let params = args.params().map_err(anyhow::Error::msg)?;
    let mut stats_events = Vec::new();
    let out = &args.out;
    // Streamed to the file: a 100M-event planted file never sits in memory (the realistic
    // profile sorts its draws by time first, 24 bytes an event; --stats keeps every event).
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let json = matches!(FileFormat::guess(out), FileFormat::Json);
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
            Err(err) => failure = Some(err),
        }
        if args.stats {
            stats_events.push(e);
        }
    });
    if let Some(e) = failure {
        return Err(anyhow::Error::new(e).context(format!("cannot write {}", out.display())));
    }
    w.flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    if let Some(path) = &args.truth_out {
        let rows = truth.iter().map(|(u, s)| [u.clone(), s.to_string()]);
        write_csv(path, ["user", "segment"], rows)?;
    }
    if let Some(path) = &args.items_out {
        let rows = catalogue.iter().map(|(i, t)| [i.as_str(), t.as_str()]);
        write_csv(path, ["item", "title"], rows)?;
    }
    eprintln!("wrote {written} events to {}", out.display());
    if args.stats {
        eprintln!("{}", generator::stats::DataStats::of(&stats_events));
    }
    Ok(())
}

/// A two-column CSV file: the header, then the rows.
fn write_csv<T: AsRef<[u8]>>(
    path: &Path,
    header: [&str; 2],
    rows: impl IntoIterator<Item = [T; 2]>,
) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(header)?;
    for row in rows {
        w.write_record(row)?;
    }
    w.flush()?;
    Ok(())
}

fn bench_command(args: BenchArgs) -> anyhow::Result<()> {
    let shapes = if args.shape.is_empty() {
        vec![bench::Shape::Ml100k, bench::Shape::Large]
    } else {
        args.shape
    };
    if !args.instances.is_empty() {
        for s in shapes {
            for result in bench::rounds(s, &args.instances) {
                if args.json {
                    println!("{}", serde_json::to_string(&result)?);
                } else {
                    bench::print_rounds(&result);
                }
            }
        }
        return Ok(());
    }
    for s in shapes {
        let result = bench::run(s, args.batch_size, args.refresh_every);
        if args.json {
            println!("{}", serde_json::to_string(&result)?);
        } else {
            bench::print(&result);
        }
    }
    Ok(())
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

    /// The snapshots of a state dir (only they are read).
    fn open(dir: &std::path::Path) -> anyhow::Result<SnapshotStore> {
        let stores = crate::store::open(dir).map_err(|e| match e {
            crate::store::StoreError::Locked { .. } => {
                anyhow::anyhow!("{e}; if a service is running on this state dir, use --url instead")
            }
            e => anyhow::Error::new(e),
        })?;
        Ok(stores.snapshots)
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

    fn user_history(&self, user: &str) -> anyhow::Result<Vec<crate::store::HistoryEntry>> {
        match self {
            SnapshotSource::Url { .. } => {
                #[derive(serde::Deserialize)]
                struct History {
                    history: Vec<crate::store::HistoryEntry>,
                }
                let path = format!("/users/{}/history", percent_encode(user));
                Ok(serde_json::from_str::<History>(&self.get(&path)?)?.history)
            }
            SnapshotSource::Dir(dir) => {
                let store = Self::open(dir)?;
                let index = store
                    .user_index(user)?
                    .ok_or_else(|| anyhow::anyhow!("no user `{user}` in {}", dir.display()))?;
                Ok(store.user_history(index)?)
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

/// `id` as one URL path segment: every byte but unreserved ASCII percent-encoded.
fn percent_encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
