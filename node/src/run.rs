//! `node::run(config, shutdown)`: wires a node, serves until `shutdown` resolves or a
//! supervisor escalates, then stops in order. The world is passed in, so tests start
//! nodes on free ports and stop them cleanly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actors::clock::{Clock, SystemClock};
use actors::context::{KnowledgeSettings, NodeContext, Settings};
use actors::machine::Limits;
use actors::metrics::Metrics;
use actors::model::ApprovalDecision;
use actors::playbook::{Catalog, StepDefaults};
use actors::roles::archivist::{Archivist, ArchivistArgs};
use actors::roles::audit::{AuditArgs, AuditLog};
use actors::roles::executor::{EffectsInFlight, Executor, ExecutorArgs};
use actors::roles::governor::{Governor, GovernorArgs};
use actors::roles::intake::{Intake, IntakeArgs};
use actors::roles::knowledge::{Knowledge, KnowledgeArgs};
use actors::roles::leases::{LeaseKeeper, LeaseKeeperArgs};
use actors::roles::membership::{Membership, MembershipArgs};
use actors::roles::planner::{Planner, PlannerArgs};
use actors::roles::relay::{Relay, RelayArgs};
use actors::roles::scheduler::{Scheduler, SchedulerArgs};
use actors::roles::secrets::{Secrets, SecretsArgs};
use actors::roles::supervisor::{
    ChildSpec, NodeSupervisor, NodeSupervisorArgs, NodeSupervisorMsg, RestartPolicy,
};
use actors::roles::task_api::{TaskApi, TaskApiArgs};
use actors::roles::task_supervisor::{TaskSupervisor, TaskSupervisorArgs, TaskSupervisorMsg};
use actors::roles::verifier::{Verifier, VerifierArgs};
use actors::roles::{self, actor_name, lookup};
use actors::tools::{self, ToolConfig};
use anyhow::{Context, bail};
use futures::FutureExt;
use ractor::{Actor, ActorCell};
use storage::{Store, StoreOptions};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::http;
use crate::local_nats::LocalNats;

/// Runs a node until `shutdown` completes (Ok) or the node cannot go on (Err: the
/// process exits non-zero so systemd or Docker restarts it).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    // A start can wait for long, on a NATS server that is not up yet for one. A signal
    // meanwhile stops it there: everything it did so far was committed as it went, as
    // the node is built to survive kill -9 at any point.
    let prepared = tokio::select! {
        biased;
        () = &mut shutdown => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
        prepared = prepare(&config) => prepared?,
    };
    // The actors' start can wait on NATS too (JetStream's answers), but the first of
    // them serve before the last has started: they may have accepted a task and begun
    // its step. Stopped there, the node lets such steps finish before it exits; dropped
    // mid-step, an `unsafe` one would come back as outcome unknown.
    let (ctx, in_flight) = (prepared.ctx.clone(), prepared.in_flight.clone());
    let node = tokio::select! {
        biased;
        () = &mut shutdown => {
            tracing::info!("stopped while its actors were starting");
            ctx.start_draining();
            wait_for_steps(&in_flight, &config).await;
            return Ok(());
        }
        node = prepared.launch(&config) => node?,
    };
    node.serve(&config, shutdown).await
}

/// What a node holds before its actors start: dropping it stops nothing that runs.
struct Prepared {
    store: Store,
    local_nats: Option<LocalNats>,
    nats: async_nats::Client,
    url: String,
    ctx: Arc<NodeContext>,
    metrics: Arc<Metrics>,
    catalog: Arc<Catalog>,
    tool_set: Vec<Arc<dyn tools::Tool>>,
    knowledge: Arc<actors::knowledge::Shared>,
    listener: tokio::net::TcpListener,
    console: Option<(tokio::net::TcpListener, crate::console::ConsoleConfig)>,
    /// The executor's running effects, kept here so a stopping node can wait for them
    /// whatever state the executor actor is in.
    in_flight: EffectsInFlight,
}

/// What a started node holds until it stops.
struct Started {
    store: Store,
    local_nats: Option<LocalNats>,
    nats: async_nats::Client,
    url: String,
    playbooks: usize,
    in_flight: EffectsInFlight,
    ctx: Arc<NodeContext>,
    root: ractor::ActorRef<NodeSupervisorMsg>,
    root_handle: tokio::task::JoinHandle<()>,
    fatal_rx: mpsc::UnboundedReceiver<String>,
    http_task: tokio::task::JoinHandle<()>,
    console_task: Option<tokio::task::JoinHandle<()>>,
    trim_task: tokio::task::JoinHandle<()>,
}

