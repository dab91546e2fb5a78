//! The `cadre` client commands: the same subjects any NATS client uses.
//!
//! Exit codes scripts can rely on: 0 done (for `watch`: the task succeeded); 1 the node
//! answered with an error, or the watched task failed or was cancelled; 2 bad usage or
//! input; 3 NATS unreachable or no answer in time.

use std::time::Duration;

use actors::model::{ApprovalDecision, ApprovalState, StepStatus, TaskStatus};
use actors::protocol::{
    AUDIT_READ_MAX, ApprovalListReply, ApprovalView, AuditEntry, AuditReadReply, AuditRecord,
    AuditVerifyReply, BudgetReply, ClusterStatusReply, DecideReply, ErrorReply, KillSwitchState,
    ListReply, SubmitReply, TaskEvent, TaskStatusReply, TaskView, TraceReply, subject,
};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{}: {}", .0.error.code.as_str(), .0.error.message)]
    Reply(ErrorReply),
    #[error("{0}")]
    Unreachable(String),
    /// The command ran, but what it reports is a failure: the watched task failed or
    /// was cancelled, the audit chain is broken, an approval was void.
    #[error("{0}")]
    Unsuccessful(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Reply(_) | CliError::Unsuccessful(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
        }
    }
}

/// How often `watch` reads the task back, in case an event was missed.
const WATCH_RECHECK: Duration = Duration::from_secs(3);

pub struct Client {
    nats: async_nats::Client,
    timeout: Duration,
    pub json: bool,
}

