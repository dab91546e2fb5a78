//! `cadre`: run a node, or drive one over NATS.

use std::path::PathBuf;
use std::time::Duration;

use actors::model::ApprovalDecision;
use actors::playbook::{Catalog, StepDefaults};
use actors::protocol::subject;
use clap::{Args, Parser, Subcommand, ValueEnum};
use node::cli::{CliError, Client};
use node::config::{Config, Overrides};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "cadre",
    version,
    about = "Cadre: the operating layer of a one-person business"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run or inspect a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Submit, inspect, cancel and resolve tasks.
    Task(TaskArgs),
    /// Validate playbooks.
    #[command(subcommand)]
    Playbook(PlaybookCommand),
    /// Read and check a node's hash-chained audit log.
    Audit(AuditArgs),
    /// Stop (`on`) or resume (`off`) all dispatching on every node; `status` reads it.
    Killswitch(KillSwitchArgs),
    /// Validate Cedar policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List, show and decide the approval requests of steps the policies hold back.
    Approvals(ApprovalsArgs),
    /// Today's spend against the budget caps, and the cost per verified task.
    Budget(ClientOpts),
    /// The nodes of this NATS system: version, tags, tools, load, last heartbeat.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Declare Cadre's JetStream streams on a NATS system, so tasks enqueued before any
    /// node starts are kept.
    Setup(ClientOpts),
    /// The versioned context store: read (at a version or a time), write, history,
    /// checkpoints and rollback.
    Context(ContextArgs),
    /// Consolidated memory: bounded search and a topic's history.
    Memory(MemoryArgs),
    /// Recurring tasks on cron schedules: list, add, pause, resume, remove.
    Schedule(ScheduleArgs),
    /// A node's sealed secrets (`{{secret.<name>}}` in params): set, rotate, list,
    /// delete. Values are read from stdin and never printed.
    Secret(SecretArgs),
    /// The operator console (served by a node with `console_password_hash` set).
    #[command(subcommand)]
    Console(ConsoleCommand),
}

#[derive(Subcommand)]
enum ConsoleCommand {
    /// Reads a password from stdin and prints its Argon2id hash for
    /// `console_password_hash` (`CADRE_CONSOLE_PASSWORD_HASH`).
    HashPassword,
}

#[derive(Args)]
struct SecretArgs {
    #[command(flatten)]
    opts: ClientOpts,
    /// The node that keeps the secret (secrets are per node).
    #[arg(long, env = "CADRE_NODE_ID", default_value = "node-1", global = true)]
    node: String,
    #[command(subcommand)]
    command: SecretCommand,
}

#[derive(Subcommand)]
enum SecretCommand {
    /// A new secret; its value is read from stdin (`printf %s "$TOKEN" | cadre secret set crm_token`).
    Set {
        name: String,
    },
    /// A new value for an existing secret, from stdin; steps dispatched from now use it.
    Rotate {
        name: String,
    },
    /// Names, versions and ages; never values.
    List,
    Delete {
        name: String,
    },
}

#[derive(Args)]
struct ScheduleArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    command: ScheduleCommand,
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// Every schedule with its next firing and the node that fires.
    List,
    /// Add (or replace) a schedule: run PLAYBOOK on CRON in TZ.
    Add {
        name: String,
        playbook: String,
        /// 5 fields (`min hour day month weekday`: `0 9 * * MON`), or 6 with seconds.
        #[arg(long)]
        cron: String,
        /// IANA time zone (`Europe/London`); UTC by default.
        #[arg(long, default_value = "")]
        tz: String,
        /// Input as a JSON object.
        #[arg(long)]
        input: Option<String>,
        /// Firings missed while no node ran: `catch_up_once` (default) or `skip`.
        #[arg(long, default_value = "catch_up_once")]
        missed: String,
    },
    Pause {
        name: String,
    },
    /// Resume: firings that fell due while paused are not made up.
    Resume {
        name: String,
    },
    Remove {
        name: String,
    },
}

#[derive(Args)]
struct ContextArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    command: ContextCommand,
}