/// Opens and connects what a node needs, up to (not including) starting its actors.
async fn prepare(config: &Config) -> anyhow::Result<Prepared> {
    let seed = if config.seed == 0 {
        SystemClock.now_ms() ^ u64::from(std::process::id()).rotate_left(32)
    } else {
        config.seed
    };
    tracing::info!(node_id = %config.node_id, seed, "starting node");
    if !config.fault_panic.is_empty() {
        tracing::warn!(fault_panic = ?config.fault_panic, "fault injection is on: roles will panic (for chaos tests only)");
    }
    let defaults = StepDefaults {
        max_attempts: config.step_attempts_max,
        timeout_ms: config.step_timeout_ms,
    };
    let catalog = Catalog::load_dir(&config.playbooks_dir, &defaults).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid playbooks:\n  - {}", lines.join("\n  - "))
    })?;
    if catalog.is_empty() {
        tracing::warn!(dir = %config.playbooks_dir.display(), "no playbooks found");
    }
    // Validated with the config.
    let catalog = match config.persona().map_err(anyhow::Error::msg)? {
        Some(persona) => {
            tracing::info!(name = %persona.name, business = %persona.business, "persona loaded");
            catalog.with_persona(&persona)
        }
        None => catalog,
    };
    let policies = config.load_policies().map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!(
            "invalid policies (check them with `cadre policy check`):\n  - {}",
            lines.join("\n  - ")
        )
    })?;
    tracing::info!(version = policies.version(), files = ?policies.files(), "policies loaded");
    let store = Store::open(&store_path(&config.data_dir), &StoreOptions::default())
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let migrated = actors::migrate::run(&store)
        .await
        .context("cannot migrate the store's task records")?;
    if migrated > 0 {
        tracing::info!(
            tasks = migrated,
            "task records migrated to the current layout"
        );
    }

    let local_nats = if config.nats_url.is_empty() {
        Some(
            LocalNats::start(
                &config.nats_server_bin,
                &config.data_dir,
                config.local_nats_port,
                config.payload_bytes_max,
            )
            .await?,
        )
    } else {
        None
    };
    let url = local_nats
        .as_ref()
        .map(|n| n.url.clone())
        .unwrap_or_else(|| config.nats_url.clone());
    let metrics = Arc::new(Metrics::new()?);
    let nats = connect_nats(config, &url, &metrics).await?;

    let settings = settings(config, seed, defaults);
    let ctx = NodeContext::new(
        settings,
        nats.clone(),
        store.clone(),
        Arc::new(SystemClock),
        metrics.clone(),
        policies,
    )?;
    if config.cluster {
        let ttl = Duration::from_millis(config.lease_ttl_ms);
        let ownership = actors::ownership::Ownership::open(
            nats.clone(),
            &config.nats_js_domain,
            config.node_id.clone(),
            ctx.boot_id,
            ttl,
        )
        .await
        .context("cannot open the cluster's leases and checkpoints (is JetStream enabled?)")?;
        ctx.set_ownership(Arc::new(ownership));
        tracing::info!(lease_ttl = ?ttl, "running as a cluster node");
    }
    // Derived from the store (rebuilt when behind it), so it lives beside it.
    let index =
        actors::knowledge::index::MemoryIndex::open(Some(&config.data_dir.join("memory-index")))
            .context("cannot open the memory index")?;
    let knowledge = Arc::new(actors::knowledge::Shared::new(index));
    ctx.set_knowledge(knowledge.clone());
    let key_path = if config.secrets_key_file.as_os_str().is_empty() {
        config.data_dir.join("secrets.key")
    } else {
        config.secrets_key_file.clone()
    };
    let secrets = actors::secrets::SecretStore::open(store.clone(), &key_path)
        .context("cannot open the secrets store")?;
    ctx.set_secrets(Arc::new(secrets));
    // Validated with the config.
    let llm = match config.llm().map_err(anyhow::Error::msg)? {
        Some(settings) => {
            tracing::info!(base_url = %settings.base_url, model = %settings.models.default, "LLM provider configured");
            let provider = Arc::new(actors::llm::Provider::new(settings, metrics.clone())?);
            ctx.set_llm(provider.clone());
            Some(provider)
        }
        None => None,
    };
    let tool_set = tools::build(
        &ctx.settings.tools,
        ctx.nats.clone(),
        llm,
        ctx.secrets().cloned(),
    )?;
    let catalog = Arc::new(catalog);
    let tool_names: Vec<&str> = tool_set.iter().map(|t| t.info().name).collect();
    metrics.init_labels(&config.node_id, &catalog.names(), &tool_names);
    metrics.set_audit_base(store.audit_seq());
    let (unknown, pending) = actors::roles::task_supervisor::waiting_on_people(&store)?;
    metrics.effects_outcome_unknown.set(unknown);
    metrics.approvals_pending.set(pending);
    let usd = actors::budget::usd;
    let caps = &ctx.settings.caps;
    metrics
        .budget_cap_usd
        .with_label_values(&["global"])
        .set(usd(caps.day));
    metrics
        .budget_cap_usd
        .with_label_values(&["task"])
        .set(usd(caps.task));
    for (playbook, cap) in &caps.playbook_day {
        metrics
            .budget_cap_usd
            .with_label_values(&[&format!("playbook:{playbook}")])
            .set(usd(*cap));
    }

    // Bound before any actor starts, so a taken port fails the start cleanly.
    let listener = tokio::net::TcpListener::bind(&config.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on metrics_addr {}", config.metrics_addr))?;
    let console = match config.console().map_err(|e| anyhow::anyhow!(e))? {
        Some(console) => {
            let listener = tokio::net::TcpListener::bind(console.addr)
                .await
                .with_context(|| format!("cannot listen on console_addr {}", console.addr))?;
            Some((listener, console))
        }
        None => None,
    };
    Ok(Prepared {
        store,
        local_nats,
        nats,
        url,
        ctx,
        metrics,
        catalog,
        tool_set,
        knowledge,
        listener,
        console,
        in_flight: EffectsInFlight::default(),
    })
}