impl Client {
    pub async fn connect(url: &str, timeout: Duration, json: bool) -> Result<Client, CliError> {
        let ca = crate::nats_url::cli_ca_file();
        let (options, bare_url) = crate::nats_url::options(url, ca.as_deref());
        let nats = options
            .name("cadre-cli")
            .connection_timeout(timeout)
            .connect(bare_url)
            .await
            .map_err(|e| {
                CliError::Unreachable(format!(
                    "cannot connect to NATS at {}: {e}",
                    crate::nats_url::display(url)
                ))
            })?;
        Ok(Client {
            nats,
            timeout,
            json,
        })
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Sends a JSON request; an `{"error": …}` reply becomes `CliError::Reply`.
    pub async fn request<Req: Serialize, Rep: DeserializeOwned>(
        &self,
        subject: &str,
        req: &Req,
    ) -> Result<Rep, CliError> {
        let payload = serde_json::to_vec(req).map_err(|e| CliError::Usage(e.to_string()))?;
        let request = async_nats::Request::new()
            .payload(Bytes::from(payload))
            .timeout(Some(self.timeout));
        let msg = self
            .nats
            .send_request(subject.to_string(), request)
            .await
            .map_err(|e| {
                CliError::Unreachable(format!(
                    "no answer on {subject}: {e} (is a cadre node running?)"
                ))
            })?;
        let value: Value = serde_json::from_slice(&msg.payload)
            .map_err(|e| CliError::Unreachable(format!("unreadable reply on {subject}: {e}")))?;
        if value.get("error").is_some()
            && let Ok(err) = serde_json::from_value::<ErrorReply>(value.clone())
        {
            return Err(CliError::Reply(err));
        }
        serde_json::from_value(value)
            .map_err(|e| CliError::Unreachable(format!("unexpected reply on {subject}: {e}")))
    }

    /// Submits a `SubmitRequest` (a playbook's task, or a goal for the LLM planner).
    pub async fn submit(&self, req: Value) -> Result<SubmitReply, CliError> {
        let playbook = req["playbook"]
            .as_str()
            .unwrap_or(actors::model::GOAL_PLAYBOOK)
            .to_string();
        let reply: SubmitReply = self.request(subject::TASKS_SUBMIT, &req).await?;
        if self.json {
            print_json(&reply);
        } else if reply.duplicate {
            println!(
                "task {} already exists for this idempotency key ({})",
                reply.task_id, reply.status
            );
        } else {
            println!("accepted task {} ({playbook})", reply.task_id);
        }
        Ok(reply)
    }

    pub async fn get(&self, task_id: &str) -> Result<TaskView, CliError> {
        self.request(subject::TASKS_GET, &serde_json::json!({"task_id": task_id}))
            .await
    }

    pub async fn show(&self, task_id: &str) -> Result<TaskView, CliError> {
        let task = self.get(task_id).await?;
        if self.json {
            print_json(&task);
        } else {
            print_task(&task);
        }
        Ok(task)
    }

    pub async fn list(&self, filter: Value) -> Result<(), CliError> {
        let reply: ListReply = self.request(subject::TASKS_LIST, &filter).await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        println!(
            "{:<26}  {:<22}  {:<17}  {:<13}  FAILURE",
            "TASK", "PLAYBOOK", "STATUS", "UPDATED"
        );
        for t in &reply.tasks {
            println!(
                "{:<26}  {:<22}  {:<17}  {:<13}  {}",
                t.task_id,
                t.playbook,
                t.status.as_str(),
                clock(t.updated_at_ms),
                t.failure.as_deref().unwrap_or("")
            );
        }
        if let Some(next) = &reply.next {
            println!("(more: --before {next})");
        }
        unanswered(&reply.unanswered);
        Ok(())
    }

    pub async fn control(&self, subject: &str, req: Value) -> Result<(), CliError> {
        let reply: TaskStatusReply = self.request(subject, &req).await?;
        if self.json {
            print_json(&reply);
        } else {
            println!("task {} is {}", reply.task_id, reply.status);
        }
        Ok(())
    }

    /// Follows a task's events until it ends; then prints its trace. Subscribes before
    /// reading the task, so no transition falls between the two.
    pub async fn watch(&self, task_id: &str) -> Result<TaskView, CliError> {
        if !subject::is_token(task_id) {
            return Err(CliError::Usage(format!("`{task_id}` is not a task id")));
        }
        let mut events = self
            .nats
            .subscribe(subject::task_events(task_id))
            .await
            .map_err(|e| CliError::Unreachable(e.to_string()))?;
        let mut task = self.get(task_id).await?;
        let mut last_seq = 0;
        // Events are plain publishes: one missed during a reconnect must not leave the
        // watch hanging, so the task is also read back every few seconds.
        let mut recheck = tokio::time::interval(WATCH_RECHECK);
        recheck.tick().await;
        while !task.status.is_terminal() && task.status != TaskStatus::AwaitingOperator {
            let msg = tokio::select! {
                msg = events.next() => msg,
                _ = recheck.tick() => {
                    task = self.get(task_id).await?;
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            let Ok(event) = serde_json::from_slice::<TaskEvent>(&msg.payload) else {
                continue;
            };
            if event.seq <= last_seq {
                continue; // at-least-once delivery: skip repeats
            }
            last_seq = event.seq;
            if self.json {
                print_json(&event);
            } else {
                print_event(&event);
            }
            if event.status.is_terminal() || event.status == TaskStatus::AwaitingOperator {
                task = self.get(task_id).await?;
            }
        }
        if !self.json {
            println!();
            print_task(&task);
        }
        match task.status {
            TaskStatus::Succeeded => Ok(task),
            TaskStatus::AwaitingOperator => Err(CliError::Unsuccessful(format!(
                "task {task_id} is waiting for an operator: cadre task resolve {task_id} --step <id> --decision retry|mark_done|abort"
            ))),
            other => Err(CliError::Unsuccessful(format!(
                "task {task_id} {other}: {}",
                task.failure.clone().unwrap_or_default()
            ))),
        }
    }
}

/// A cluster's list that some live node did not answer is partial: say so.
fn unanswered(nodes: &[String]) {
    if !nodes.is_empty() {
        eprintln!(
            "(partial: no answer from {}; their items are missing)",
            nodes.join(", ")
        );
    }
}

pub fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("cannot print: {e}"),
    }
}

fn clock(ms: u64) -> String {
    let secs = (ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    )
}

fn print_event(e: &TaskEvent) {
    let step = e
        .step_id
        .as_deref()
        .map(|s| format!(" {s}"))
        .unwrap_or_default();
    let attempt = e
        .attempt
        .map(|a| format!(" (attempt {a})"))
        .unwrap_or_default();
    let detail = e
        .detail
        .as_deref()
        .map(|d| format!(" — {d}"))
        .unwrap_or_default();
    println!(
        "{} #{:<3} {:<20}{step}{attempt}{detail}",
        clock(e.at_ms),
        e.seq,
        e.kind
    );
}

/// The task as a trace: one line per step with status, attempts, timing and verdict.
pub fn print_task(t: &TaskView) {
    println!(
        "task {}  playbook {}  node {}",
        t.task_id, t.playbook, t.node_id
    );
    println!(
        "status {}  created {}  updated {}  ({} ms)  cost ${:.4}",
        t.status,
        clock(t.created_at_ms),
        clock(t.updated_at_ms),
        t.updated_at_ms.saturating_sub(t.created_at_ms),
        t.cost_usd
    );
    for s in &t.steps {
        let took = match (s.started_at_ms, s.finished_at_ms) {
            (Some(a), Some(b)) => format!("{} ms", b.saturating_sub(a)),
            _ => "-".into(),
        };
        let mark = match s.status {
            StepStatus::Succeeded => "✓",
            StepStatus::Failed => "✗",
            StepStatus::OutcomeUnknown => "?",
            StepStatus::Skipped => "-",
            _ => "…",
        };
        println!(
            "  {mark} {:<16} {:<13} {:<15} attempts {}  {took}",
            s.id,
            s.tool,
            format!("{:?}", s.status).to_lowercase(),
            s.attempts
        );
        if let Some(v) = &s.verdict {
            for r in &v.reasons {
                println!("      {r}");
            }
        }
        if let Some(a) = &s.approval {
            let by = a
                .decided_by
                .as_deref()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default();
            println!(
                "      approval {} {}{by}: {}",
                a.approval_id,
                a.state.as_str(),
                a.reason
            );
        }
        if let Some(e) = &s.error
            && s.status != StepStatus::Succeeded
        {
            println!("      error: {e}");
        }
    }
    if let Some(a) = &t.attention {
        println!("needs attention: step {}: {}", a.step_id, a.reason);
    }
    if let Some(f) = &t.failure {
        println!("failure: {f}");
    }
    if let Some(r) = &t.result {
        println!("result: {r}");
    }
}

impl Client {
    /// `cadre killswitch on|off|status`.
    /// `cadre policy publish`: the cluster's policy set, published through any node.
    pub async fn policies_publish(
        &self,
        files: std::collections::BTreeMap<String, String>,
        by: Option<String>,
    ) -> Result<(), CliError> {
        let req = serde_json::json!({"files": files, "by": by});
        let set: actors::protocol::ClusterPolicies =
            self.request(subject::CONTROL_POLICIES, &req).await?;
        if self.json {
            print_json(&set);
        } else {
            println!(
                "published {} file(s), version {} (revision {}): every node enforces it",
                set.files.len(),
                set.version,
                set.revision
            );
        }
        Ok(())
    }

