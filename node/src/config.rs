//! Node configuration, layered: defaults → TOML file (`--config`) → environment
//! (`CADRE_<OPTION>`, one variable per option) → flags. Validated once, with messages
//! that say what to fix; `cadre node run --dump-config` prints the result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name: one subject token (`laptop`, `vps-1`).
    pub node_id: String,
    /// RocksDB store, and the local nats-server's JetStream store when it runs one.
    pub data_dir: PathBuf,
    /// NATS to connect to. Empty: start and supervise a local nats-server.
    pub nats_url: String,
    /// A PEM CA to trust for a `tls://` `nats_url` (a hub with a self-signed CA); empty:
    /// the system's roots. The CLI reads `CADRE_NATS_CA_FILE`.
    pub nats_ca_file: PathBuf,
    /// The JetStream domain of the hub when the node's server is a leaf node without
    /// JetStream of its own (ops/nats/leaf.conf: `cadre`); empty: the server's own.
    pub nats_js_domain: String,
    /// The nats-server binary for the local broker.
    pub nats_server_bin: String,
    /// Port of the local nats-server (loopback only).
    pub local_nats_port: u16,
    pub playbooks_dir: PathBuf,
    /// The business's identity (TOML: name, business, roles, voice, signature, contacts,
    /// working_hours), read by templates as `persona.*`; empty: none.
    pub persona_file: PathBuf,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: String,
    /// Roots `file.write` may write under (env: colon-separated).
    pub file_roots: Vec<PathBuf>,
    /// fsync files and directories on `file.write` (power-loss durability).
    pub file_fsync: bool,
    /// Programs `shell.run` may start (env: comma-separated).
    pub shell_allow: Vec<String>,
    pub payload_bytes_max: usize,
    /// Timeout of plan/verify/archive hops.
    pub hop_timeout_ms: u64,
    /// A step's timeout unless its playbook says otherwise.
    pub step_timeout_ms: u64,
    /// Attempts of a step unless its playbook says otherwise.
    pub step_attempts_max: u32,
    pub retry_delay_ms_base: u64,
    pub retry_delay_ms_max: u64,
    /// Steps one tool may run at once on this node.
    pub exec_concurrency_max: usize,
    /// Per-tool caps below `exec_concurrency_max`: `shell.run=2` (env: comma-separated).
    pub tool_concurrency_max: Vec<String>,
    /// Token-bucket rate limits per tool or target host: `http.request=10/s`,
    /// `host:api.example.com=30/m` (env: comma-separated).
    pub rate_limits: Vec<String>,
    /// Directory of Cedar policy files (`*.cedar`); empty: the built-in defaults
    /// (`policies/default.cedar`). Re-read when a file changes; an invalid change is
    /// refused and the policies in force stay.
    pub policies_dir: PathBuf,
    /// How often the policies directory is checked for changes.
    pub policy_reload_ms: u64,
    /// How long an approval request waits for a decision.
    pub approval_ttl_ms: u64,
    /// What an approval nobody decided in time becomes: `deny` or `approve`.
    pub approval_default: String,
    /// Estimated cost of one call, per tool, in US dollars: `http.request=0.002`
    /// (env: comma-separated). Recorded with every step; seen by the policies.
    pub tool_costs: Vec<String>,
    /// Cap on what one task may spend, US dollars; 0: none. A step that would cross a
    /// cap waits for an approval.
    pub budget_task_usd: f64,
    /// Cap on what all tasks may spend per UTC day, US dollars; 0: none.
    pub budget_day_usd: f64,
    /// Caps per playbook per UTC day: `weekly-newsletter=2.5` (env: comma-separated).
    pub budget_playbook_day_usd: Vec<String>,
    /// What this node says about itself, `key=value`: `location=laptop` (env:
    /// comma-separated). Shown by `cadre cluster status` and `nats micro info cadre`.
    pub tags: Vec<String>,
    /// How often the node writes its heartbeat to the `CADRE_NODES` bucket; a node not
    /// heard of for three heartbeats is reported as gone.
    pub heartbeat_ms: u64,
    /// Episodes (summaries of verified tasks) kept at most; the oldest go first.
    pub episodes_max: usize,
    /// …and at most this many bytes of them.
    pub episodes_bytes_max: u64,
    /// …and none older than this.
    pub episode_age_days_max: u64,
    /// How often the retention caps are applied.
    pub episode_prune_interval_ms: u64,
    /// How long `cadre.context.put` waits for its write to be applied before answering
    /// `pending` (the write is kept and applied when the stream can be reached).
    pub knowledge_write_wait_ms: u64,
    /// Run as one node of a cluster: tasks are owned under leases in the `CADRE_LEASES`
    /// bucket, checkpoints are replicated through JetStream, and a node takes over the
    /// tasks of one that stopped renewing. Needs JetStream on the NATS system.
    pub cluster: bool,
    /// How long a task's lease lives without renewal (whole seconds, at least 1 s):
    /// how soon another node takes over from one that died or froze.
    pub lease_ttl_ms: u64,
    /// Messages one role holds before it stops reading from NATS.
    pub mailbox_depth_max: usize,
    /// Captured stdout/stderr/HTTP body per step.
    pub output_bytes_max: usize,
    /// Crashes of one TaskActor within a minute before its task is failed.
    pub task_restarts_max: u32,
    /// On SIGTERM, how long in-flight steps may take to finish.
    pub shutdown_grace_ms: u64,
    /// `pretty` or `json`.
    pub log_format: String,
    /// A tracing filter: `info`, `cadre=debug,warn`.
    pub log_level: String,
    /// OTLP/HTTP endpoint (`http://collector:4318`) to export tracing spans to; empty:
    /// none. Needs a `cadre` built with the `otel` feature.
    pub otel_endpoint: String,
    /// Seed for jitter and ids; 0 picks one from the clock (logged at start).
    pub seed: u64,
    /// For the chaos suite only: roles that panic in their handler with a probability
    /// per message, `task=0.2` (env: comma-separated; roles: task, planner, executor,
    /// verifier, archivist, relay). Empty: none.
    pub fault_panic: Vec<String>,
    /// At most this many injected panics per role per run.
    pub fault_panic_max: u32,
    /// The LLM provider's OpenAI-compatible API: `https://api.openai.com/v1`, Ollama's
    /// `http://localhost:11434/v1`. Empty: no LLM (no goals, no `llm.generate`, no judge).
    pub llm_base_url: String,
    /// Its API key (env `CADRE_LLM_API_KEY`). Never logged or printed.
    pub llm_api_key: String,
    /// …or a file holding it (mode 0600 is advised), read at start.
    pub llm_api_key_file: PathBuf,
    /// The model every role uses unless routed below.
    pub llm_model: String,
    /// Routing by role: a larger model plans, a cheaper one runs `llm.generate` steps
    /// and judges. Empty: `llm_model`. A playbook's `[llm]` section routes its own.
    pub llm_planner_model: String,
    pub llm_executor_model: String,
    pub llm_judge_model: String,
    /// One attempt of one call.
    pub llm_timeout_ms: u64,
    /// Calls in flight at once to the provider.
    pub llm_concurrency_max: usize,
    /// Retries of a 429, 5xx or timeout (honouring `Retry-After`) before a call fails.
    pub llm_retries_max: u32,
    pub llm_retry_delay_ms_base: u64,
    pub llm_retry_delay_ms_max: u64,
    /// Prices by model, US dollars per million input/output tokens:
    /// `gpt-4o-mini=0.15/0.6` (env: comma-separated). Usage × price is each call's cost.
    pub llm_prices: Vec<String>,
    /// Times an invalid LLM plan is sent back with its errors before the task fails.
    pub llm_plan_repairs_max: u32,
    /// Hard cap on a planning prompt, in characters.
    pub llm_prompt_chars_max: usize,
    /// Steps an LLM plan has at least (at most 7).
    pub llm_plan_steps_min: usize,
    /// Tools the LLM planner may use (env: comma-separated). `shell.run` is left out
    /// unless named: a model choosing programs to run deserves a deliberate opt-in.
    pub llm_plan_tools: Vec<String>,
    /// Context keys, by prefix, whose latest values the planning prompt shows.
    pub llm_context_prefixes: Vec<String>,
    /// How often the scheduler looks for due firings (the node holding the schedules'
    /// lease fires them).
    pub schedule_tick_ms: u64,
    /// A firing found later than this (the cluster was down) is missed and follows its
    /// schedule's `missed` policy: `catch_up_once` or `skip`.
    pub schedule_grace_ms: u64,
    /// Largest body `POST /hooks/<name>` takes.
    pub webhook_body_bytes_max: usize,
    /// The 32-byte key that seals this node's secrets; empty: `<data_dir>/secrets.key`,
    /// made (mode 0600) at first start. Back it up with the store: without it the
    /// secrets cannot be opened.
    pub secrets_key_file: PathBuf,
    /// `email.send`'s SMTP server; empty: the tool refuses every send.
    pub smtp_host: String,
    pub smtp_port: u16,
    /// `starttls` (587, the default), `tls` (465) or `none` (a relay on this host only).
    pub smtp_tls: String,
    /// Empty: no authentication.
    pub smtp_user: String,
    /// The name of the secret (`cadre secret set`) holding the SMTP password.
    pub smtp_password_secret: String,
    /// The default `From` of `email.send`: `Ops <ops@example.com>`.
    pub mail_from: String,
    /// A PEM CA to trust for the SMTP server besides the system's; empty: none.
    pub smtp_ca_file: PathBuf,
    /// Low-priority tasks wait for the next multiple of this (their batch window)…
    pub low_priority_window_ms: u64,
    /// …and at most this many run at once on a node.
    pub low_priority_concurrency_max: usize,
    /// The operator console's address. Loopback by default: put it behind a TLS proxy
    /// to reach it from elsewhere (README). It is served only when
    /// `console_password_hash` is set.
    pub console_addr: String,
    /// The operator's credential, as an Argon2id PHC string (`cadre console
    /// hash-password`); empty: no console.
    pub console_password_hash: String,
    /// Who the console's decisions are recorded as (`<name>@console`).
    pub console_operator: String,
    /// How long a console login lasts.
    pub console_session_ttl_ms: u64,
    /// The origin the browser sees when the console is behind a proxy
    /// (`https://ops.example.com`): POSTs must come from it, and its cookies are
    /// `Secure` when it is https. Empty: the console's own address.
    pub console_origin: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "node-1".into(),
            data_dir: PathBuf::from("cadre-data"),
            nats_url: String::new(),
            nats_ca_file: PathBuf::new(),
            nats_js_domain: String::new(),
            nats_server_bin: "nats-server".into(),
            local_nats_port: 4222,
            playbooks_dir: PathBuf::from("playbooks"),
            persona_file: PathBuf::new(),
            metrics_addr: "127.0.0.1:9464".into(),
            file_roots: Vec::new(),
            file_fsync: true,
            shell_allow: Vec::new(),
            payload_bytes_max: 1 << 20,
            hop_timeout_ms: 5_000,
            step_timeout_ms: 30_000,
            step_attempts_max: 3,
            retry_delay_ms_base: 200,
            retry_delay_ms_max: 10_000,
            exec_concurrency_max: 256,
            tool_concurrency_max: Vec::new(),
            rate_limits: Vec::new(),
            policies_dir: PathBuf::new(),
            policy_reload_ms: 2_000,
            approval_ttl_ms: 86_400_000,
            approval_default: "deny".into(),
            tool_costs: Vec::new(),
            budget_task_usd: 0.0,
            budget_day_usd: 0.0,
            budget_playbook_day_usd: Vec::new(),
            tags: Vec::new(),
            heartbeat_ms: 5_000,
            episodes_max: 10_000,
            episodes_bytes_max: 256 << 20,
            episode_age_days_max: 90,
            episode_prune_interval_ms: 60_000,
            knowledge_write_wait_ms: 5_000,
            cluster: false,
            lease_ttl_ms: 6_000,
            mailbox_depth_max: 4_096,
            output_bytes_max: 64 << 10,
            task_restarts_max: 5,
            shutdown_grace_ms: 10_000,
            log_format: "pretty".into(),
            log_level: "info".into(),
            otel_endpoint: String::new(),
            seed: 0,
            fault_panic: Vec::new(),
            fault_panic_max: 3,
            llm_base_url: String::new(),
            llm_api_key: String::new(),
            llm_api_key_file: PathBuf::new(),
            llm_model: String::new(),
            llm_planner_model: String::new(),
            llm_executor_model: String::new(),
            llm_judge_model: String::new(),
            llm_timeout_ms: 60_000,
            llm_concurrency_max: 4,
            llm_retries_max: 4,
            llm_retry_delay_ms_base: 500,
            llm_retry_delay_ms_max: 30_000,
            llm_prices: Vec::new(),
            llm_plan_repairs_max: 2,
            llm_prompt_chars_max: 24_000,
            llm_plan_steps_min: 3,
            llm_plan_tools: ["llm.generate", "file.write", "http.request", "context.put"]
                .map(String::from)
                .to_vec(),
            llm_context_prefixes: vec!["pref.".into(), "project.".into()],
            schedule_tick_ms: 1_000,
            schedule_grace_ms: 60_000,
            webhook_body_bytes_max: 256 << 10,
            secrets_key_file: PathBuf::new(),
            smtp_host: String::new(),
            smtp_port: 587,
            smtp_tls: "starttls".into(),
            smtp_user: String::new(),
            smtp_password_secret: "smtp_password".into(),
            mail_from: String::new(),
            smtp_ca_file: PathBuf::new(),
            low_priority_window_ms: 60_000,
            low_priority_concurrency_max: 2,
            console_addr: "127.0.0.1:9480".into(),
            console_password_hash: String::new(),
            console_operator: "operator".into(),
            console_session_ttl_ms: 12 * 3_600_000,
            console_origin: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Flag overrides (the last layer). `None` leaves the value from earlier layers.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub node_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub nats_url: Option<String>,
    pub playbooks_dir: Option<PathBuf>,
    pub metrics_addr: Option<String>,
}