impl Prepared {
    /// Starts the node's actors: from here it serves, and stops only in order.
    async fn launch(self, config: &Config) -> anyhow::Result<Started> {
        let ctx = self.ctx;
        let (fatal_tx, fatal_rx) = mpsc::unbounded_channel();
        let children = child_specs(
            &ctx,
            &self.catalog,
            &self.tool_set,
            &self.knowledge,
            &self.in_flight,
        );
        let (root, root_handle) = Actor::spawn(
            Some(actor_name("root", &config.node_id)),
            NodeSupervisor,
            NodeSupervisorArgs {
                children,
                policy: RestartPolicy::default(),
                metrics: self.metrics.clone(),
                fatal: fatal_tx,
            },
        )
        .await
        .context("cannot start the node's actors")?;
        let hooks = Arc::new(crate::hooks::Hooks {
            catalog: self.catalog.clone(),
            nats: self.nats.clone(),
            metrics: self.metrics,
            body_bytes_max: config.webhook_body_bytes_max,
        });
        let http_task = tokio::spawn(http::serve(self.listener, ctx.clone(), hooks));
        let console_task = self.console.map(|(listener, console)| {
            tracing::info!(addr = %console.addr, "console: serving");
            tokio::spawn(crate::console::serve(listener, console, ctx.clone()))
        });
        let trim_task = tokio::spawn(return_freed_memory());
        Ok(Started {
            store: self.store,
            local_nats: self.local_nats,
            nats: self.nats,
            url: self.url,
            playbooks: self.catalog.len(),
            in_flight: self.in_flight,
            ctx,
            root,
            root_handle,
            fatal_rx,
            http_task,
            console_task,
            trim_task,
        })
    }
}