    pub async fn killswitch(
        &self,
        engaged: Option<bool>,
        by: Option<String>,
        reason: Option<String>,
    ) -> Result<(), CliError> {
        let req = serde_json::json!({"engaged": engaged, "by": by, "reason": reason});
        let ks: KillSwitchState = self.request(subject::CONTROL_KILLSWITCH, &req).await?;
        if self.json {
            print_json(&ks);
        } else {
            let state = if ks.engaged {
                "ENGAGED: no node dispatches any step"
            } else {
                "off: nodes dispatch"
            };
            let who = ks
                .by
                .as_deref()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default();
            let why = ks
                .reason
                .as_deref()
                .map(|r| format!(" — {r}"))
                .unwrap_or_default();
            let when = if ks.at_ms > 0 {
                format!(" (since {} UTC, revision {})", clock(ks.at_ms), ks.revision)
            } else {
                String::new()
            };
            println!("kill switch {state}{who}{why}{when}");
        }
        Ok(())
    }

    /// `cadre approvals list`: pending approvals, oldest first (`all`: every approval
    /// of the node's active tasks).
    pub async fn approvals_list(&self, all: bool) -> Result<(), CliError> {
        let req = serde_json::json!({"state": if all { "all" } else { "pending" }});
        let reply: ApprovalListReply = self.request(subject::APPROVALS_LIST, &req).await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        if reply.approvals.is_empty() {
            println!(
                "no approvals {}",
                if all { "on active tasks" } else { "pending" }
            );
        }
        for a in &reply.approvals {
            println!(
                "{}  {:<8}  {}/{}  {}  ${:.4}  expires {} UTC  — {}",
                a.approval_id,
                a.state.as_str(),
                a.playbook,
                a.step_id,
                a.tool,
                a.cost_usd,
                clock(a.expires_at_ms),
                a.reason
            );
        }
        unanswered(&reply.unanswered);
        Ok(())
    }

