//! Start-up and shutdown: turns the command line and config into running actors and an HTTP
//! server, and owns the order of things at exit (stop accepting, drain, flush records).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use actix_web::http::Method;
use actix_web::rt::net::TcpStream;
use actix_web::{web, App, HttpResponse, HttpServer};

use crate::admission::preflight;
use crate::cli::{bind_address, Cli};
use crate::config::{self, Config, ConfigError, ConfigErrors};
use crate::ledger::Sinks;
use crate::metrics::Metrics;
use crate::models::{self, ModelsActor};
use crate::notify::{NotifierActor, Reconfigure};
use crate::proxy::{proxy, UpstreamClient};
use crate::records::{redact_database_url, DbError, Recorder, Store};
use crate::registry::{SharedConfig, UpstreamRegistry};
use crate::state::AppState;
use crate::status;
use crate::transport::{tls_config, upstream_client};

/// How long in-flight requests may run after SIGTERM/SIGINT before the server closes them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is unusable; one line per problem.
    #[error("{0}")]
    Config(ConfigErrors),
    /// The database cannot be used.
    #[error("{0}")]
    Database(#[from] DbError),
    /// `-database` names something we do not support.
    #[error("{0}: {1}")]
    DatabaseKind(String, &'static str),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address tried.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else at start (metrics registry, runtime).
    #[error("{0}")]
    Other(String),
}

/// Whether a request is under `/v1/` (the `/v1` scopes also match `/v1` itself, which the
/// `/v1/{tail}*` resource they replace did not).
fn under_v1(ctx: &actix_web::guard::GuardContext<'_>) -> bool {
    ctx.head().uri.path() != "/v1"
}

/// Accept-queue length: bursts of thousands of new streams must not overflow it (std's `bind`
/// uses 128; the kernel caps this at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Binds `addr` (resolving names) with a deep accept queue.
fn listen(addr: &str) -> std::io::Result<TcpListener> {
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind");
    for sa in addr.to_socket_addrs()? {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(sa),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        match socket
            .bind(&sa.into())
            .and_then(|()| socket.listen(BACKLOG))
        {
            Ok(()) => return Ok(socket.into()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Loads the config named on the command line with `-noauth` applied.
pub fn load_config(cli: &Cli) -> Result<Config, StartError> {
    load_checked(cli).map_err(StartError::Config)
}

/// The config file with the checks that need the records backends (at start and on reload).
fn load_checked(cli: &Cli) -> Result<Config, ConfigErrors> {
    let cfg = config::load(&cli.upstreams, cli.noauth)?;
    match dbaddr_error(&cfg) {
        Some(e) => Err(ConfigErrors(vec![e])),
        None => Ok(cfg),
    }
}

/// With the Go tool's `dbtype: postgres`, `dbaddr` must be a PostgreSQL target; anything else
/// (or nothing) is a config error naming `dbaddr`, never a SQLite file by accident.
fn dbaddr_error(cfg: &Config) -> Option<ConfigError> {
    let ok = cfg
        .database
        .as_deref()
        .is_some_and(crate::records::is_postgres_target);
    (cfg.dbtype_postgres && !ok).then(|| ConfigError {
        file: cfg.file.clone(),
        key: "dbaddr".to_string(),
        problem: "with dbtype: postgres, give a postgres:// URL or a \"host=… dbname=…\" string"
            .to_string(),
    })
}

fn database_target(cli: &Cli, cfg: &Config) -> Result<Option<String>, StartError> {
    if let Some(t) = cli.dbtype.as_deref().map(str::trim) {
        if !t.eq_ignore_ascii_case("sqlite") && !t.eq_ignore_ascii_case("postgres") {
            return Err(StartError::DatabaseKind(
                format!("-dbtype {t}"),
                "use sqlite or postgres (the -database value decides which is used)",
            ));
        }
    }
    let db = cli
        .database
        .clone()
        .or_else(|| cfg.database.clone())
        .unwrap_or_else(|| "./db.sqlite".to_string());
    let trimmed = db.trim();
    if trimmed.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Ok(Some(trimmed.to_string()))
}

/// Runs the gateway until SIGTERM/SIGINT; returns after records are flushed.
pub fn run(cli: Cli, cfg: Config) -> Result<(), StartError> {
    let addr = cli
        .addr
        .clone()
        .or_else(|| cfg.address.clone())
        .unwrap_or_else(|| ":8888".to_string());
    let database = database_target(&cli, &cfg)?;
    // Trace settings (see the tracing guide) are resolved before anything listens: a bad one
    // stops the start.
    let file = cfg.file.display().to_string();
    let trace_settings =
        crate::trace::settings::resolve(&cfg.otel, &file, &|k| std::env::var(k).ok())
            .map_err(|why| StartError::Other(format!("tracing: {why}")))?;
    // Open the database before anything listens: a bad path is a start-up error.
    let store = match &database {
        Some(target) => {
            let store = Store::open(target)?;
            let rows = Recorder::initial_rows(&store);
            Some((store, rows))
        }
        None => None,
    };
    // Owners known from the records, loaded before listening, with their chain parts within
    // `rebuild_memory` (docs/affinity.md, "Bounded reading").
    let owners = Arc::new(crate::affinity::Owners::default());
    owners.set_budget(crate::affinity::reading::budget(&cfg));
    let owners_from = store
        .as_ref()
        .map(|(s, _)| crate::affinity::reading::load_at_start(&owners, s, &cfg));
    let owners_store = store.as_ref().map(|(s, _)| s.clone());
    let poll_store = owners_store.clone().filter(|s| s.kind() == "PostgreSQL");
    let tls = tls_config();

    let system = actix_rt::System::new();
    system.block_on(async move {
        // Signal handlers go in before the port opens: a SIGTERM or SIGHUP sent as soon as the
        // port answers must drain or reload, not kill the process (the default action).
        let signals = Signals::register();
        let listener = listen(&bind_address(&addr)).map_err(|source| StartError::Bind {
            addr: addr.clone(),
            source,
        })?;
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| addr.clone());
        let metrics = Metrics::new().map_err(|e| StartError::Other(e.to_string()))?;
        for m in &cfg.members.list {
            metrics.member_known(&m.name);
        }
        let prom = metrics.http_middleware().map_err(StartError::Other)?;
        let http_metrics = metrics.http.clone();
        let tracer = start_tracer(trace_settings, &metrics, &tls)?;
        let recorder =
            store.map(|(s, rows)| Recorder::start(s, rows, metrics.clone(), cfg.record_queue));
        let notifier = NotifierActor::new(cfg.notify.clone(), metrics.clone(), tls.clone()).start();
        let shared = SharedConfig::new(Arc::new(cfg));
        if let Some(store) = poll_store {
            // Other replicas write owners too: read them off every request's path.
            let from = owners_from.unwrap_or_default();
            crate::affinity::reading::spawn_poll(owners.clone(), store, shared.clone(), from);
        }
        let registry = UpstreamRegistry::start_with(
            shared.clone(),
            metrics.clone(),
            Some(notifier.clone().recipient()),
            Some(upstream_client(tls.clone())),
        );
        // Replicas on one PostgreSQL share health and a roster (see the operations guide).
        let replicas = crate::replicas::start(
            database.as_deref(),
            &local,
            registry.store_inbox(),
            shared.clone(),
            metrics.clone(),
        );
        // Model lists are fetched in the background: nothing here waits for an upstream.
        let models = ModelsActor::start_with(shared.get(), upstream_client(tls.clone()));
        let sessions = crate::realtime::Sessions::default();
        // With PostgreSQL, members' limits hold for all replicas together (operations guide).
        let sharing = crate::shared_limits::Sharing::start_if(
            database.as_deref(),
            crate::replicas::local_id(),
        );
        let sinks = Arc::new(Sinks {
            metrics: metrics.clone(),
            registry: registry.clone(),
            recorder: recorder.clone(),
            alerts: Some(notifier.clone().recipient()),
            reject_gate: Default::default(),
            owners: owners.clone(),
            tracer,
            sharing,
        });
        let state = web::Data::new(AppState {
            config: shared.clone(),
            sinks,
            models: models.clone(),
            started: Instant::now(),
            started_at: SystemTime::now(),
            listen: local.clone(),
            database: database
                .as_deref()
                .map(redact_database_url)
                .unwrap_or_else(|| "none".into()),
            realtime: sessions.clone(),
            store: owners_store,
            replicas,
        });
        let traces = state.clone();

        let factory_tls = tls.clone();
        let server = HttpServer::new(move || {
            App::new()
                // Our HTTP request series (bounded labels); actix-web-prom only serves the text.
                .wrap(http_metrics.clone())
                .app_data(state.clone())
                .app_data(web::Data::new(UpstreamClient(upstream_client(
                    factory_tls.clone(),
                ))))
                .route("/", web::get().to(status::page))
                .route("/healthz", web::get().to(status::healthz))
                .route("/usage", web::get().to(crate::member_usage::usage))
                .route(
                    "/static/usage.js",
                    web::get().to(crate::member_usage::script),
                )
                .route(
                    "/static/usage.css",
                    web::get().to(crate::member_usage::style),
                )
                .route("/static/style.css", web::get().to(status::style))
                // actix-web-prom answers this path itself; the route keeps the proxy from seeing it.
                .service(
                    web::resource("/v1/metrics")
                        // Every `/v1/*` answer carries an `x-request-id` (see the observability
                        // guide); this one is made here, around actix-web-prom's own answer.
                        .wrap(prom.clone())
                        .wrap_fn(|req, srv| {
                            use actix_web::dev::Service;
                            let fut = srv.call(req);
                            async move {
                                let mut res = fut.await?;
                                res.headers_mut().insert(
                                    actix_web::http::header::HeaderName::from_static(
                                        "x-request-id",
                                    ),
                                    crate::ledger::new_request_id(),
                                );
                                Ok(res)
                            }
                        })
                        .route(web::get().to(|| async {
                            HttpResponse::Ok()
                                .insert_header(("access-control-allow-origin", "*"))
                                .finish()
                        })),
                )
                // The model list is the gateway's own (see the observability guide, "Models and
                // token usage (0.2)"); other methods are proxied as before.
                // In a `/v1/models` scope: its static prefix keeps other paths from running the
                // `{id:.*}` regex (5% of a proxied request's instructions when it was app-level).
                .service(
                    web::scope("/v1/models").service(
                        web::resource(["", "/{id:.*}"])
                            .route(web::get().to(models::handler))
                            .route(
                                web::route()
                                    .guard(actix_web::guard::fn_guard(|ctx| {
                                        ctx.head().method == Method::OPTIONS
                                    }))
                                    .to(preflight),
                            )
                            .default_service(web::to(proxy)),
                    ),
                )
                // The catch-all `/v1/*`: prefix scopes, whose static prefix match costs no regex
                // (a `/v1/{tail}*` resource ran the router's regex on every request: a quarter of
                // the gateway's instructions with two such resources). Guards pick, in order,
                // WebSocket upgrades (see the observability guide, "Realtime API (WebSocket)"),
                // CORS preflight, then the proxy; plain function guards, as actix's method guard
                // allocates on each check. `/v1` alone stays 404.
                .service(
                    web::scope("/v1")
                        .guard(actix_web::guard::fn_guard(|ctx| {
                            under_v1(ctx) && crate::realtime::is_upgrade(ctx)
                        }))
                        .default_service(web::to(crate::realtime::session)),
                )
                .service(
                    web::scope("/v1")
                        .guard(actix_web::guard::fn_guard(|ctx| {
                            under_v1(ctx) && ctx.head().method == Method::OPTIONS
                        }))
                        .default_service(web::to(preflight)),
                )
                .service(
                    web::scope("/v1")
                        .guard(actix_web::guard::fn_guard(under_v1))
                        .default_service(web::to(proxy)),
                )
        })
        .on_connect(|conn, _ext| {
            if let Some(tcp) = conn.downcast_ref::<TcpStream>() {
                let _ = tcp.set_nodelay(true);
            }
        })
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
        // actix treats SIGINT as "stop now"; both signals must drain gracefully (see the
        // operations guide, "Reload, shutdown, logs and the database").
        .disable_signals()
        // A client that closes its connection while the gateway waits (a Retry-After, a backoff,
        // a slow upstream) ends the request there: every upstream request and wait is cancelled
        // with it (see the rescue guide, `deadline`), instead of going on for nobody.
        .h1_allow_half_closed(false)
        .listen(listener)
        .map_err(|source| StartError::Bind {
            addr: addr.clone(),
            source,
        })?
        .run();

        spawn_shutdown(signals.stop, server.handle(), sessions);
        if let Some(hup) = signals.reload {
            spawn_reload(
                hup,
                cli.clone(),
                shared.get(),
                traces.clone(),
                notifier.clone(),
            );
        }
        log::info!(
            "listening on {local} ({} upstreams, auth {}, recording {})",
            shared.get().upstreams.len(),
            if shared.get().noauth { "off" } else { "on" },
            database
                .as_deref()
                .map(redact_database_url)
                .unwrap_or_else(|| "off".into())
        );

        if let Some(rec) = recorder.clone() {
            spawn_retention(rec, shared.clone());
        }

        let result = server.await;
        if let Some(rec) = &recorder {
            log::info!("server stopped; writing {} queued records", rec.queued());
            rec.flush().await;
        }
        if let Some(tracer) = &traces.sinks.tracer {
            tracer.flush(Duration::from_secs(5));
        }
        log::info!("bye");
        result.map_err(|e| StartError::Other(e.to_string()))
    })
}

/// The trace exporter (see the tracing guide) when an OTLP endpoint is set in the environment or
/// the config.
fn start_tracer(
    settings: Option<crate::trace::settings::Settings>,
    metrics: &Metrics,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Option<crate::trace::Tracer>, StartError> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    crate::trace::Tracer::start(settings, metrics.spans_dropped(), tls.clone())
        .map(Some)
        .map_err(|e| StartError::Other(format!("tracing: cannot start the exporter: {e}")))
}

/// The signal streams, registered before the port opens (tokio installs a handler when its
/// stream is created).
struct Signals {
    /// SIGTERM and SIGINT, or None where they cannot be watched (then ctrl-c only).
    #[cfg(unix)]
    stop: Option<(
        actix_rt::signal::unix::Signal,
        actix_rt::signal::unix::Signal,
    )>,
    #[cfg(not(unix))]
    stop: Option<()>,
    /// SIGHUP, or None where it cannot be watched (reload disabled).
    #[cfg(unix)]
    reload: Option<actix_rt::signal::unix::Signal>,
    #[cfg(not(unix))]
    reload: Option<()>,
}

impl Signals {
    /// Installs the handlers; must run inside the runtime.
    #[cfg(unix)]
    fn register() -> Signals {
        use actix_rt::signal::unix::{signal, SignalKind};
        let stop = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => {
                log::warn!("cannot listen for SIGTERM/SIGINT; falling back to ctrl-c only");
                None
            }
        };
        let reload = signal(SignalKind::hangup())
            .map_err(|_| log::warn!("cannot listen for SIGHUP; config reload disabled"))
            .ok();
        Signals { stop, reload }
    }

    /// Elsewhere: ctrl-c only, no reload.
    #[cfg(not(unix))]
    fn register() -> Signals {
        Signals {
            stop: None,
            reload: None,
        }
    }
}

/// Stops the server gracefully on the first SIGTERM or SIGINT.
#[cfg(unix)]
fn spawn_shutdown(
    stop: Option<(
        actix_rt::signal::unix::Signal,
        actix_rt::signal::unix::Signal,
    )>,
    handle: actix_web::dev::ServerHandle,
    sessions: crate::realtime::Sessions,
) {
    actix_rt::spawn(async move {
        match stop {
            Some((mut term, mut int)) => {
                let name = tokio_select(term.recv(), int.recv()).await;
                log::info!(
                    "{name}: stopping; in-flight requests get up to {}s",
                    SHUTDOWN_GRACE.as_secs()
                );
            }
            None => {
                let _ = actix_rt::signal::ctrl_c().await;
            }
        }
        // Open WebSocket sessions get their 1001 close now, well inside the grace period.
        sessions.close_all();
        handle.stop(true).await;
    });
}

/// Stops the server gracefully on ctrl-c.
#[cfg(not(unix))]
fn spawn_shutdown(
    _: Option<()>,
    handle: actix_web::dev::ServerHandle,
    sessions: crate::realtime::Sessions,
) {
    actix_rt::spawn(async move {
        let _ = actix_rt::signal::ctrl_c().await;
        sessions.close_all();
        handle.stop(true).await;
    });
}

/// Waits for whichever of the two signals comes first and names it.
#[cfg(unix)]
async fn tokio_select(
    term: impl std::future::Future<Output = Option<()>>,
    int: impl std::future::Future<Output = Option<()>>,
) -> &'static str {
    use futures_util::future::{select, Either};
    match select(std::pin::pin!(term), std::pin::pin!(int)).await {
        Either::Left(_) => "SIGTERM",
        Either::Right(_) => "SIGINT",
    }
}

/// Reloads the config on each SIGHUP. `started` is the config the process started with: keys
/// read only at start that differ from it are named once per reload, as long as they differ.
/// The new config goes to the registry, the notifier, the model lists and the owner map (its
/// chain budget, see docs/affinity.md "Bounded reading").
#[cfg(unix)]
fn spawn_reload(
    mut hup: actix_rt::signal::unix::Signal,
    cli: Cli,
    started: Arc<Config>,
    state: web::Data<AppState>,
    notifier: Addr<NotifierActor>,
) {
    actix_rt::spawn(async move {
        while hup.recv().await.is_some() {
            match load_checked(&cli) {
                Ok(mut cfg) => {
                    let pending = started.not_applied_on_reload(&cfg);
                    notifier.do_send(Reconfigure(cfg.notify.clone()));
                    // A member keeps what it used across a reload (see the members guide).
                    let registry = &state.sinks.registry;
                    cfg.members.adopt(&registry.view().config.members);
                    let cfg = Arc::new(cfg);
                    let n = cfg.upstreams.len();
                    registry.reload(cfg.clone()).await;
                    let owners = &state.sinks.owners;
                    crate::affinity::reading::reload(owners, state.store.as_ref(), &cfg);
                    state.models.reload(cfg);
                    let file = cli.upstreams.display();
                    if pending.is_empty() {
                        log::info!("SIGHUP: reloaded {file} ({n} upstreams)");
                    } else {
                        log::warn!(
                            "SIGHUP: reloaded {file} ({n} upstreams); not applied until restart \
                             (read only at start): {}",
                            pending.join(", ")
                        );
                    }
                }
                Err(errors) => {
                    for e in errors.0 {
                        log::error!("SIGHUP: config not reloaded, keeping the running one: {e}");
                    }
                }
            }
        }
    });
}

/// No SIGHUP here: nothing to reload on.
#[cfg(not(unix))]
fn spawn_reload(_: (), _: Cli, _: Arc<Config>, _: web::Data<AppState>, _: Addr<NotifierActor>) {}

fn spawn_retention(rec: Recorder, shared: SharedConfig) {
    actix_rt::spawn(async move {
        let mut tick = actix_rt::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            let days = shared.get().retention_days;
            if days > 0 {
                rec.prune(Duration::from_secs(u64::from(days) * 86_400));
            }
        }
    });
}