impl Started {
    /// Serves until `shutdown` completes or a supervisor escalates, then stops in order.
    async fn serve(
        mut self,
        config: &Config,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        // Resuming thousands of tasks takes a while; a signal meanwhile stops the node
        // in order like any other (the tasks not yet resumed stay checkpointed).
        let (url, playbooks) = (&self.url, self.playbooks);
        let resume_then_serve = async {
            let resumed = resume_tasks(&config.node_id).await;
            tracing::info!(node_id = %config.node_id, nats = %crate::nats_url::display(url), resumed = ?resumed, playbooks, "node ready");
            std::future::pending::<std::convert::Infallible>().await
        };
        let outcome = tokio::select! {
            biased;
            () = shutdown => Ok(()),
            reason = self.fatal_rx.recv() => Err(reason.unwrap_or_else(|| "supervisor stopped".into())),
            never = resume_then_serve => match never {},
        };

        // Stop in order: no new work, let running steps finish, stop the actors (every
        // transition is already committed), publish what the outbox holds, close.
        tracing::info!("stopping node");
        let _ = self
            .root
            .call(NodeSupervisorMsg::Stopping, Some(Duration::from_secs(5)))
            .await;
        if let Some(intake) = ractor::registry::where_is(actor_name(roles::INTAKE, &config.node_id))
        {
            let _ = intake
                .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(5)))
                .await;
        }
        self.ctx.start_draining();
        wait_for_steps(&self.in_flight, config).await;
        stop_children(&self.root.get_cell()).await;
        self.root.stop(Some("shutdown".into()));
        let _ = self.root_handle.await;
        self.http_task.abort();
        if let Some(console) = self.console_task {
            console.abort();
        }
        self.trim_task.abort();
        let _ = self.nats.flush().await;
        drop(self.nats);
        if let Some(local) = self.local_nats {
            local.stop().await;
        }
        drop(self.ctx);
        drop(self.store);
        match outcome {
            Ok(()) => {
                tracing::info!("node stopped");
                Ok(())
            }
            Err(reason) => bail!("node stopped after an unrecoverable failure: {reason}"),
        }
    }
}

fn settings(config: &Config, seed: u64, step_defaults: StepDefaults) -> Settings {
    Settings {
        node_id: config.node_id.clone(),
        payload_bytes_max: config.payload_bytes_max,
        hop_timeout: Duration::from_millis(config.hop_timeout_ms),
        exec_timeout_margin: Duration::from_millis(config.hop_timeout_ms),
        limits: Limits {
            retry_delay_ms_base: config.retry_delay_ms_base,
            retry_delay_ms_max: config.retry_delay_ms_max,
            approval_ttl_ms: config.approval_ttl_ms,
            checkpoints_replicated: config.cluster,
            approval_default: if config.approval_default == "approve" {
                ApprovalDecision::Approve
            } else {
                ApprovalDecision::Deny
            },
            ..Limits::default()
        },
        step_defaults,
        tools: ToolConfig {
            file_roots: config.file_roots.clone(),
            file_fsync: config.file_fsync,
            shell_allow: config.shell_allow.clone(),
            output_bytes_max: config.output_bytes_max,
            // Validated with the config.
            smtp: config.smtp().ok().flatten(),
        },
        exec_concurrency_max: config.exec_concurrency_max,
        // Validated with the config.
        tool_concurrency_max: config.tool_concurrency().unwrap_or_default(),
        rate_limits: config
            .rate_limits
            .iter()
            .filter_map(|t| actors::rate::RateLimit::parse(t).ok())
            .collect(),
        mailbox_depth_max: config.mailbox_depth_max,
        task_restarts_max: config.task_restarts_max,
        restart_window: Duration::from_secs(60),
        seed,
        // Validated with the config.
        tool_costs: config.tool_costs().unwrap_or_default(),
        policies_dir: (!config.policies_dir.as_os_str().is_empty())
            .then(|| config.policies_dir.clone()),
        policy_reload: Duration::from_millis(config.policy_reload_ms),
        caps: config.caps().unwrap_or_default(),
        tags: config.tag_map().unwrap_or_default(),
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        js_domain: config.nats_js_domain.clone(),
        // Validated with the config.
        faults: Arc::new(actors::faults::Faults::new(
            actors::faults::Faults::parse(&config.fault_panic).unwrap_or_default(),
            config.fault_panic_max,
            seed,
        )),
        knowledge: KnowledgeSettings {
            retention: actors::knowledge::Retention {
                age_ms_max: config.episode_age_days_max.saturating_mul(86_400_000),
                count_max: config.episodes_max,
                bytes_max: config.episodes_bytes_max,
            },
            prune_interval: Duration::from_millis(config.episode_prune_interval_ms),
            write_wait: Duration::from_millis(config.knowledge_write_wait_ms),
        },
        schedule_tick: Duration::from_millis(config.schedule_tick_ms),
        schedule_grace: Duration::from_millis(config.schedule_grace_ms),
        low_priority_window: Duration::from_millis(config.low_priority_window_ms),
        low_priority_concurrency_max: config.low_priority_concurrency_max,
    }
}

/// Where a node keeps its RocksDB store, under its data dir.
pub fn store_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("store")
}