    /// `cadre cluster status`. Exit 1 if a known node is not alive.
    pub async fn cluster_status(&self) -> Result<(), CliError> {
        let reply: ClusterStatusReply = self
            .request(subject::CLUSTER_STATUS, &serde_json::json!({}))
            .await?;
        if self.json {
            print_json(&reply);
        } else {
            for n in &reply.nodes {
                let tags = n
                    .tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let ago = reply.at_ms.saturating_sub(n.heartbeat_at_ms) as f64 / 1000.0;
                println!(
                    "{:<12} {:<5} v{:<8} heartbeat {ago:.1}s ago  tasks {:>4}  steps {:>4}  approvals {:>3}{}  policies {}  [{tags}]  tools {}",
                    n.node_id,
                    if n.alive { "up" } else { "GONE" },
                    n.version,
                    n.tasks_in_flight,
                    n.steps_in_flight,
                    n.approvals_pending,
                    if n.killswitch_engaged {
                        "  KILL SWITCH"
                    } else {
                        ""
                    },
                    n.policy_version,
                    n.tools.join(",")
                );
            }
        }
        let gone: Vec<&str> = reply
            .nodes
            .iter()
            .filter(|n| !n.alive)
            .map(|n| n.node_id.as_str())
            .collect();
        if gone.is_empty() {
            Ok(())
        } else {
            Err(CliError::Unsuccessful(format!(
                "not heard of within three heartbeats: {}",
                gone.join(", ")
            )))
        }
    }

    /// `cadre secret list`: names, versions and ages.
    pub async fn secrets_list(&self, subject: &str) -> Result<(), CliError> {
        let reply: actors::protocol::SecretListReply =
            self.request(subject, &serde_json::json!({})).await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let age = |ms: u64| {
            let s = now.saturating_sub(ms) / 1000;
            match s {
                0..60 => format!("{s}s"),
                60..3600 => format!("{}m", s / 60),
                3600..86_400 => format!("{}h", s / 3600),
                _ => format!("{}d", s / 86_400),
            }
        };
        println!("node {}", reply.node_id);
        for s in &reply.secrets {
            println!(
                "  {:<32} v{:<4} set {} ago, last rotated {} ago",
                s.name,
                s.version,
                age(s.created_at_ms),
                age(s.rotated_at_ms)
            );
        }
        Ok(())
    }

    /// `cadre secret set|rotate|delete`: the secret's name and version, never its value.
    pub async fn secret_change(&self, subject: &str, req: Value) -> Result<(), CliError> {
        let info: actors::protocol::SecretInfo = self.request(subject, &req).await?;
        if self.json {
            print_json(&info);
        } else {
            println!("secret {} (version {})", info.name, info.version);
        }
        Ok(())
    }