#[derive(Subcommand)]
enum ContextCommand {
    /// A key's latest version, or the one at `--version`, or the one in force `--at`.
    Get {
        key: String,
        #[arg(long, conflicts_with = "at")]
        version: Option<u64>,
        /// Unix time in milliseconds.
        #[arg(long)]
        at: Option<u64>,
    },
    /// Write a new version. VALUE is JSON (`42`, `"text"`, `{"a":1}`); anything that is
    /// not JSON is taken as a string. `null` deletes.
    Put {
        key: String,
        value: String,
        /// Write only if the key is at this version now (0: absent).
        #[arg(long)]
        expect: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Versions, newest first.
    History {
        key: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Latest versions of the keys under a prefix.
    List {
        prefix: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Name the store's state now.
    Checkpoint {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Write, for every key changed since the checkpoint, a new version with its value
    /// then (nothing is destroyed).
    Rollback {
        checkpoint: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// What became of a write; without an id, this node's pending and latest rejected
    /// writes.
    Writes { write_id: Option<String> },
}

#[derive(Args)]
struct MemoryArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    command: MemoryCommand,
}

#[derive(Subcommand)]
enum MemoryCommand {
    /// Current facts ranked by relevance and recency, bounded.
    Search {
        query: String,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        chars_max: Option<usize>,
    },
    /// Every fact held on a topic, superseded ones included.
    History { topic: String },
    /// A verified task's episode (input, plan, outcomes, verdicts, timestamps), as JSON.
    Episode { task_id: String },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Start a node (SIGTERM or ctrl-c stops it cleanly).
    Run(NodeRunArgs),
}

#[derive(Args)]
struct NodeRunArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// NATS URL; empty or unset starts a local nats-server.
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long)]
    playbooks_dir: Option<PathBuf>,
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Print the effective configuration (defaults → file → env → flags) and exit.
    #[arg(long)]
    dump_config: bool,
}

#[derive(Subcommand)]
enum PlaybookCommand {
    /// Load every playbook in a directory and report every problem.
    Check {
        #[arg(default_value = "playbooks")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every node the cluster knows, alive or not (from the `CADRE_NODES` heartbeats).
    Status(ClientOpts),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Load every `*.cedar` file of a directory (or the built-in policies) and report
    /// every problem with its file, line and column; exit 2 if any.
    Check {
        /// The policies directory; unset: `CADRE_POLICIES_DIR`, else the built-in ones.
        #[arg(env = "CADRE_POLICIES_DIR")]
        dir: Option<PathBuf>,
    },
    /// Publish every `*.cedar` file of a directory to the whole cluster (checked first):
    /// every node enforces it instead of its own directory, a node that was away from
    /// when it returns.
    Publish {
        #[command(flatten)]
        opts: ClientOpts,
        /// The policies directory.
        dir: PathBuf,
        /// Who publishes (recorded in the audit log).
        #[arg(long, env = "USER")]
        by: Option<String>,
    },
}

#[derive(Args)]
struct ApprovalsArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    command: ApprovalsCommand,
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// Approvals waiting for a decision (`--all`: every approval of active tasks).
    List {
        #[arg(long)]
        all: bool,
    },
    /// One approval: what will be done, why it needs a person, its cost and state.
    Show { approval_id: String },
    /// Let the step run, exactly as requested.
    Approve {
        approval_id: String,
        /// Who decides (recorded in the audit log).
        #[arg(long, env = "USER")]
        by: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Refuse: the step fails without running, and so does its task.
    Deny {
        approval_id: String,
        #[arg(long, env = "USER")]
        by: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Any decision: approve or deny a dispatch; retry, mark_done or abort a step whose
    /// outcome is unknown.
    Decide {
        approval_id: String,
        #[arg(value_enum)]
        decision: DecideAs,
        #[arg(long, env = "USER")]
        by: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DecideAs {
    Approve,
    Deny,
    Retry,
    #[value(name = "mark_done")]
    MarkDone,
    Abort,
}

impl DecideAs {
    fn decision(self) -> ApprovalDecision {
        match self {
            DecideAs::Approve => ApprovalDecision::Approve,
            DecideAs::Deny => ApprovalDecision::Deny,
            DecideAs::Retry => ApprovalDecision::Retry,
            DecideAs::MarkDone => ApprovalDecision::MarkDone,
            DecideAs::Abort => ApprovalDecision::Abort,
        }
    }
}

#[derive(Args, Clone)]
struct ClientOpts {
    #[arg(
        long,
        env = "CADRE_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
}

#[derive(Args)]
struct TaskArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Args)]
struct KillSwitchArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[arg(value_enum)]
    action: KillSwitchAction,
    /// Who decides (recorded in the audit log).
    #[arg(long, env = "USER")]
    by: Option<String>,
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum KillSwitchAction {
    On,
    Off,
    Status,
}

#[derive(Args)]
struct AuditArgs {
    #[command(flatten)]
    opts: ClientOpts,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the chain and name the first record that does not hold (exit 1 if any).
    Verify {
        /// The node whose log to check (it answers over NATS).
        #[arg(long, env = "CADRE_NODE_ID", default_value = "node-1")]
        node: String,
        /// Read a store directly instead (the node's data dir; works while it runs).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print a node's last records; `--follow` keeps printing new ones.
    Tail {
        #[arg(long, env = "CADRE_NODE_ID", default_value = "node-1")]
        node: String,
        /// How many past records to print first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u64,
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Submit a task (a playbook, or `--goal` for the LLM planner); `--wait` follows it
    /// to the end.
    Submit {
        #[arg(required_unless_present = "goal")]
        playbook: Option<String>,
        /// A goal in plain words instead of a playbook (needs an LLM: CADRE_LLM_*).
        #[arg(long, conflicts_with = "playbook")]
        goal: Option<String>,
        /// Plan it no earlier than this RFC 3339 time (it is `scheduled` until then).
        #[arg(long, conflicts_with = "run_after")]
        run_at: Option<String>,
        /// …or this long from now: `90s`, `10m`, `2h`, `3d`.
        #[arg(long)]
        run_after: Option<String>,
        /// `high`, `normal` or `low` (default: the playbook's).
        #[arg(long)]
        priority: Option<String>,
        /// Input as a JSON object.
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// Idempotency key: the same key again returns the same task.
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// Show a task: status, plan, every step with attempts, verdicts and timing.
    Get { task_id: String },
    /// Most recent tasks first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        playbook: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        before: Option<String>,
    },
    Cancel {
        task_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Follow a task's events live until it ends; exit 0 only if it succeeded.
    Watch { task_id: String },
    /// The task's timeline: every transition, which actor on which node, when, how long,
    /// outcome, cost.
    Trace { task_id: String },
    /// Decide a step whose outcome is unknown.
    Resolve {
        task_id: String,
        #[arg(long)]
        step: String,
        #[arg(long, value_enum)]
        decision: Decision,
        #[arg(long)]
        by: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Decision {
    Retry,
    #[value(name = "mark_done")]
    MarkDone,
    Abort,
}

/// jemalloc, not glibc's malloc: the node allocates small, short-lived buffers on every
/// hop from many threads (tokio workers, the blocking pool, the commit writer), and
/// glibc's arena locks and fastbin consolidation cost a fifth of its CPU under load
/// (docs/PERFORMANCE.md). RocksDB's own C++ allocations stay with glibc.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start. Freed pages go back to the OS after about
/// a second, by jemalloc's background thread even while the node is idle: a burst (10,000
/// tasks resumed, then parked) must not leave RSS high (the parked-task target).
#[repr(transparent)]
struct MallocConf(*const u8);
// SAFETY: a pointer to a static, NUL-terminated string that nothing writes.
#[allow(unsafe_code)]
unsafe impl Sync for MallocConf {}
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf = MallocConf(
    c"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0"
        .as_ptr()
        .cast(),
);

/// glibc's malloc serves only what is not Rust here, RocksDB above all (Rust allocates
/// through jemalloc). Two arenas instead of one per thread, and a fixed trim threshold
/// (no dynamic raise), keep what it holds after a burst smaller and steadier: 10,000
/// parked tasks left +40.9 to +45.7 MiB against +41.5 to +51.5 MiB (docs/PERFORMANCE.md).
/// Called before any thread starts.
fn tune_glibc_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` only sets allocator parameters; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

fn main() {
    tune_glibc_malloc();
    let cli = Cli::parse();
    // One worker more than there are cores: a worker sometimes waits a moment in a
    // syscall (the WAL write of a commit written in place, the verifier's stat), and the
    // spare keeps the cores busy meanwhile (docs/PERFORMANCE.md: +10 % tasks/s on 2 cores).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cadre: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Node(NodeCommand::Run(args)) => node_run(args).await,
            Command::Playbook(PlaybookCommand::Check { dir }) => playbook_check(&dir),
            Command::Policy(PolicyCommand::Check { dir }) => policy_check(dir.as_deref()),
            Command::Policy(PolicyCommand::Publish { opts, dir, by }) => match policy_files(&dir) {
                Ok(files) => {
                    client_main(opts, |c| async move { c.policies_publish(files, by).await }).await
                }
                Err(code) => code,
            },
            Command::Budget(opts) => client_main(opts, |c| async move { c.budget().await }).await,
            Command::Cluster(ClusterCommand::Status(opts)) => {
                client_main(opts, |c| async move { c.cluster_status().await }).await
            }
            Command::Approvals(ApprovalsArgs { opts, command }) => {
                client_main(opts, |c| async move {
                    match command {
                        ApprovalsCommand::List { all } => c.approvals_list(all).await,
                        ApprovalsCommand::Show { approval_id } => {
                            c.approval_show(&approval_id).await
                        }
                        ApprovalsCommand::Approve {
                            approval_id,
                            by,
                            note,
                        } => {
                            c.decide(&approval_id, ApprovalDecision::Approve, by, note)
                                .await
                        }
                        ApprovalsCommand::Deny {
                            approval_id,
                            by,
                            note,
                        } => {
                            c.decide(&approval_id, ApprovalDecision::Deny, by, note)
                                .await
                        }
                        ApprovalsCommand::Decide {
                            approval_id,
                            decision,
                            by,
                            note,
                        } => c.decide(&approval_id, decision.decision(), by, note).await,
                    }
                })
                .await
            }
            Command::Setup(opts) => client_main(opts, |c| async move { setup(&c).await }).await,
            Command::Secret(SecretArgs {
                opts,
                node,
                command,
            }) => {
                // Read before connecting: a value typed at a prompt ends with a newline,
                // which is not part of it.
                let value = match &command {
                    SecretCommand::Set { .. } | SecretCommand::Rotate { .. } => {
                        let mut text = String::new();
                        if let Err(e) =
                            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                        {
                            eprintln!("cadre: cannot read the value from stdin: {e}");
                            return 2;
                        }
                        Some(text.trim_end_matches(['\r', '\n']).to_string())
                    }
                    _ => None,
                };
                client_main(
                    opts,
                    |c| async move { secret(&c, &node, command, value).await },
                )
                .await
            }
            Command::Console(ConsoleCommand::HashPassword) => {
                let mut text = String::new();
                if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
                    eprintln!("cadre: cannot read the password from stdin: {e}");
                    return 2;
                }
                let password = text.trim_end_matches(['\r', '\n']);
                if password.chars().count() < 12 {
                    eprintln!("cadre: the password must be at least 12 characters");
                    return 2;
                }
                match node::console::auth::hash_password(password) {
                    Ok(hash) => {
                        println!("{hash}");
                        0
                    }
                    Err(e) => {
                        eprintln!("cadre: {e}");
                        1
                    }
                }
            }
            Command::Schedule(ScheduleArgs { opts, command }) => {
                client_main(opts, |c| async move { schedule(&c, command).await }).await
            }
            Command::Context(ContextArgs { opts, command }) => {
                client_main(opts, |c| async move { context(&c, command).await }).await
            }
            Command::Memory(MemoryArgs { opts, command }) => {
                client_main(opts, |c| async move {
                    match command {
                        MemoryCommand::Search {
                            query,
                            top_k,
                            chars_max,
                        } => c.memory_search(&query, top_k, chars_max).await,
                        MemoryCommand::History { topic } => c.memory_history(&topic).await,
                        MemoryCommand::Episode { task_id } => {
                            let episode: Value = c
                                .request(
                                    actors::protocol::knowledge::MEMORY_EPISODE,
                                    &json!({"task_id": task_id}),
                                )
                                .await?;
                            node::cli::print_json(&episode);
                            Ok(())
                        }
                    }
                })
                .await
            }
            Command::Killswitch(KillSwitchArgs {
                opts,
                action,
                by,
                reason,
            }) => {
                let engaged = match action {
                    KillSwitchAction::On => Some(true),
                    KillSwitchAction::Off => Some(false),
                    KillSwitchAction::Status => None,
                };
                client_main(
                    opts,
                    |c| async move { c.killswitch(engaged, by, reason).await },
                )
                .await
            }
            Command::Audit(AuditArgs {
                opts,
                command:
                    AuditCommand::Verify {
                        data_dir: Some(dir),
                        node,
                    },
            }) => audit_verify_offline(&dir, node, opts.json),
            Command::Audit(AuditArgs { opts, command }) => {
                client_main(opts, |c| async move {
                    match command {
                        AuditCommand::Verify { node, .. } => c.audit_verify(&node).await,
                        AuditCommand::Tail {
                            node,
                            lines,
                            follow,
                        } => c.audit_tail(&node, lines, follow).await,
                    }
                })
                .await
            }
            Command::Task(TaskArgs { opts, command }) => {
                // Bad input is a usage error (exit 2) whether or not NATS is reachable.
                if let TaskCommand::Submit {
                    input: Some(text), ..
                } = &command
                    && let Err(e) = parse_input(text)
                {
                    eprintln!("cadre: {e}");
                    return e.exit_code();
                }
                client_main(opts, |c| task(c, command)).await
            }
        }
    });
    // Leave without running C++ static destructors: RocksDB's background threads can
    // still be running here, and one of them taking a mutex that a destructor has torn
    // down aborts the process ("pthread lock: Invalid argument", seen about once in
    // twelve SIGTERMs of the spine tests with jemalloc). Nothing is left to flush but
    // stdout and stderr: the store committed what the node promised, and the node is
    // built to survive kill -9 at any point anyway.
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    #[allow(unsafe_code)]
    // SAFETY: _exit(2) ends the process at once; no Rust state is touched after it.
    unsafe {
        libc::_exit(code)
    }
}

async fn context(c: &Client, command: ContextCommand) -> Result<(), CliError> {
    use actors::protocol::knowledge as kp;
    match command {
        ContextCommand::Get { key, version, at } => c.context_get(&key, version, at).await,
        ContextCommand::Put {
            key,
            value,
            expect,
            reason,
        } => {
            let value: Value = serde_json::from_str(&value).unwrap_or(Value::String(value));
            let req =
                json!({"key": key, "value": value, "expected_version": expect, "reason": reason});
            c.context_write(kp::CONTEXT_PUT, req).await
        }
        ContextCommand::History { key, limit } => c.context_history(&key, limit).await,
        ContextCommand::List { prefix, limit } => c.context_list(prefix, limit).await,
        ContextCommand::Checkpoint { name, reason } => {
            c.context_write(
                kp::CONTEXT_CHECKPOINT,
                json!({"name": name, "reason": reason}),
            )
            .await
        }
        ContextCommand::Rollback { checkpoint, reason } => {
            c.context_write(
                kp::CONTEXT_ROLLBACK,
                json!({"checkpoint": checkpoint, "reason": reason}),
            )
            .await
        }
        ContextCommand::Writes { write_id } => c.context_writes(write_id).await,
    }
}

async fn secret(
    c: &Client,
    node: &str,
    command: SecretCommand,
    value: Option<String>,
) -> Result<(), CliError> {
    use actors::protocol::subject;
    let by = std::env::var("USER").ok();
    let (op, req) = match command {
        SecretCommand::Set { name } => (
            "set",
            json!({"name": name, "value": value.unwrap_or_default(), "by": by}),
        ),
        SecretCommand::Rotate { name } => (
            "rotate",
            json!({"name": name, "value": value.unwrap_or_default(), "by": by}),
        ),
        SecretCommand::Delete { name } => ("delete", json!({"name": name})),
        SecretCommand::List => return c.secrets_list(&subject::secrets(node, "list")).await,
    };
    c.secret_change(&subject::secrets(node, op), req).await
}

async fn schedule(c: &Client, command: ScheduleCommand) -> Result<(), CliError> {
    use actors::protocol::subject;
    match command {
        ScheduleCommand::List => c.schedules().await,
        ScheduleCommand::Add {
            name,
            playbook,
            cron,
            tz,
            input,
            missed,
        } => {
            let input = match input {
                Some(text) => parse_input(&text)?,
                None => json!({}),
            };
            if !matches!(missed.as_str(), "catch_up_once" | "skip") {
                return Err(CliError::Usage(format!(
                    "--missed `{missed}` must be catch_up_once or skip"
                )));
            }
            let req = json!({"name": name, "playbook": playbook, "cron": cron, "tz": tz, "input": input, "missed": missed});
            c.schedule_change(subject::SCHEDULES_ADD, req).await
        }
        ScheduleCommand::Pause { name } => {
            c.schedule_change(subject::SCHEDULES_PAUSE, json!({"name": name}))
                .await
        }
        ScheduleCommand::Resume { name } => {
            c.schedule_change(subject::SCHEDULES_RESUME, json!({"name": name}))
                .await
        }
        ScheduleCommand::Remove { name } => {
            c.schedule_change(subject::SCHEDULES_REMOVE, json!({"name": name}))
                .await
        }
    }
}

async fn client_main<F, Fut>(opts: ClientOpts, f: F) -> i32
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>>,
{
    let timeout = Duration::from_millis(opts.timeout_ms);
    let result = match Client::connect(&opts.nats_url, timeout, opts.json).await {
        Ok(client) => f(client).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            if opts.json
                && let CliError::Reply(reply) = &e
            {
                node::cli::print_json(reply);
            } else {
                eprintln!("cadre: {e}");
            }
            e.exit_code()
        }
    }
}

async fn task(c: Client, command: TaskCommand) -> Result<(), CliError> {
    match command {
        TaskCommand::Submit {
            playbook,
            goal,
            run_at,
            run_after,
            priority,
            input,
            input_file,
            key,
            wait,
        } => {
            let input: Value = match (input, input_file) {
                (Some(text), _) => parse_input(&text)?,
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        CliError::Usage(format!("cannot read {}: {e}", path.display()))
                    })?;
                    parse_input(&text)?
                }
                (None, None) => json!({}),
            };
            let reply = c
                .submit(serde_json::json!({
                    "playbook": playbook, "goal": goal, "input": input,
                    "idempotency_key": key, "run_at": run_at, "run_after": run_after,
                    "priority": priority,
                }))
                .await?;
            if wait {
                c.watch(&reply.task_id).await?;
            }
            Ok(())
        }
        TaskCommand::Get { task_id } => c.show(&task_id).await.map(drop),
        TaskCommand::List {
            status,
            playbook,
            limit,
            before,
        } => {
            c.list(
                json!({"status": status, "playbook": playbook, "limit": limit, "before": before}),
            )
            .await
        }
        TaskCommand::Cancel { task_id, reason } => {
            c.control(
                subject::TASKS_CANCEL,
                json!({"task_id": task_id, "reason": reason}),
            )
            .await
        }
        TaskCommand::Watch { task_id } => c.watch(&task_id).await.map(drop),
        TaskCommand::Trace { task_id } => c.trace(&task_id).await.map(drop),
        TaskCommand::Resolve {
            task_id,
            step,
            decision,
            by,
            note,
        } => {
            let decision = match decision {
                Decision::Retry => "retry",
                Decision::MarkDone => "mark_done",
                Decision::Abort => "abort",
            };
            let req = json!({"task_id": task_id, "step_id": step, "decision": decision, "by": by, "note": note});
            c.control(subject::TASKS_RESOLVE, req).await
        }
    }
}

fn parse_input(text: &str) -> Result<Value, CliError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| CliError::Usage(format!("--input is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(CliError::Usage("--input must be a JSON object".into()));
    }
    Ok(value)
}

async fn setup(c: &Client) -> Result<(), CliError> {
    // The hub's domain when connected through a leaf server, as the node's option.
    let domain = std::env::var("CADRE_NATS_JS_DOMAIN").unwrap_or_default();
    let js = actors::bus::jetstream(c.nats().clone(), &domain);
    actors::roles::intake::ensure_intake_stream(&js, Config::default().payload_bytes_max)
        .await
        .map_err(|e| CliError::Unreachable(format!("cannot declare the intake stream: {e}")))?;
    println!(
        "stream {} ready: {} is durable",
        subject::INTAKE_STREAM,
        subject::TASKS_ENQUEUE
    );
    Ok(())
}

/// `cadre audit verify --data-dir`: opens the node's store read-only and walks the
/// chain. Exit 0 intact, 1 broken, 2 no readable store there.
fn audit_verify_offline(data_dir: &std::path::Path, node: String, json: bool) -> i32 {
    let path = node::run::store_path(data_dir);
    if !path.join("CURRENT").exists() {
        eprintln!(
            "cadre: no store in {} (give the node's data_dir)",
            data_dir.display()
        );
        return 2;
    }
    let store = match storage::Store::open_read_only(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cadre: cannot open the store in {}: {e}", path.display());
            return 2;
        }
    };
    match actors::roles::audit::verify(&store, node) {
        Ok(reply) => match node::cli::report_verify(&reply, json) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("cadre: {e}");
                e.exit_code()
            }
        },
        Err(e) => {
            eprintln!("cadre: {}", e.error.message);
            1
        }
    }
}

fn playbook_check(dir: &std::path::Path) -> i32 {
    let config = Config::default();
    let defaults = StepDefaults {
        max_attempts: config.step_attempts_max,
        timeout_ms: config.step_timeout_ms,
    };
    match Catalog::load_dir(dir, &defaults) {
        Ok(catalog) => {
            for name in catalog.names() {
                if let Some(pb) = catalog.get(name) {
                    println!(
                        "ok  {name}  v{}  {} steps  {}",
                        pb.version,
                        pb.step_count(),
                        pb.path.display()
                    );
                }
            }
            0
        }
        Err(errors) => {
            for e in errors {
                eprintln!("error: {e}");
            }
            2
        }
    }
}

fn policy_check(dir: Option<&std::path::Path>) -> i32 {
    let loaded = match dir {
        Some(dir) if !dir.as_os_str().is_empty() => actors::policy::Policies::load_dir(dir),
        _ => Ok(actors::policy::Policies::builtin()),
    };
    match loaded {
        Ok(p) => {
            println!(
                "ok  {} policies  version {}  {}",
                p.len(),
                p.version(),
                p.files().join(", ")
            );
            0
        }
        Err(errors) => {
            for e in errors {
                eprintln!("error: {e}");
            }
            2
        }
    }
}

/// The `*.cedar` files of `dir`, checked as one set (every problem printed; exit 2).
fn policy_files(dir: &std::path::Path) -> Result<std::collections::BTreeMap<String, String>, i32> {
    if let Err(errors) = actors::policy::Policies::load_dir(dir) {
        for e in errors {
            eprintln!("error: {e}");
        }
        return Err(2);
    }
    let mut files = std::collections::BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        eprintln!("cadre: cannot read {}: {e}", dir.display());
        2
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "cedar") {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                eprintln!("cadre: cannot read {}: {e}", path.display());
                2
            })?;
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.insert(name, text);
        }
    }
    Ok(files)
}

async fn node_run(args: NodeRunArgs) -> i32 {
    // Registered first: a SIGTERM or ctrl-c that comes while the node is still starting
    // (opening its store, waiting for NATS, resuming tasks) is kept, and `node::run`
    // races it with the start. Registered lazily, on the first poll of `shutdown`, such
    // a signal found the default action and killed the node, even after it had begun to
    // answer requests.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut interrupt) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(interrupt)) => (term, interrupt),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("cadre: cannot handle SIGTERM and SIGINT: {e}");
            return 1;
        }
    };
    let flags = Overrides {
        node_id: args.node_id,
        data_dir: args.data_dir,
        nats_url: args.nats_url,
        playbooks_dir: args.playbooks_dir,
        metrics_addr: args.metrics_addr,
    };
    let config = match Config::load(args.config.as_deref(), std::env::vars(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cadre: {e}");
            return 2;
        }
    };
    if args.dump_config {
        // The URL may carry a password: never print it.
        let shown = Config {
            nats_url: node::nats_url::display(&config.nats_url),
            llm_api_key: if config.llm_api_key.is_empty() {
                String::new()
            } else {
                "<redacted>".into()
            },
            console_password_hash: if config.console_password_hash.is_empty() {
                String::new()
            } else {
                "<redacted>".into()
            },
            ..config.clone()
        };
        match toml::to_string(&shown) {
            Ok(text) => {
                print!("{text}");
                return 0;
            }
            Err(e) => {
                eprintln!("cadre: {e}");
                return 1;
            }
        }
    }
    let _tracing = init_tracing(&config);
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = interrupt.recv() => tracing::info!("interrupt"),
        }
    };
    match node::run(config, shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("cadre: {e:#}");
            1
        }
    }
}

/// Logs to stderr, pretty or JSON; with the `otel` feature and `otel_endpoint` set, spans
/// (task_id, step_id, tool, attempt) are also exported over OTLP/HTTP.
#[cfg(not(feature = "otel"))]
type Tracing = TracingGuard;
#[cfg(feature = "otel")]
type Tracing = Option<otel::Flush>;

fn init_tracing(config: &Config) -> Tracing {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if config.log_format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otel")]
    {
        let (layer, provider) = otel::layer(config).unzip();
        registry.with(layer).init();
        provider
    }
    #[cfg(not(feature = "otel"))]
    {
        registry.init();
        TracingGuard
    }
}

/// Held until the node has stopped; with OpenTelemetry, dropping it flushes the spans
/// still batched.
#[cfg(not(feature = "otel"))]
struct TracingGuard;

use tracing_subscriber::Layer as _;

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;

    /// The OpenTelemetry layer, or none when no endpoint is configured. Spans are batched
    /// and sent by the SDK's own thread; a collector that is down costs dropped spans,
    /// never a blocked actor.
    /// Flushes and stops the exporter when dropped.
    pub struct Flush(opentelemetry_sdk::trace::SdkTracerProvider);

    impl Drop for Flush {
        fn drop(&mut self) {
            if let Err(e) = self.0.shutdown() {
                eprintln!("cadre: flushing OpenTelemetry spans: {e}");
            }
        }
    }

    pub fn layer<S>(
        config: &node::config::Config,
    ) -> Option<(impl tracing_subscriber::Layer<S>, Flush)>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        if config.otel_endpoint.is_empty() {
            return None;
        }
        // The exporter's HTTP client uses rustls and needs the process's crypto
        // provider, which is otherwise installed later, with the tools.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let endpoint = format!("{}/v1/traces", config.otel_endpoint.trim_end_matches('/'));
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("cadre: OpenTelemetry export disabled: {e}");
                return None;
            }
        };
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("cadre")
            .with_attribute(opentelemetry::KeyValue::new(
                "service.instance.id",
                config.node_id.clone(),
            ))
            .build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("cadre");
        Some((
            tracing_opentelemetry::layer().with_tracer(tracer),
            Flush(provider),
        ))
    }
}