/// The node's actors, in start order: the relay before anything commits, the task
/// supervisor before intake feeds it, the task API and the node's announcement last.
fn child_specs(
    ctx: &Arc<NodeContext>,
    catalog: &Arc<Catalog>,
    tools: &[Arc<dyn tools::Tool>],
    knowledge: &Arc<actors::knowledge::Shared>,
    in_flight: &EffectsInFlight,
) -> Vec<ChildSpec> {
    let node = &ctx.settings.node_id;
    let (c, cat, t) = (ctx.clone(), catalog.clone(), tools.to_vec());
    vec![
        spec(roles::RELAY, node, Relay, {
            let ctx = c.clone();
            move || RelayArgs { ctx: ctx.clone() }
        }),
        spec(roles::AUDIT, node, AuditLog, {
            let ctx = c.clone();
            move || AuditArgs { ctx: ctx.clone() }
        }),
        // Before the task supervisor: the kill switch is applied before any task resumes.
        spec(roles::GOVERNOR, node, Governor, {
            let ctx = c.clone();
            move || GovernorArgs { ctx: ctx.clone() }
        }),
        spec(roles::TASKS, node, TaskSupervisor, {
            let ctx = c.clone();
            // First start: the node resumes tasks once every role is up. Restarts resume
            // at once, because the crashed supervisor's TaskActors died with it.
            let started = std::sync::atomic::AtomicBool::new(false);
            move || TaskSupervisorArgs {
                ctx: ctx.clone(),
                resume_on_start: started.swap(true, std::sync::atomic::Ordering::SeqCst),
            }
        }),
        // After the supervisor it reports to; renews the leases the resumed tasks claim.
        spec(roles::LEASES, node, LeaseKeeper, {
            let ctx = c.clone();
            move || LeaseKeeperArgs { ctx: ctx.clone() }
        }),
        spec(roles::PLANNER, node, Planner, {
            let (ctx, catalog) = (c.clone(), cat.clone());
            move || PlannerArgs {
                ctx: ctx.clone(),
                catalog: catalog.clone(),
            }
        }),
        spec(roles::EXECUTOR, node, Executor, {
            let ctx = c.clone();
            let in_flight = in_flight.clone();
            move || ExecutorArgs {
                ctx: ctx.clone(),
                tools: t.clone(),
                in_flight: in_flight.clone(),
            }
        }),
        spec(roles::VERIFIER, node, Verifier, {
            let ctx = c.clone();
            move || VerifierArgs { ctx: ctx.clone() }
        }),
        spec(roles::ARCHIVIST, node, Archivist, {
            let (ctx, catalog) = (c.clone(), cat.clone());
            move || ArchivistArgs {
                ctx: ctx.clone(),
                catalog: catalog.clone(),
            }
        }),
        spec(roles::KNOWLEDGE, node, Knowledge, {
            let (ctx, shared) = (c.clone(), knowledge.clone());
            move || KnowledgeArgs {
                ctx: ctx.clone(),
                shared: shared.clone(),
            }
        }),
        spec(roles::INTAKE, node, Intake, {
            let ctx = c.clone();
            move || IntakeArgs {
                ctx: ctx.clone(),
                catalog: cat.clone(),
            }
        }),
        // Last: once `cadre.tasks.*` answers, every other role (and the intake stream) is up.
        spec(roles::TASK_API, node, TaskApi, {
            let ctx = c.clone();
            move || TaskApiArgs { ctx: ctx.clone() }
        }),
        spec(roles::SECRETS, node, Secrets, {
            let ctx = c.clone();
            move || SecretsArgs { ctx: ctx.clone() }
        }),
        spec(roles::SCHEDULER, node, Scheduler, {
            let (ctx, catalog) = (c.clone(), catalog.clone());
            move || SchedulerArgs {
                ctx: ctx.clone(),
                catalog: catalog.clone(),
            }
        }),
        // Last: a node announces itself once it can serve.
        spec(roles::MEMBERSHIP, node, Membership, {
            let names: Vec<String> = tools.iter().map(|t| t.info().name.to_string()).collect();
            move || MembershipArgs {
                ctx: c.clone(),
                tools: names.clone(),
            }
        }),
    ]
}

/// A child that (re)starts as `actor`, registered as `<role>@<node>`, with fresh `args()`.
fn spec<A>(
    role: &'static str,
    node: &str,
    actor: A,
    args: impl Fn() -> A::Arguments + Send + Sync + 'static,
) -> ChildSpec
where
    A: Actor + Clone,
{
    let name = actor_name(role, node);
    ChildSpec {
        name: role,
        spawn: Arc::new(move |supervisor: ActorCell| {
            let (actor, name, args) = (actor.clone(), name.clone(), args());
            async move {
                Actor::spawn_linked(Some(name), actor, args, supervisor)
                    .await
                    .map(|(a, _)| a.get_cell())
            }
            .boxed()
        }),
    }
}