    /// `cadre schedule list`.
    pub async fn schedules(&self) -> Result<(), CliError> {
        let reply: actors::protocol::ScheduleListReply = self
            .request(subject::SCHEDULES_LIST, &serde_json::json!({}))
            .await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        println!(
            "fired by: {}",
            reply
                .fired_by
                .as_deref()
                .unwrap_or("(no node holds the lease)")
        );
        for v in &reply.schedules {
            let r = &v.record;
            let tz = if r.spec.tz.is_empty() {
                "UTC"
            } else {
                &r.spec.tz
            };
            println!(
                "{:<24} {:<24} {:<18} {:<16} {}  next {}  fired {} skipped {}  missed: {}",
                r.spec.name,
                r.spec.playbook,
                r.spec.cron,
                tz,
                if r.paused { "paused " } else { "active " },
                v.next_fire.as_deref().unwrap_or("-"),
                r.fired,
                r.skipped,
                serde_json::to_value(r.spec.missed)
                    .ok()
                    .and_then(|m| m.as_str().map(str::to_string))
                    .unwrap_or_default()
            );
            if let Some(note) = &r.last_note {
                println!("    last: {note}");
            }
        }
        Ok(())
    }

    /// `cadre schedule add|pause|resume|remove`: prints the schedule as it now stands.
    pub async fn schedule_change(&self, subject: &str, req: Value) -> Result<(), CliError> {
        let record: actors::protocol::ScheduleRecord = self.request(subject, &req).await?;
        if self.json {
            print_json(&record);
        } else {
            println!(
                "schedule {} ({} on `{}`){}",
                record.spec.name,
                record.spec.playbook,
                record.spec.cron,
                if record.paused { ", paused" } else { "" }
            );
        }
        Ok(())
    }

    /// `cadre budget`.
    pub async fn budget(&self) -> Result<(), CliError> {
        let b: BudgetReply = self
            .request(subject::BUDGET_STATUS, &serde_json::json!({}))
            .await?;
        if self.json {
            print_json(&b);
            return Ok(());
        }
        let cap = |usd: f64| {
            if usd > 0.0 {
                format!("${usd:.4}")
            } else {
                "none".into()
            }
        };
        println!(
            "node {}  {} (UTC)  spent ${:.4} of {}  task cap {}",
            b.node_id,
            b.day,
            b.spent_today_usd,
            cap(b.day_cap_usd),
            cap(b.task_cap_usd)
        );
        for p in &b.playbooks {
            println!(
                "  {:<24} today ${:.4} of {:<10} verified tasks {:>5}  cost ${:.4}  per task ${:.4}",
                p.playbook,
                p.spent_today_usd,
                cap(p.day_cap_usd),
                p.verified_tasks,
                p.verified_cost_usd,
                p.cost_per_verified_task_usd
            );
        }
        Ok(())
    }

    /// `cadre approvals show`.
    pub async fn approval_show(&self, approval_id: &str) -> Result<(), CliError> {
        let req = serde_json::json!({ "approval_id": approval_id });
        let a: ApprovalView = self.request(subject::APPROVALS_GET, &req).await?;
        if self.json {
            print_json(&a);
            return Ok(());
        }
        println!("approval {}  {}", a.approval_id, a.state.as_str());
        println!(
            "  task      {} ({}) on {}",
            a.task_id, a.playbook, a.node_id
        );
        println!(
            "  step      {} attempt {}: {}",
            a.step_id, a.attempt, a.tool
        );
        println!("  params    {}", a.params);
        println!("  why       {}", a.reason);
        println!("  cost      ${:.6}", a.cost_usd);
        println!(
            "  bound to  args sha256:{}  policies {}",
            a.args_hash, a.policy_version
        );
        println!(
            "  requested {} UTC, expires {} UTC",
            clock(a.requested_at_ms),
            clock(a.expires_at_ms)
        );
        if let Some(by) = &a.decided_by {
            let note = a
                .note
                .as_deref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default();
            println!("  decided   by {by}{note}");
        }
        Ok(())
    }