impl Config {
    /// Layers the sources in order and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = match toml::Table::try_from(Config::default()) {
            Ok(t) => t,
            Err(e) => return Err(ConfigError::Invalid(vec![format!("defaults: {e}")])),
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.into(),
                source,
            })?;
            let overlay: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.into(),
                message: e.to_string(),
            })?;
            for (key, value) in overlay {
                if !table.contains_key(&key) {
                    let known: Vec<_> = table.keys().cloned().collect();
                    return Err(ConfigError::Parse {
                        path: path.into(),
                        message: format!("unknown option `{key}` (known: {})", known.join(", ")),
                    });
                }
                table.insert(key, value);
            }
        }
        for (var, raw) in env {
            let Some(key) = var.strip_prefix("CADRE_").map(str::to_ascii_lowercase) else {
                continue;
            };
            let Some(current) = table.get(&key) else {
                continue;
            };
            let value = env_value(&key, current, &raw).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
            table.insert(key, value);
        }
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(vec![e.to_string()]))?;
        if let Some(v) = &flags.node_id {
            config.node_id = v.clone();
        }
        if let Some(v) = &flags.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = &flags.nats_url {
            config.nats_url = v.clone();
        }
        if let Some(v) = &flags.playbooks_dir {
            config.playbooks_dir = v.clone();
        }
        if let Some(v) = &flags.metrics_addr {
            config.metrics_addr = v.clone();
        }
        config.validate()?;
        Ok(config)
    }

    /// Every problem at once, each saying what to fix.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if !actors::protocol::subject::is_token(&self.node_id) {
            problems.push(format!(
                "node_id `{}` must be letters, digits, `-` or `_` (CADRE_NODE_ID)",
                self.node_id
            ));
        }
        if !self.nats_js_domain.is_empty()
            && !actors::protocol::subject::is_token(&self.nats_js_domain)
        {
            problems.push(format!(
                "nats_js_domain `{}` must be letters, digits, `-` or `_` (CADRE_NATS_JS_DOMAIN)",
                self.nats_js_domain
            ));
        }
        if self.metrics_addr.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "metrics_addr `{}` must be host:port, e.g. 127.0.0.1:9464",
                self.metrics_addr
            ));
        }
        if !self.nats_url.is_empty()
            && !self.nats_url.contains("://")
            && !self.nats_url.contains(':')
        {
            problems.push(format!(
                "nats_url `{}` must look like nats://host:4222",
                self.nats_url
            ));
        }
        let mut roots = Vec::new();
        for root in &self.file_roots {
            if !root.is_absolute() {
                problems.push(format!(
                    "file_roots entry `{}` must be an absolute path",
                    root.display()
                ));
                continue;
            }
            match root.canonicalize() {
                Ok(r) if r.is_dir() => roots.push(r),
                _ => problems.push(format!(
                    "file_roots entry `{}` must be an existing directory",
                    root.display()
                )),
            }
        }
        self.file_roots = roots;
        for (name, value) in [
            ("payload_bytes_max", self.payload_bytes_max as u64),
            ("hop_timeout_ms", self.hop_timeout_ms),
            ("step_timeout_ms", self.step_timeout_ms),
            ("step_attempts_max", u64::from(self.step_attempts_max)),
            ("exec_concurrency_max", self.exec_concurrency_max as u64),
            ("mailbox_depth_max", self.mailbox_depth_max as u64),
            ("output_bytes_max", self.output_bytes_max as u64),
            ("task_restarts_max", u64::from(self.task_restarts_max)),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.payload_bytes_max > 64 << 20 {
            problems.push("payload_bytes_max must be at most 64 MiB (NATS' own limit)".into());
        }
        if self.step_attempts_max > 20 {
            problems.push("step_attempts_max must be at most 20".into());
        }
        if self.retry_delay_ms_base > self.retry_delay_ms_max {
            problems.push("retry_delay_ms_base must not exceed retry_delay_ms_max".into());
        }
        if !matches!(self.log_format.as_str(), "pretty" | "json") {
            problems.push(format!(
                "log_format `{}` must be `pretty` or `json`",
                self.log_format
            ));
        }
        for text in &self.rate_limits {
            match actors::rate::RateLimit::parse(text) {
                Ok(limit) => {
                    if let Some(tool) = limit.key.strip_prefix("tool:")
                        && actors::tools::info(tool).is_none()
                    {
                        problems.push(format!("rate limit `{text}`: {}", unknown_tool(tool)));
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        if let Err(e) = self.tool_concurrency() {
            problems.push(e);
        }
        if let Err(e) = self.tool_costs() {
            problems.push(e);
        }
        if let Err(e) = self.caps() {
            problems.push(e);
        }
        if let Err(e) = self.tag_map() {
            problems.push(e);
        }
        if let Err(e) = actors::faults::Faults::parse(&self.fault_panic) {
            problems.push(e);
        }
        if let Err(e) = self.persona() {
            problems.push(e);
        }
        if let Err(e) = self.llm() {
            problems.push(e);
        }
        if let Err(e) = self.smtp() {
            problems.push(e);
        }
        for (name, value) in [
            ("episodes_max", self.episodes_max as u64),
            ("episodes_bytes_max", self.episodes_bytes_max),
            ("episode_age_days_max", self.episode_age_days_max),
            ("episode_prune_interval_ms", self.episode_prune_interval_ms),
            ("knowledge_write_wait_ms", self.knowledge_write_wait_ms),
            ("schedule_tick_ms", self.schedule_tick_ms),
            ("schedule_grace_ms", self.schedule_grace_ms),
            ("webhook_body_bytes_max", self.webhook_body_bytes_max as u64),
            ("low_priority_window_ms", self.low_priority_window_ms),
            (
                "low_priority_concurrency_max",
                self.low_priority_concurrency_max as u64,
            ),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if let Err(e) = self.console() {
            problems.push(e);
        }
        if self.heartbeat_ms == 0 {
            problems.push("heartbeat_ms must be greater than 0".into());
        }
        if self.lease_ttl_ms < 1_000 || !self.lease_ttl_ms.is_multiple_of(1_000) {
            problems.push(format!(
                "lease_ttl_ms {} must be whole seconds, at least 1000 (the server's TTLs are in seconds)",
                self.lease_ttl_ms
            ));
        }
        if !matches!(self.approval_default.as_str(), "deny" | "approve") {
            problems.push(format!(
                "approval_default `{}` must be `deny` or `approve`",
                self.approval_default
            ));
        }
        for (name, value) in [
            ("approval_ttl_ms", self.approval_ttl_ms),
            ("policy_reload_ms", self.policy_reload_ms),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if !self.policies_dir.as_os_str().is_empty() && !self.policies_dir.is_dir() {
            problems.push(format!(
                "policies_dir `{}` must be an existing directory (CADRE_POLICIES_DIR), or empty for the built-in policies",
                self.policies_dir.display()
            ));
        }
        if !self.otel_endpoint.is_empty() {
            if !cfg!(feature = "otel") {
                problems.push(
                    "otel_endpoint is set, but this cadre was built without OpenTelemetry: build it with `cargo build --features node/otel`, or unset the option".into(),
                );
            } else if !self.otel_endpoint.starts_with("http://")
                && !self.otel_endpoint.starts_with("https://")
            {
                problems.push(format!(
                    "otel_endpoint `{}` must be an http:// or https:// URL (OTLP/HTTP)",
                    self.otel_endpoint
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

impl Config {
    /// `tool_concurrency_max` as a map, checked.
    pub fn tool_concurrency(&self) -> Result<std::collections::HashMap<String, usize>, String> {
        let mut caps = std::collections::HashMap::new();
        for text in &self.tool_concurrency_max {
            let shape = || {
                format!(
                    "tool_concurrency_max entry `{text}` must look like `shell.run=2` (at least 1)"
                )
            };
            let (tool, n) = text.split_once('=').ok_or_else(shape)?;
            let n: usize = n.trim().parse().map_err(|_| shape())?;
            if n == 0 {
                return Err(shape());
            }
            let tool = tool.trim();
            if actors::tools::info(tool).is_none() {
                return Err(format!(
                    "tool_concurrency_max entry `{text}`: {}",
                    unknown_tool(tool)
                ));
            }
            caps.insert(tool.to_string(), n.min(self.exec_concurrency_max));
        }
        Ok(caps)
    }
}

impl Config {
    /// The console's settings, checked; `None` without `console_password_hash`.
    pub fn console(&self) -> Result<Option<crate::console::ConsoleConfig>, String> {
        if self.console_password_hash.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = self.console_addr.parse().map_err(|_| {
            format!(
                "console_addr `{}` must be host:port, e.g. 127.0.0.1:9480",
                self.console_addr
            )
        })?;
        crate::console::auth::check_hash(&self.console_password_hash).map_err(|e| {
            format!("console_password_hash: {e} (make one with `cadre console hash-password`)")
        })?;
        let operator = self.console_operator.trim();
        if operator.is_empty() || operator.len() > 64 || operator.chars().any(char::is_control) {
            return Err("console_operator must be a name of 1 to 64 printable characters".into());
        }
        if self.console_session_ttl_ms < 60_000 {
            return Err("console_session_ttl_ms must be at least 60000 (a minute)".into());
        }
        let origin = self.console_origin.trim_end_matches('/');
        if !(origin.is_empty() || origin.starts_with("https://") || origin.starts_with("http://")) {
            return Err(format!(
                "console_origin `{}` must be the URL the browser sees, e.g. https://ops.example.com",
                self.console_origin
            ));
        }
        Ok(Some(crate::console::ConsoleConfig {
            addr,
            password_hash: self.console_password_hash.clone(),
            operator: operator.to_string(),
            session_ttl: std::time::Duration::from_millis(self.console_session_ttl_ms),
            origin: (!origin.is_empty()).then(|| origin.to_string()),
        }))
    }

    /// `email.send`'s server, checked; `None` without `smtp_host`.
    pub fn smtp(&self) -> Result<Option<actors::tools::SmtpConfig>, String> {
        if self.smtp_host.is_empty() {
            return Ok(None);
        }
        let tls = match self.smtp_tls.as_str() {
            "starttls" => actors::tools::SmtpTls::StartTls,
            "tls" => actors::tools::SmtpTls::Tls,
            "none" => actors::tools::SmtpTls::None,
            other => {
                return Err(format!("smtp_tls `{other}` must be starttls, tls or none"));
            }
        };
        if self.mail_from.is_empty() {
            return Err("smtp_host is set but mail_from is not (CADRE_MAIL_FROM)".into());
        }
        if !self.smtp_user.is_empty() {
            actors::secrets::check_name(&self.smtp_password_secret)
                .map_err(|e| format!("smtp_password_secret: {e}"))?;
        }
        Ok(Some(actors::tools::SmtpConfig {
            host: self.smtp_host.clone(),
            port: self.smtp_port,
            tls,
            user: self.smtp_user.clone(),
            password_secret: self.smtp_password_secret.clone(),
            from: self.mail_from.clone(),
            timeout: std::time::Duration::from_millis(self.step_timeout_ms),
            ca_pem: if self.smtp_ca_file.as_os_str().is_empty() {
                None
            } else {
                Some(
                    std::fs::read(&self.smtp_ca_file).map_err(|e| {
                        format!("smtp_ca_file `{}`: {e}", self.smtp_ca_file.display())
                    })?,
                )
            },
        }))
    }

    /// The LLM provider's settings, checked; `None` without `llm_base_url`.
    pub fn llm(&self) -> Result<Option<actors::llm::LlmSettings>, String> {
        if self.llm_base_url.is_empty() {
            return Ok(None);
        }
        if !self.llm_base_url.starts_with("http://") && !self.llm_base_url.starts_with("https://") {
            return Err(format!(
                "llm_base_url `{}` must be an http:// or https:// URL, e.g. http://localhost:11434/v1",
                self.llm_base_url
            ));
        }
        if self.llm_model.is_empty() {
            return Err("llm_base_url is set but llm_model is not (CADRE_LLM_MODEL)".into());
        }
        let api_key = match (
            self.llm_api_key.is_empty(),
            self.llm_api_key_file.as_os_str().is_empty(),
        ) {
            (false, false) => {
                return Err("set llm_api_key or llm_api_key_file, not both".into());
            }
            (false, true) => Some(actors::llm::ApiKey::new(self.llm_api_key.clone())),
            (true, false) => {
                let text = std::fs::read_to_string(&self.llm_api_key_file).map_err(|e| {
                    format!(
                        "llm_api_key_file `{}`: {e}",
                        self.llm_api_key_file.display()
                    )
                })?;
                Some(actors::llm::ApiKey::new(text.trim().to_string()))
            }
            // Ollama and most local servers need none.
            (true, true) => None,
        };
        let mut prices = std::collections::HashMap::new();
        for text in &self.llm_prices {
            let (model, price) = text.split_once('=').ok_or_else(|| {
                format!("llm_prices entry `{text}` must look like `gpt-4o-mini=0.15/0.6`")
            })?;
            let price = actors::llm::Price::parse(price)
                .map_err(|e| format!("llm_prices entry `{text}`: {e}"))?;
            prices.insert(model.trim().to_string(), price);
        }
        for t in &self.llm_plan_tools {
            if actors::tools::info(t).is_none() {
                return Err(format!("llm_plan_tools: {}", unknown_tool(t)));
            }
        }
        if !(1..=actors::playbook::STEPS_MAX).contains(&self.llm_plan_steps_min) {
            return Err(format!(
                "llm_plan_steps_min {} must be 1 to {}",
                self.llm_plan_steps_min,
                actors::playbook::STEPS_MAX
            ));
        }
        for (name, value) in [
            ("llm_timeout_ms", self.llm_timeout_ms),
            ("llm_concurrency_max", self.llm_concurrency_max as u64),
            ("llm_prompt_chars_max", self.llm_prompt_chars_max as u64),
        ] {
            if value == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.llm_retry_delay_ms_base > self.llm_retry_delay_ms_max {
            return Err("llm_retry_delay_ms_base must not exceed llm_retry_delay_ms_max".into());
        }
        Ok(Some(actors::llm::LlmSettings {
            base_url: self.llm_base_url.clone(),
            api_key,
            models: actors::llm::Models {
                default: self.llm_model.clone(),
                planner: self.llm_planner_model.clone(),
                executor: self.llm_executor_model.clone(),
                judge: self.llm_judge_model.clone(),
            },
            timeout: std::time::Duration::from_millis(self.llm_timeout_ms),
            concurrency_max: self.llm_concurrency_max,
            retries_max: self.llm_retries_max,
            retry_delay_base: std::time::Duration::from_millis(self.llm_retry_delay_ms_base),
            retry_delay_max: std::time::Duration::from_millis(self.llm_retry_delay_ms_max),
            prices,
            plan_repairs_max: self.llm_plan_repairs_max,
            prompt_chars_max: self.llm_prompt_chars_max,
            plan_steps_min: self.llm_plan_steps_min,
            plan_tools: self.llm_plan_tools.clone(),
            context_prefixes: self.llm_context_prefixes.clone(),
        }))
    }

    /// The persona file, loaded and checked; `None` without one.
    pub fn persona(&self) -> Result<Option<actors::persona::Persona>, String> {
        if self.persona_file.as_os_str().is_empty() {
            return Ok(None);
        }
        actors::persona::Persona::load(&self.persona_file).map(Some)
    }

    /// `tool_costs` as millionths of a dollar per call, checked.
    pub fn tool_costs(&self) -> Result<std::collections::HashMap<String, u64>, String> {
        let mut costs = std::collections::HashMap::new();
        for text in &self.tool_costs {
            let shape = || {
                format!(
                    "tool_costs entry `{text}` must look like `http.request=0.002` (US dollars per call)"
                )
            };
            let (tool, usd) = text.split_once('=').ok_or_else(shape)?;
            let usd: f64 = usd.trim().parse().map_err(|_| shape())?;
            if !usd.is_finite() || usd < 0.0 {
                return Err(shape());
            }
            let tool = tool.trim();
            if actors::tools::info(tool).is_none() {
                return Err(format!("tool_costs entry `{text}`: {}", unknown_tool(tool)));
            }
            costs.insert(tool.to_string(), actors::budget::micros(usd));
        }
        Ok(costs)
    }

    /// `tags` as a map, checked: `key=value`, both subject tokens.
    pub fn tag_map(&self) -> Result<std::collections::BTreeMap<String, String>, String> {
        let mut tags = std::collections::BTreeMap::new();
        for text in &self.tags {
            let (k, v) = text
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .filter(|(k, v)| {
                    actors::protocol::subject::is_token(k) && actors::protocol::subject::is_token(v)
                })
                .ok_or_else(|| {
                    format!("tags entry `{text}` must look like `location=laptop` (letters, digits, `-`, `_`)")
                })?;
            tags.insert(k.to_string(), v.to_string());
        }
        Ok(tags)
    }

    /// The budget caps, in millionths of a dollar, checked.
    pub fn caps(&self) -> Result<actors::budget::Caps, String> {
        let micros = |name: &str, usd: f64| {
            if usd.is_finite() && usd >= 0.0 {
                Ok(actors::budget::micros(usd))
            } else {
                Err(format!(
                    "{name} must be 0 (no cap) or a positive amount of US dollars"
                ))
            }
        };
        let mut playbook_day = std::collections::HashMap::new();
        for text in &self.budget_playbook_day_usd {
            let shape = || {
                format!(
                    "budget_playbook_day_usd entry `{text}` must look like `weekly-newsletter=2.5`"
                )
            };
            let (name, usd) = text.split_once('=').ok_or_else(shape)?;
            let usd: f64 = usd.trim().parse().map_err(|_| shape())?;
            playbook_day.insert(
                name.trim().to_string(),
                micros("budget_playbook_day_usd", usd)?,
            );
        }
        Ok(actors::budget::Caps {
            task: micros("budget_task_usd", self.budget_task_usd)?,
            day: micros("budget_day_usd", self.budget_day_usd)?,
            playbook_day,
        })
    }

    /// The policies this configuration names: the directory's, or the built-in ones.
    pub fn load_policies(
        &self,
    ) -> Result<actors::policy::Policies, Vec<actors::policy::PolicyError>> {
        if self.policies_dir.as_os_str().is_empty() {
            Ok(actors::policy::Policies::builtin())
        } else {
            actors::policy::Policies::load_dir(&self.policies_dir)
        }
    }
}

fn unknown_tool(name: &str) -> String {
    let known: Vec<&str> = actors::tools::CATALOG.iter().map(|t| t.name).collect();
    format!("no tool `{name}` (known: {})", known.join(", "))
}

/// Parses an environment value as the type the option has.
fn env_value(key: &str, current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    Ok(match current {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(raw.trim().parse().map_err(|_| {
            if raw.trim().parse::<u64>().is_ok() {
                format!("`{raw}` is above {} (options are signed 64-bit)", i64::MAX)
            } else {
                format!("`{raw}` is not a whole number")
            }
        })?),
        toml::Value::Float(_) => toml::Value::Float(
            raw.trim()
                .parse()
                .map_err(|_| format!("`{raw}` is not a number"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => return Err(format!("`{raw}` is not true/false")),
        }),
        toml::Value::Array(_) => {
            let sep = if key == "file_roots" { ':' } else { ',' };
            toml::Value::Array(
                raw.split(sep)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            )
        }
        _ => return Err("unsupported option type".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cadre.toml");
        std::fs::write(
            &file,
            "node_id = \"from-file\"\nstep_attempts_max = 5\nhop_timeout_ms = 100\n",
        )
        .unwrap();
        let root = dir.path().to_str().unwrap().to_string();
        let roots = format!("{root}:{root}");
        let c = Config::load(
            Some(&file),
            env(&[
                ("CADRE_NODE_ID", "from-env"),
                ("CADRE_FILE_ROOTS", &roots),
                ("CADRE_SHELL_ALLOW", "echo, git"),
                ("CADRE_HOP_TIMEOUT_MS", "250"),
                ("HOME", "/x"),
            ]),
            &Overrides {
                node_id: Some("from-flag".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.node_id, "from-flag");
        assert_eq!(c.step_attempts_max, 5, "file beats default");
        assert_eq!(c.hop_timeout_ms, 250, "env beats file");
        assert_eq!(c.file_roots.len(), 2);
        assert_eq!(c.shell_allow, vec!["echo", "git"]);
    }

    #[test]
    fn the_console_is_off_without_a_hash_and_checked_with_one() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert!(c.console().unwrap().is_none(), "no hash, no console");
        assert_eq!(c.console_addr, "127.0.0.1:9480", "loopback by default");
        let hash = crate::console::auth::hash_password("correct horse battery").unwrap();
        let c = Config::load(
            None,
            env(&[
                ("CADRE_CONSOLE_PASSWORD_HASH", &hash),
                ("CADRE_CONSOLE_ORIGIN", "https://ops.example.com/"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        let console = c.console().unwrap().expect("a console");
        assert_eq!(console.origin.as_deref(), Some("https://ops.example.com"));
        assert_eq!(console.operator, "operator");
        let err = Config::load(
            None,
            env(&[
                ("CADRE_CONSOLE_PASSWORD_HASH", "hunter2"),
                ("CADRE_CONSOLE_ADDR", "9480"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("console_addr `9480` must be host:port"),
            "{err}"
        );
        let err = Config::load(
            None,
            env(&[("CADRE_CONSOLE_PASSWORD_HASH", "hunter2")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("console_password_hash") && err.contains("cadre console hash-password"),
            "{err}"
        );
        let err = Config::load(
            None,
            env(&[
                ("CADRE_CONSOLE_PASSWORD_HASH", &hash),
                ("CADRE_CONSOLE_ORIGIN", "ops.example.com"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("console_origin `ops.example.com`"), "{err}");
    }

    #[test]
    fn errors_say_what_to_fix() {
        let err = Config::load(
            None,
            env(&[("CADRE_STEP_TIMEOUT_MS", "soon")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable CADRE_STEP_TIMEOUT_MS: `soon` is not a whole number"
        );
        let err = Config::load(
            None,
            env(&[("CADRE_SEED", "9421144489642055000")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable CADRE_SEED: `9421144489642055000` is above 9223372036854775807 (options are signed 64-bit)"
        );
        let err = Config::load(
            None,
            env(&[("CADRE_FAULT_PANIC", "task=0.5,cook=1")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("fault_panic entry `cook=1` must look like `task=0.2`"),
            "{err}"
        );
        let err = Config::load(
            None,
            env(&[
                ("CADRE_NODE_ID", "a.b"),
                ("CADRE_FILE_ROOTS", "relative"),
                ("CADRE_LOG_FORMAT", "xml"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("node_id `a.b`"), "{err}");
        assert!(err.contains("`relative` must be an absolute path"), "{err}");
        assert!(err.contains("log_format `xml`"), "{err}");
        let err = Config::load(
            None,
            env(&[
                (
                    "CADRE_RATE_LIMITS",
                    "http.request=10/s, host:api.example.com=30/x",
                ),
                ("CADRE_TOOL_CONCURRENCY_MAX", "mail.send=2"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`host:api.example.com=30/x` must look like"),
            "{err}"
        );
        assert!(
            err.contains("no tool `mail.send` (known: file.write"),
            "{err}"
        );
        let err = Config::load(
            None,
            env(&[("CADRE_OTEL_ENDPOINT", "http://collector:4318")]),
            &Overrides::default(),
        );
        if cfg!(feature = "otel") {
            assert!(err.is_ok());
        } else {
            let err = err.unwrap_err().to_string();
            assert!(
                err.contains("built without OpenTelemetry") && err.contains("--features node/otel"),
                "{err}"
            );
        }
        let err = Config::load(
            None,
            env(&[
                ("CADRE_TAGS", "location=laptop, gpu"),
                ("CADRE_TOOL_COSTS", "http.request=-1"),
                ("CADRE_BUDGET_PLAYBOOK_DAY_USD", "news"),
                ("CADRE_APPROVAL_DEFAULT", "maybe"),
                ("CADRE_POLICIES_DIR", "/no/such/dir"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        for want in [
            "tags entry `gpu` must look like `location=laptop`",
            "tool_costs entry `http.request=-1` must look like",
            "budget_playbook_day_usd entry `news` must look like",
            "approval_default `maybe` must be `deny` or `approve`",
            "policies_dir `/no/such/dir` must be an existing directory",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        let c = Config::load(
            None,
            env(&[
                ("CADRE_TOOL_COSTS", "http.request=0.002"),
                ("CADRE_BUDGET_DAY_USD", "2.5"),
                ("CADRE_BUDGET_PLAYBOOK_DAY_USD", "news=0.25"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.tool_costs().unwrap().get("http.request"), Some(&2_000));
        let caps = c.caps().unwrap();
        assert_eq!(
            (caps.day, caps.playbook_day.get("news")),
            (2_500_000, Some(&250_000))
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "nod_id = 1\n").unwrap();
        let err = Config::load(Some(&file), env(&[]), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown option `nod_id`"), "{err}");
    }
}