/// glibc keeps freed heap after a burst (say, 10,000 tasks resumed, then parked) instead
/// of returning it to the OS; trimming every few seconds brings RSS back down to what is in
/// use. A trim takes well under a millisecond when there is little to return.
async fn return_freed_memory() {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim only releases free heap pages; it takes glibc's own locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Starts an actor for every task a previous process left unfinished; how many.
async fn resume_tasks(node_id: &str) -> Option<ractor::rpc::CallResult<usize>> {
    let tasks = lookup::<TaskSupervisorMsg>(roles::TASKS, node_id)?;
    tasks
        .call(TaskSupervisorMsg::ResumeAll, Some(Duration::from_secs(120)))
        .await
        .ok()
}

/// Waits (bounded by the grace period) until no step is executing on this node. The
/// caller has set draining, so the count only falls (`executor::unless_draining`).
async fn wait_for_steps(in_flight: &EffectsInFlight, config: &Config) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.shutdown_grace_ms);
    loop {
        let running = in_flight.count();
        if running == 0 {
            tracing::info!("no step executing");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                running,
                "grace period over with steps still running; they resume from the ledger on restart"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the root's children, TaskActors first (via the task supervisor), the relay and
/// the audit publisher last so they publish everything committed before them.
async fn stop_children(root: &ActorCell) {
    let timeout = Some(Duration::from_secs(5));
    let mut publishers = Vec::new();
    for child in root.get_children() {
        if child
            .get_name()
            .is_some_and(|n| n.starts_with(roles::RELAY) || n.starts_with(roles::AUDIT))
        {
            publishers.push(child);
            continue;
        }
        let _ = child
            .stop_children_and_wait(Some("shutdown".into()), timeout)
            .await;
        let _ = child.stop_and_wait(Some("shutdown".into()), timeout).await;
    }
    for publisher in publishers {
        let _ = publisher
            .stop_and_wait(Some("shutdown".into()), timeout)
            .await;
    }
}

/// Connects to NATS (retrying the first connect, reconnecting forever after) and keeps
/// `cadre_nats_connected` / `cadre_nats_reconnects_total` true to the connection.
async fn connect_nats(
    config: &Config,
    url: &str,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<async_nats::Client> {
    let m = metrics.clone();
    let node = config.node_id.clone();
    let was_connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first_connect = was_connected.clone();
    let ca = (!config.nats_ca_file.as_os_str().is_empty()).then_some(config.nats_ca_file.as_path());
    let (options, bare_url) = crate::nats_url::options(url, ca);
    let client = options
        .name(format!("cadre-{}", config.node_id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .subscription_capacity(65_536)
        .connection_timeout(Duration::from_secs(5))
        // A connection that died silently (a laptop asleep, a network cut, a NAT that
        // forgot us) shows only when pings go unanswered: async-nats pings every 60 s and
        // gives up after two, so such a node would sit out for minutes. Every 5 s, it is
        // back within ~15 s of its network.
        .ping_interval(Duration::from_secs(5))
        .event_callback(move |event| {
            let (m, was_connected, node_id) = (m.clone(), was_connected.clone(), node.clone());
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                match event {
                    async_nats::Event::Connected => {
                        m.nats_connected.set(1);
                        if was_connected.swap(true, SeqCst) {
                            m.nats_reconnects_total.inc();
                            // Requests in flight may be lost with the connection: have
                            // the tasks re-send theirs now rather than at their timeout.
                            if let Some(tasks) = lookup::<TaskSupervisorMsg>(roles::TASKS, &node_id)
                            {
                                let _ = tasks.cast(TaskSupervisorMsg::Reconnected);
                            }
                        }
                    }
                    async_nats::Event::Disconnected => m.nats_connected.set(0),
                    _ => {}
                }
                tracing::info!(%event, "nats");
            }
        })
        .connect(bare_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {}",
                crate::nats_url::display(url)
            )
        })?;
    // The first connect may complete before the callback is installed on the
    // connection handler: take the state as it is now.
    if client.connection_state() == async_nats::connection::State::Connected {
        metrics.nats_connected.set(1);
        first_connect.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(client)
}