    /// `cadre approvals approve|deny`. Exit 1 if the approval turned out void (the action
    /// changed since it was requested: a new request replaces it).
    pub async fn decide(
        &self,
        approval_id: &str,
        decision: ApprovalDecision,
        by: Option<String>,
        note: Option<String>,
    ) -> Result<(), CliError> {
        let by = by
            .filter(|b| !b.trim().is_empty())
            .ok_or_else(|| CliError::Usage("say who decides: --by NAME (or set USER)".into()))?;
        let req = serde_json::json!({
            "approval_id": approval_id, "decision": decision, "by": by, "note": note,
        });
        let reply: DecideReply = self.request(subject::APPROVALS_DECIDE, &req).await?;
        if self.json {
            print_json(&reply);
        } else {
            println!(
                "approval {} {}; task {} is {}",
                reply.approval_id,
                reply.state.as_str(),
                reply.task_id,
                reply.task_status
            );
        }
        if reply.state == ApprovalState::Void {
            let next = reply
                .next_approval_id
                .map(|n| format!("; the step asks again as {n}"))
                .unwrap_or_default();
            return Err(CliError::Unsuccessful(format!(
                "approval {approval_id} is void: the action changed since it was requested{next}"
            )));
        }
        Ok(())
    }

    /// `cadre task trace`: the task's timeline from its audit records.
    pub async fn trace(&self, task_id: &str) -> Result<TraceReply, CliError> {
        let reply: TraceReply = self
            .request(
                subject::TASKS_TRACE,
                &serde_json::json!({"task_id": task_id}),
            )
            .await?;
        if self.json {
            print_json(&reply);
        } else {
            print_trace(&reply);
        }
        Ok(reply)
    }

    /// `cadre audit verify --node`: the node walks its own chain.
    pub async fn audit_verify(&self, node_id: &str) -> Result<(), CliError> {
        let reply: AuditVerifyReply = self
            .request(&subject::audit_verify(node_id), &serde_json::json!({}))
            .await?;
        report_verify(&reply, self.json)
    }

    /// `cadre audit tail`: the last `last` records of a node, then (with `follow`)
    /// every new one as it is committed. Subscribes before reading, so nothing falls
    /// between the two.
    pub async fn audit_tail(&self, node_id: &str, last: u64, follow: bool) -> Result<(), CliError> {
        let mut live = if follow {
            Some(
                self.nats
                    .subscribe(subject::audit(node_id))
                    .await
                    .map_err(|e| CliError::Unreachable(e.to_string()))?,
            )
        } else {
            None
        };
        let page: AuditReadReply = self
            .request(
                &subject::audit_read(node_id),
                &serde_json::json!({"last": last, "limit": AUDIT_READ_MAX}),
            )
            .await?;
        let mut shown = 0;
        for entry in &page.entries {
            self.print_entry(entry);
            shown = entry.seq;
        }
        let Some(sub) = live.as_mut() else {
            return Ok(());
        };
        shown = shown.max(page.head_seq);
        while let Some(msg) = sub.next().await {
            // Each message is an array of consecutive entries.
            match serde_json::from_slice::<Vec<AuditEntry>>(&msg.payload) {
                Ok(entries) => {
                    for entry in &entries {
                        if entry.seq > shown {
                            self.print_entry(entry);
                            shown = entry.seq;
                        }
                    }
                }
                Err(_) => eprintln!(
                    "unreadable audit message: {}",
                    String::from_utf8_lossy(&msg.payload)
                ),
            }
        }
        Ok(())
    }

