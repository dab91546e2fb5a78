//! Verifier (`cadre.verify`): checks a step's outcome, or a whole task, against its
//! success criteria. Checks that read a file's content run on the blocking pool, and an
//! LLM judge off the actor; the rest are answered in the actor's handler.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::criteria;
use crate::model::JsonText;
use crate::protocol::{ExecReply, TaskChecks, Verdict, VerifyReply, VerifyRequest, subject};

#[derive(Clone, Copy)]
pub struct Verifier;

pub struct VerifierArgs {
    pub ctx: Arc<NodeContext>,
}

pub struct VerifierState {
    ctx: Arc<NodeContext>,
    pumps: Vec<JoinHandle<()>>,
}

pub enum VerifierMsg {
    Request(Inbound),
}

impl Actor for Verifier {
    type Msg = VerifierMsg;
    type State = VerifierState;
    type Arguments = VerifierArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<VerifierMsg>,
        args: VerifierArgs,
    ) -> Result<VerifierState, ActorProcessingErr> {
        // Any node's verdicts, and those that must read this node's disk.
        let pumps = bus::spawn_role_pumps(
            &args.ctx.nats,
            [
                subject::VERIFY.to_string(),
                subject::verify_on_node(&args.ctx.settings.node_id),
            ],
            &myself,
            args.ctx.settings.mailbox_depth_max,
            VerifierMsg::Request,
        )
        .await?;
        Ok(VerifierState {
            ctx: args.ctx,
            pumps,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<VerifierMsg>,
        msg: VerifierMsg,
        state: &mut VerifierState,
    ) -> Result<(), ActorProcessingErr> {
        let VerifierMsg::Request(inbound) = msg;
        state.ctx.settings.faults.maybe_panic(super::VERIFIER);
        let ctx = state.ctx.clone();
        let req = match storage::codec::from_wire::<VerifyRequest>(&inbound.msg.payload) {
            Ok(req) => req,
            Err(e) => {
                let verdict = failed(format!("undecodable verify request: {e}"));
                answer(&ctx, inbound, verdict, None).await;
                return Ok(());
            }
        };
        let (req, executed) = Executed::split(req);
        let judge = match &req {
            VerifyRequest::Step { criteria, .. } => criteria.llm_judge.clone(),
            _ => None,
        };
        // Only reading a file's content can wait on the disk, and only a judge on the
        // network: those run off the actor. The rest, a `stat` for `file_exists`
        // included (metadata the step just wrote, in the kernel's caches), is answered
        // here, sparing a task and its thread hand-off per check.
        if judge.is_none() && !reads_files(&req) {
            answer(&ctx, inbound, verify(&req), executed).await;
            return Ok(());
        }
        tokio::spawn(async move {
            let output = match &req {
                VerifyRequest::Step { output, .. } => Some(output.to_value_lossy()),
                _ => None,
            };
            let reply = if reads_files(&req) {
                tokio::task::spawn_blocking(move || verify(&req))
                    .await
                    .unwrap_or_else(|e| failed(format!("verifier crashed: {e}")))
            } else {
                verify(&req)
            };
            let verdict = match (judge, output) {
                (Some(judge), Some(output)) => with_judge(&ctx, reply, &judge, &output).await,
                _ => reply,
            };
            answer(&ctx, inbound, verdict, executed).await;
        });
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<VerifierMsg>,
        state: &mut VerifierState,
    ) -> Result<(), ActorProcessingErr> {
        for pump in &state.pumps {
            pump.abort();
        }
        Ok(())
    }
}

/// What a forwarded step's verdict is sent back with: the executor's outcome.
struct Executed {
    output: JsonText,
    duration_us: u64,
    replayed: bool,
    executor: String,
}

impl Executed {
    /// An outcome forwarded by its executor becomes the `Step` check it asks for (the
    /// task's checks gain this step's output) and the outcome to answer with.
    fn split(req: VerifyRequest) -> (VerifyRequest, Option<Executed>) {
        let VerifyRequest::Executed {
            task_id,
            step_id,
            tool,
            params,
            checks,
            output,
            duration_us,
            replayed,
            executor,
        } = req
        else {
            return (req, None);
        };
        let mut task = checks.task;
        if let Some(task) = &mut task {
            match task.outputs.iter_mut().find(|(id, _)| *id == step_id) {
                Some((_, out)) => *out = output.clone(),
                None => task.outputs.push((step_id.clone(), output.clone())),
            }
        }
        let executed = Executed {
            output: output.clone(),
            duration_us,
            replayed,
            executor,
        };
        let step = VerifyRequest::Step {
            task_id,
            step_id,
            tool,
            params,
            criteria: checks.criteria,
            output,
            task,
        };
        (step, Some(executed))
    }
}

pub fn verify(req: &VerifyRequest) -> VerifyReply {
    match req {
        VerifyRequest::Step {
            params,
            criteria,
            output,
            task,
            ..
        } => {
            let verdict =
                criteria::check(criteria, &params.to_value_lossy(), &output.to_value_lossy());
            let task = task.as_ref().filter(|_| verdict.passed).map(verify_task);
            VerifyReply {
                verdict,
                task,
                cost_micros: 0,
                unavailable: None,
            }
        }
        VerifyRequest::Task { task, .. } => VerifyReply {
            verdict: verify_task(task),
            task: None,
            cost_micros: 0,
            unavailable: None,
        },
        // `Executed::split` turns it into `Step` before it gets here.
        VerifyRequest::Executed { .. } => failed("a forwarded outcome was not unpacked".into()),
    }
}

/// Every step succeeded (the caller asks only then); checks the task-level criteria.
fn verify_task(task: &TaskChecks) -> Verdict {
    let mut reasons = vec![format!("ok: all {} steps succeeded", task.outputs.len())];
    let mut passed = true;
    for check in &task.checks {
        let Some((_, output)) = task.outputs.iter().find(|(id, _)| *id == check.step) else {
            passed = false;
            reasons.push(format!(
                "FAILED: check names step `{}`, which has no output",
                check.step
            ));
            continue;
        };
        let verdict = criteria::check(&check.criteria, &Value::Null, &output.to_value_lossy());
        passed &= verdict.passed;
        reasons.extend(
            verdict
                .reasons
                .into_iter()
                .map(|r| format!("{}: {r}", check.step)),
        );
    }
    Verdict { passed, reasons }
}

/// The rules' verdict, completed by the LLM judge when the rules passed (a failed rule
/// is not worth the tokens). The task's verdict holds only if the step's does.
async fn with_judge(
    ctx: &NodeContext,
    mut reply: VerifyReply,
    judge: &crate::model::Judge,
    output: &Value,
) -> VerifyReply {
    if !reply.verdict.passed {
        return reply;
    }
    reply.verdict.reasons.retain(|r| r != criteria::NO_CRITERIA);
    let Some(provider) = ctx.llm() else {
        reply.verdict.passed = false;
        reply.task = None;
        reply.verdict.reasons.push(format!(
            "FAILED: llm_judge: {}",
            crate::llm::LlmError::NotConfigured
        ));
        return reply;
    };
    match crate::llm::judge::judge(provider, judge, &criteria::output_text(output)).await {
        Ok(finding) => {
            reply.cost_micros += finding.usage.cost_micros;
            reply.verdict.reasons.push(finding.line);
            if !finding.passed {
                reply.verdict.passed = false;
                reply.task = None;
            }
            reply
        }
        Err(crate::llm::LlmError::Unavailable(e)) => VerifyReply {
            unavailable: Some(format!("llm_judge: {e}")),
            ..reply
        },
        Err(e) => {
            reply.verdict.passed = false;
            reply.task = None;
            reply
                .verdict
                .reasons
                .push(format!("FAILED: llm_judge: {e}"));
            reply
        }
    }
}

fn reads_files(req: &VerifyRequest) -> bool {
    let reads = |c: &crate::model::Criteria| c.file_contains.is_some();
    let reads_task = |t: &TaskChecks| t.checks.iter().any(|c| reads(&c.criteria));
    match req {
        VerifyRequest::Step { criteria, task, .. } => {
            reads(criteria) || task.as_ref().is_some_and(reads_task)
        }
        VerifyRequest::Task { task, .. } => reads_task(task),
        VerifyRequest::Executed { checks, .. } => {
            reads(&checks.criteria) || checks.task.as_ref().is_some_and(reads_task)
        }
    }
}

/// Replies to the request (to a forwarded outcome, with the outcome and its verdict),
/// then lets its pump take the next one (its permit).
async fn answer(
    ctx: &NodeContext,
    inbound: Inbound,
    verdict: VerifyReply,
    executed: Option<Executed>,
) {
    let Inbound { msg, permit } = inbound;
    let from = ctx.from(super::VERIFIER);
    match executed {
        None => bus::reply_wire(&ctx.nats, msg.reply, &verdict, &from).await,
        Some(e) => {
            let reply = ExecReply::Verified {
                output: e.output,
                duration_us: e.duration_us,
                replayed: e.replayed,
                executor: e.executor,
                verdict,
            };
            bus::reply_wire(&ctx.nats, msg.reply, &reply, &from).await;
        }
    }
    drop(permit);
}

fn failed(reason: String) -> VerifyReply {
    VerifyReply {
        verdict: Verdict {
            passed: false,
            reasons: vec![reason],
        },
        task: None,
        cost_micros: 0,
        unavailable: None,
    }
}