    fn print_entry(&self, entry: &AuditEntry) {
        if self.json {
            print_json(entry);
        } else {
            let r = &entry.record;
            let task = r.task_id.as_deref().unwrap_or("-");
            let step = step_label(r);
            println!(
                "#{:<6} {} {:<10} {:<22} {:<16} {task}{} {}{}",
                entry.seq,
                clock(r.at_ms),
                r.node_id,
                actor_label(r),
                r.action,
                if step.is_empty() {
                    String::new()
                } else {
                    format!(" {step}")
                },
                r.outcome,
                r.detail
                    .as_deref()
                    .map(|d| format!(" — {d}"))
                    .unwrap_or_default()
            );
        }
    }
}

/// Prints a chain report; a broken chain is exit 1.
pub fn report_verify(reply: &AuditVerifyReply, json: bool) -> Result<(), CliError> {
    if json {
        print_json(reply);
    } else if let Some(broken) = &reply.broken {
        println!(
            "audit chain of node {}: BROKEN at record {} — {}",
            reply.node_id, broken.seq, broken.reason
        );
        println!(
            "  records 1..{} hold (last good hash {})",
            reply.head_seq,
            short_hash(&reply.head_hash)
        );
    } else {
        println!(
            "audit chain of node {}: intact, {} records, head #{} {}",
            reply.node_id,
            reply.records,
            reply.head_seq,
            short_hash(&reply.head_hash)
        );
    }
    match &reply.broken {
        None => Ok(()),
        Some(b) => Err(CliError::Unsuccessful(format!(
            "the audit chain is broken at record {}",
            b.seq
        ))),
    }
}

fn short_hash(h: &str) -> &str {
    &h[..h.len().min(16)]
}

fn step_label(r: &AuditRecord) -> String {
    match (&r.step_id, r.attempt) {
        (Some(s), Some(a)) => format!("{s}#{a}"),
        (Some(s), None) => s.clone(),
        _ => String::new(),
    }
}

fn actor_label(r: &AuditRecord) -> String {
    match &r.operator {
        Some(who) => format!("operator:{who}"),
        None => r.actor.clone(),
    }
}

/// The task's timeline, one line per transition: when (from submit), how long since
/// the line before, who on which node, what, on which step, the outcome, and the rest.
pub fn print_trace(t: &TraceReply) {
    let end = t.entries.last().map_or(t.created_at_ms, |e| e.record.at_ms);
    println!(
        "task {}  playbook {}  {}  {} ms from submit to last record",
        t.task_id,
        t.playbook,
        t.status,
        end.saturating_sub(t.created_at_ms)
    );
    println!(
        "{:>9} {:>8}  {:<22} {:<20} {:<14} {:<16} details",
        "at +ms", "Δ ms", "actor", "action", "step", "outcome"
    );
    let mut prev = t.created_at_ms;
    for e in &t.entries {
        let r = &e.record;
        let mut details = Vec::new();
        if let Some(tool) = &r.tool
            && (r.action == "step_started" || r.action == "step_executed")
        {
            details.push(tool.clone());
        }
        if let Some(ms) = r.duration_ms {
            details.push(format!("took {ms} ms"));
        }
        if let Some(cost) = r.cost_usd {
            details.push(format!("cost ${cost:.4}"));
        }
        if let Some(h) = &r.args_hash {
            details.push(format!("args {}", short_hash(h)));
        }
        if let Some(d) = &r.detail {
            details.push(d.clone());
        }
        println!(
            "{:>9} {:>8}  {:<22} {:<20} {:<14} {:<16} {}",
            r.at_ms.saturating_sub(t.created_at_ms),
            r.at_ms.saturating_sub(prev),
            actor_label(r),
            r.action,
            step_label(r),
            r.outcome,
            details.join(" · ")
        );
        prev = r.at_ms;
    }
}

// ---------------------------------------------------------------------------------------
// Knowledge: `cadre context …`, `cadre memory …`
// ---------------------------------------------------------------------------------------

use actors::protocol::knowledge::{
    self as kp, ContextEntry, ContextHistoryReply, ContextListReply, MemoryHistoryReply,
    MemorySearchReply, WriteReply, WriteStatus, WritesReply,
};

fn print_entry(e: &ContextEntry) {
    let by = match (&e.author.task_id, &e.author.step_id) {
        (Some(t), Some(s)) => format!("{} ({t}/{s})", e.author.actor),
        (Some(t), None) => format!("{} ({t})", e.author.actor),
        _ => e.author.actor.clone(),
    };
    let value = if e.deleted {
        "(deleted)".to_string()
    } else {
        e.value.to_string()
    };
    println!(
        "{}  v{}  {}  by {by}  {}{}",
        e.key,
        e.version,
        clock(e.at_ms),
        value,
        if e.reason.is_empty() {
            String::new()
        } else {
            format!("  — {}", e.reason)
        }
    );
}

impl Client {
    pub async fn context_get(
        &self,
        key: &str,
        version: Option<u64>,
        at_ms: Option<u64>,
    ) -> Result<(), CliError> {
        let req = serde_json::json!({"key": key, "version": version, "at_ms": at_ms});
        let entry: ContextEntry = self.request(kp::CONTEXT_GET, &req).await?;
        if self.json {
            print_json(&entry);
        } else {
            print_entry(&entry);
        }
        Ok(())
    }

    /// A write (put, checkpoint, rollback); `pending` is success with a note.
    pub async fn context_write(&self, subject: &str, req: Value) -> Result<(), CliError> {
        let reply: WriteReply = self.request(subject, &req).await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        match reply.status {
            WriteStatus::Pending => println!(
                "write {} is pending: the knowledge stream is not reachable; it is kept and applied when it is (cadre context writes {})",
                reply.write_id, reply.write_id
            ),
            _ => match (&reply.key, reply.version) {
                (Some(key), Some(v)) => println!("{key} is at version {v}"),
                _ if !reply.changed.is_empty() => {
                    for kv in &reply.changed {
                        println!("{} is at version {}", kv.key, kv.version);
                    }
                }
                _ => println!("done (stream sequence {})", reply.seq.unwrap_or(0)),
            },
        }
        Ok(())
    }

    pub async fn context_history(&self, key: &str, limit: Option<usize>) -> Result<(), CliError> {
        let req = serde_json::json!({"key": key, "limit": limit});
        let reply: ContextHistoryReply = self.request(kp::CONTEXT_HISTORY, &req).await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        for e in &reply.versions {
            print_entry(e);
        }
        Ok(())
    }

    pub async fn context_list(
        &self,
        prefix: Option<String>,
        limit: Option<usize>,
    ) -> Result<(), CliError> {
        let req = serde_json::json!({"prefix": prefix, "limit": limit});
        let reply: ContextListReply = self.request(kp::CONTEXT_LIST, &req).await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        for e in &reply.entries {
            print_entry(e);
        }
        if let Some(next) = &reply.next {
            println!("(more after {next})");
        }
        Ok(())
    }

    pub async fn context_writes(&self, write_id: Option<String>) -> Result<(), CliError> {
        let req = serde_json::json!({"write_id": write_id});
        let reply: WritesReply = self.request(kp::CONTEXT_WRITES, &req).await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        for w in &reply.writes {
            let status = serde_json::to_value(w.status).unwrap_or_default();
            println!(
                "{}  {}  {} {}{}{}",
                w.write_id,
                status.as_str().unwrap_or(""),
                w.op,
                w.name,
                w.version.map(|v| format!("  v{v}")).unwrap_or_default(),
                w.error
                    .as_ref()
                    .map(|e| format!("  — {e}"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    }

    pub async fn memory_search(
        &self,
        query: &str,
        top_k: Option<usize>,
        chars_max: Option<usize>,
    ) -> Result<(), CliError> {
        let req = serde_json::json!({"query": query, "top_k": top_k, "chars_max": chars_max});
        let reply: MemorySearchReply = self.request(kp::MEMORY_SEARCH, &req).await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        for f in &reply.facts {
            println!(
                "{:>6.2}  {}  {}  (confidence {:.2}, confirmed {}x)",
                f.score.unwrap_or(0.0),
                f.topic,
                f.text,
                f.confidence,
                f.confirmations
            );
        }
        if reply.truncated {
            println!("(more matched than the top-k and character budget allow)");
        }
        Ok(())
    }

    pub async fn memory_history(&self, topic: &str) -> Result<(), CliError> {
        let reply: MemoryHistoryReply = self
            .request(kp::MEMORY_HISTORY, &serde_json::json!({"topic": topic}))
            .await?;
        if self.json {
            print_json(&reply);
            return Ok(());
        }
        for f in &reply.facts {
            let state = match &f.superseded_by {
                Some(by) => format!("superseded by {by}"),
                None => "current".into(),
            };
            println!(
                "{}  {}  {}  ({state}; sources {})",
                f.id,
                clock(f.created_at_ms),
                f.text,
                f.sources.join(", ")
            );
        }
        Ok(())
    }
}
