//! State machine transitions, one input at a time.

use super::*;
use crate::model::{Criteria, JsonText, StepSpec};
use crate::protocol::{ErrorCode, TaskCheck, VerifyReply};

fn spec(id: &str, deps: &[&str]) -> StepSpec {
    StepSpec {
        id: id.into(),
        tool: "http.request".into(),
        params: JsonText("{}".into()),
        params_template: None,
        verify: Criteria {
            status_in: Some(vec![200]),
            ..Default::default()
        },
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        max_attempts: 3,
        timeout_ms: 1000,
        compensate: None,
        compensates: None,
        placement: None,
    }
}

fn task() -> Task {
    Task::new(
        "t1".into(),
        "pb".into(),
        JsonText("{}".into()),
        None,
        "n1".into(),
        1_000,
    )
}

fn limits() -> Limits {
    Limits {
        retry_delay_ms_base: 100,
        retry_delay_ms_max: 1_000,
        redeliveries_max: 2,
        hop_retries_max: 2,
        approval_ttl_ms: 60_000,
        approval_default: ApprovalDecision::Deny,
        checkpoints_replicated: false,
    }
}

fn go(t: &mut Task, input: Input) -> Transition {
    apply(t, input, 2_000, 0.0, &limits(), &AllowAll).expect("accepted input")
}

/// The executor's `reply` to attempt `attempt` of `step`.
fn executed(t: &mut Task, step: &str, attempt: u32, reply: ExecReply) -> Transition {
    go(
        t,
        Input::Executed {
            step: step.into(),
            attempt,
            reply,
        },
    )
}

fn planned(t: &mut Task, steps: Vec<StepSpec>) -> Transition {
    go(t, Input::Start);
    go(
        t,
        Input::Planned(PlanReply::Planned {
            steps,
            checks: vec![],
            playbook_version: "1@x".into(),
            persona: "operator".into(),
            planning: None,
        }),
    )
}

fn done(output: &str) -> ExecReply {
    ExecReply::Done {
        output: JsonText(output.into()),
        duration_us: 5,
        replayed: false,
    }
}

fn pass() -> Verdict {
    Verdict {
        passed: true,
        reasons: vec!["ok".into()],
    }
}

fn exec(step: &str, attempt: u32) -> Action {
    Action::Exec {
        step: step.into(),
        attempt,
    }
}

fn kinds(t: &Transition) -> Vec<&str> {
    t.events.iter().map(|e| e.kind.as_str()).collect()
}

#[test]
fn happy_path_commits_every_transition_and_numbers_events() {
    let mut t = task();
    let tr = go(&mut t, Input::Start);
    assert_eq!(t.status, TaskStatus::Planning);
    assert!(!tr.commit, "planning is committed with the plan, not alone");
    assert_eq!(
        kinds(&tr),
        ["planning"],
        "its event is held for that commit"
    );
    assert_eq!(tr.actions, vec![Action::RequestPlan]);

    let tr = planned(&mut t, vec![spec("a", &[]), spec("b", &["a"])]);
    assert_eq!(t.status, TaskStatus::Running);
    assert_eq!(tr.actions, vec![exec("a", 1)], "b waits for a");
    assert_eq!(kinds(&tr), ["running", "step_started"]);

    let tr = executed(&mut t, "a", 1, done(r#"{"status":200}"#));
    assert!(
        !tr.commit,
        "output is committed with its verdict, not alone"
    );
    assert_eq!(
        tr.actions,
        vec![Action::Verify {
            step: "a".into(),
            attempt: 1
        }]
    );

    let tr = go(
        &mut t,
        Input::Verified {
            step: "a".into(),
            attempt: 1,
            verdict: pass(),
            task_verdict: None,
            cost_micros: 0,
        },
    );
    assert_eq!(kinds(&tr), ["step_succeeded", "step_started"]);
    assert_eq!(tr.actions, vec![exec("b", 1)]);

    executed(&mut t, "b", 1, done("{}"));
    let tr = go(
        &mut t,
        Input::Verified {
            step: "b".into(),
            attempt: 1,
            verdict: pass(),
            task_verdict: None,
            cost_micros: 0,
        },
    );
    assert_eq!(t.status, TaskStatus::Verifying);
    assert_eq!(tr.actions, vec![Action::VerifyTask]);
    let tr = go(&mut t, Input::TaskVerified(pass()));
    assert_eq!(t.status, TaskStatus::Archiving);
    assert_eq!(tr.actions, vec![Action::Archive]);
    let tr = go(&mut t, Input::Archived(ArchiveReply::Archived));
    assert_eq!(t.status, TaskStatus::Succeeded);
    assert!(tr.actions.is_empty());
    let seqs: Vec<u64> = (1..=t.event_seq).collect();
    assert_eq!(seqs.len() as u64, t.event_seq, "gap-free per-task sequence");
}

#[test]
fn independent_steps_run_in_parallel() {
    let mut t = task();
    let tr = planned(
        &mut t,
        vec![spec("a", &[]), spec("b", &[]), spec("c", &["a", "b"])],
    );
    assert_eq!(tr.actions, vec![exec("a", 1), exec("b", 1)]);
    executed(&mut t, "a", 1, done("{}"));
    let tr = go(
        &mut t,
        Input::Verified {
            step: "a".into(),
            attempt: 1,
            verdict: pass(),
            task_verdict: None,
            cost_micros: 0,
        },
    );
    assert!(tr.actions.is_empty(), "c still waits for b");
}

#[test]
fn retryable_failure_backs_off_then_fails_after_max_attempts() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    let fail = || ExecReply::Failed {
        kind: FailureKind::Retryable,
        message: "HTTP 503".into(),
        output: None,
    };
    let tr = executed(&mut t, "a", 1, fail());
    assert_eq!(
        tr.actions,
        vec![Action::RetryAt {
            step: "a".into(),
            attempt: 2,
            at_ms: 2_050
        }],
        "100 ms × jitter ½"
    );
    assert_eq!(t.steps[0].status, StepStatus::RetryWait);
    let tr = go(
        &mut t,
        Input::RetryDue {
            step: "a".into(),
            attempt: 2,
        },
    );
    assert_eq!(tr.actions, vec![exec("a", 2)]);
    let tr = executed(&mut t, "a", 2, fail());
    assert_eq!(
        tr.actions,
        vec![Action::RetryAt {
            step: "a".into(),
            attempt: 3,
            at_ms: 2_100
        }],
        "exponential"
    );
    go(
        &mut t,
        Input::RetryDue {
            step: "a".into(),
            attempt: 3,
        },
    );
    let tr = executed(&mut t, "a", 3, fail());
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(kinds(&tr), ["step_failed", "failed"]);
    assert_eq!(
        t.failure.as_deref(),
        Some("step `a` failed after 3 attempts: HTTP 503")
    );
}

#[test]
fn failed_verdict_retries_and_permanent_failure_does_not() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[]), spec("b", &["a"])]);
    executed(&mut t, "a", 1, done("{}"));
    let verdict = Verdict {
        passed: false,
        reasons: vec!["FAILED: status 500 in [200]".into()],
    };
    let tr = go(
        &mut t,
        Input::Verified {
            step: "a".into(),
            attempt: 1,
            verdict,
            task_verdict: None,
            cost_micros: 0,
        },
    );
    assert!(matches!(
        tr.actions[..],
        [Action::RetryAt { attempt: 2, .. }]
    ));
    go(
        &mut t,
        Input::RetryDue {
            step: "a".into(),
            attempt: 2,
        },
    );
    let permanent = ExecReply::Failed {
        kind: FailureKind::Permanent,
        message: "HTTP 404".into(),
        output: None,
    };
    executed(&mut t, "a", 2, permanent);
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.steps[1].status, StepStatus::Skipped);
}

#[test]
fn stale_replies_are_ignored() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    let tr = executed(&mut t, "a", 7, done("{}"));
    assert!(!tr.commit && tr.actions.is_empty());
    let tr = go(
        &mut t,
        Input::Verified {
            step: "a".into(),
            attempt: 1,
            verdict: pass(),
            task_verdict: None,
            cost_micros: 0,
        },
    );
    assert!(
        !tr.commit && tr.actions.is_empty(),
        "no verdict before the step executed"
    );
}

#[test]
fn unanswered_exec_redelivers_the_same_attempt_then_fails() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    for n in 1..=2 {
        let tr = go(
            &mut t,
            Input::ExecUnanswered {
                step: "a".into(),
                attempt: 1,
                error: "timeout".into(),
            },
        );
        assert!(
            matches!(tr.actions[..], [Action::RetryAt { attempt: 1, .. }]),
            "redelivery {n} keeps the attempt"
        );
        let tr = go(
            &mut t,
            Input::RetryDue {
                step: "a".into(),
                attempt: 1,
            },
        );
        assert_eq!(tr.actions, vec![exec("a", 1)]);
    }
    go(
        &mut t,
        Input::ExecUnanswered {
            step: "a".into(),
            attempt: 1,
            error: "timeout".into(),
        },
    );
    assert_eq!(t.status, TaskStatus::Failed);
    assert!(
        t.failure
            .as_deref()
            .is_some_and(|f| f.contains("no executor answered"))
    );
}

#[test]
fn outcome_unknown_parks_until_an_operator_decides() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[]), spec("b", &["a"])]);
    let unknown = ExecReply::Failed {
        kind: FailureKind::OutcomeUnknown,
        message: "unknown".into(),
        output: None,
    };
    let tr = executed(&mut t, "a", 1, unknown);
    assert_eq!(t.status, TaskStatus::AwaitingOperator);
    assert_eq!(
        kinds(&tr),
        [
            "step_outcome_unknown",
            "approval_requested",
            "awaiting_operator"
        ]
    );
    assert_eq!(t.attention.as_ref().map(|a| a.0.as_str()), Some("a"));
    // The question is also an approval, with no expiry.
    let a = t.steps[0].approval.clone().expect("an approval");
    assert_eq!(
        (a.id.as_str(), a.kind),
        ("t1-a1", ApprovalKind::OutcomeUnknown)
    );
    assert!(tr.actions.is_empty(), "no expiry timer");

    // Decided through the approval: the same as a resolve, and recorded on it.
    let mut via_approval = t.clone();
    let tr = go(
        &mut via_approval,
        Input::Decide {
            approval_id: "t1-a1".into(),
            decision: ApprovalDecision::Retry,
            by: "ops".into(),
            note: None,
        },
    );
    assert_eq!(tr.actions, vec![exec("a", 2)]);
    assert_eq!(kinds(&tr)[..2], ["approval_granted", "step_resolved"]);
    assert_eq!(
        via_approval.steps[0].approval.as_ref().map(|a| a.state),
        Some(ApprovalState::Approved)
    );
    let wrong = apply(
        &mut t.clone(),
        Input::Decide {
            approval_id: "t1-a1".into(),
            decision: ApprovalDecision::Approve,
            by: "ops".into(),
            note: None,
        },
        0,
        0.0,
        &limits(),
        &AllowAll,
    );
    assert!(wrong.is_err_and(|r| r.0.contains("decide retry, mark_done or abort")));

    let mut retried = t.clone();
    let tr = go(
        &mut retried,
        Input::Resolve {
            step: "a".into(),
            decision: DecisionKind::Retry,
            by: "ops".into(),
            note: None,
        },
    );
    assert_eq!(retried.status, TaskStatus::Running);
    assert_eq!(tr.actions, vec![exec("a", 2)], "a retry is a new attempt");

    let mut marked = t.clone();
    let tr = go(
        &mut marked,
        Input::Resolve {
            step: "a".into(),
            decision: DecisionKind::MarkDone,
            by: "ops".into(),
            note: None,
        },
    );
    assert_eq!(marked.steps[0].status, StepStatus::Succeeded);
    assert_eq!(tr.actions, vec![exec("b", 1)]);

    let mut aborted = t.clone();
    go(
        &mut aborted,
        Input::Resolve {
            step: "a".into(),
            decision: DecisionKind::Abort,
            by: "ops".into(),
            note: None,
        },
    );
    assert_eq!(aborted.status, TaskStatus::Failed);

    let err = apply(
        &mut t.clone(),
        Input::Resolve {
            step: "b".into(),
            decision: DecisionKind::Retry,
            by: String::new(),
            note: None,
        },
        0,
        0.0,
        &limits(),
        &AllowAll,
    );
    assert!(err.is_err(), "b is not waiting for a decision");
}

#[test]
fn restart_resends_in_flight_work_and_rearms_timers() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[]), spec("b", &[])]);
    executed(&mut t, "a", 1, done("{}")); // verifying, not committed
    let fail = ExecReply::Failed {
        kind: FailureKind::Retryable,
        message: "503".into(),
        output: None,
    };
    executed(&mut t, "b", 1, fail);
    let tr = go(&mut t, Input::Start);
    assert_eq!(
        tr.actions,
        vec![
            exec("a", 1),
            Action::RetryAt {
                step: "b".into(),
                attempt: 2,
                at_ms: 2_050
            }
        ]
    );
    assert!(!tr.commit);
}

#[test]
fn cancel_skips_the_rest_and_is_refused_once_terminal() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[]), spec("b", &["a"])]);
    let tr = go(
        &mut t,
        Input::Cancel {
            reason: "not needed".into(),
        },
    );
    assert_eq!(t.status, TaskStatus::Cancelled);
    assert_eq!(kinds(&tr), ["cancelled"]);
    assert!(t.steps.iter().all(|s| s.status == StepStatus::Skipped));
    assert_eq!(
        apply(
            &mut t,
            Input::Cancel {
                reason: "again".into()
            },
            0,
            0.0,
            &limits(),
            &AllowAll
        )
        .unwrap_err(),
        Rejected("task is already cancelled".into())
    );
    let tr = executed(&mut t, "a", 1, done("{}"));
    assert!(
        tr.actions.is_empty(),
        "late replies after cancel do nothing"
    );
}

#[test]
fn planner_rejection_and_hop_failures_fail_the_task_after_bounded_retries() {
    let mut t = task();
    go(&mut t, Input::Start);
    let mut r = t.clone();
    go(
        &mut r,
        Input::Planned(PlanReply::Rejected {
            code: ErrorCode::InvalidInput,
            message: "`input.x` is missing".into(),
            planning: None,
        }),
    );
    assert_eq!(r.status, TaskStatus::Failed);
    for _ in 0..2 {
        let tr = go(&mut t, Input::PlanUnavailable("no responders".into()));
        assert!(matches!(tr.actions[..], [Action::HopAt { .. }]));
        assert_eq!(go(&mut t, Input::HopDue).actions, vec![Action::RequestPlan]);
    }
    go(&mut t, Input::PlanUnavailable("no responders".into()));
    assert_eq!(t.status, TaskStatus::Failed);
}

#[test]
fn task_level_check_failure_fails_the_task() {
    let mut t = task();
    go(&mut t, Input::Start);
    let checks = vec![TaskCheck {
        step: "a".into(),
        criteria: Criteria::default(),
    }];
    go(
        &mut t,
        Input::Planned(PlanReply::Planned {
            steps: vec![spec("a", &[])],
            checks,
            playbook_version: "1".into(),
            persona: "operator".into(),
            planning: None,
        }),
    );
    executed(&mut t, "a", 1, done("{}"));
    go(
        &mut t,
        Input::Verified {
            step: "a".into(),
            attempt: 1,
            verdict: pass(),
            task_verdict: None,
            cost_micros: 0,
        },
    );
    go(
        &mut t,
        Input::TaskVerified(Verdict {
            passed: false,
            reasons: vec!["FAILED: name".into()],
        }),
    );
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(
        t.failure.as_deref(),
        Some("task verification failed: FAILED: name")
    );
}

#[test]
fn an_unanswered_verify_is_asked_again_without_rerunning_the_effect() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    executed(&mut t, "a", 1, done("{}"));
    for n in 1..=2 {
        let tr = go(
            &mut t,
            Input::VerifyUnavailable {
                step: "a".into(),
                attempt: 1,
                error: "timeout".into(),
            },
        );
        assert!(!tr.commit, "nothing durable changed");
        assert!(
            matches!(tr.actions[..], [Action::VerifyAt { attempt: 1, .. }]),
            "try {n}: verify again, same attempt"
        );
        let tr = go(
            &mut t,
            Input::VerifyDue {
                step: "a".into(),
                attempt: 1,
            },
        );
        assert_eq!(
            tr.actions,
            vec![Action::Verify {
                step: "a".into(),
                attempt: 1
            }]
        );
    }
    let tr = go(
        &mut t,
        Input::VerifyUnavailable {
            step: "a".into(),
            attempt: 1,
            error: "timeout".into(),
        },
    );
    assert!(
        tr.actions
            .iter()
            .all(|a| !matches!(a, Action::Exec { .. } | Action::RetryAt { .. })),
        "never re-run"
    );
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.steps[0].attempts, 1);
    assert!(
        t.failure
            .as_deref()
            .is_some_and(|f| f.contains("no verdict after 3 tries")),
        "{:?}",
        t.failure
    );
}

#[test]
fn a_decision_keeps_the_operator_note_and_attention_moves_to_the_next_unknown_step() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[]), spec("b", &[])]);
    let unknown = |m: &str| ExecReply::Failed {
        kind: FailureKind::OutcomeUnknown,
        message: m.into(),
        output: None,
    };
    executed(&mut t, "a", 1, unknown("a unknown"));
    executed(&mut t, "b", 1, unknown("b unknown"));
    let tr = go(
        &mut t,
        Input::Resolve {
            step: "a".into(),
            decision: DecisionKind::MarkDone,
            by: "ann".into(),
            note: Some("saw it in the log".into()),
        },
    );
    assert_eq!(
        tr.events[0].detail.as_deref(),
        Some("t1-a1: mark_done by ann"),
        "the approval that asked is answered too"
    );
    assert_eq!(
        tr.events[1].detail.as_deref(),
        Some("marked done by ann: saw it in the log")
    );
    assert_eq!(t.status, TaskStatus::AwaitingOperator, "b still waits");
    assert_eq!(t.attention, Some(("b".into(), "b unknown".into())));
    let err = apply(
        &mut t,
        Input::Resolve {
            step: "a".into(),
            decision: DecisionKind::Retry,
            by: String::new(),
            note: None,
        },
        0,
        0.0,
        &limits(),
        &AllowAll,
    )
    .unwrap_err();
    assert_eq!(
        err,
        Rejected("step `a` is succeeded, not waiting for a decision".into())
    );
}

#[test]
fn the_last_steps_verify_can_carry_the_task_verdict_into_one_commit() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    executed(&mut t, "a", 1, done("{}"));
    let tr = go(
        &mut t,
        Input::Verified {
            step: "a".into(),
            attempt: 1,
            verdict: pass(),
            task_verdict: Some(pass()),
            cost_micros: 0,
        },
    );
    assert!(!tr.commit, "held until the archive answers");
    assert_eq!(kinds(&tr), ["step_succeeded", "verifying", "archiving"]);
    assert_eq!(tr.actions, vec![Action::Archive]);
    assert_eq!(t.status, TaskStatus::Archiving);

    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    executed(&mut t, "a", 1, done("{}"));
    let no = Verdict {
        passed: false,
        reasons: vec!["FAILED: crm: $.body.name".into()],
    };
    let tr = go(
        &mut t,
        Input::Verified {
            step: "a".into(),
            attempt: 1,
            verdict: pass(),
            task_verdict: Some(no),
            cost_micros: 0,
        },
    );
    assert_eq!(kinds(&tr), ["step_succeeded", "verifying", "failed"]);
    assert_eq!(
        t.failure.as_deref(),
        Some("task verification failed: FAILED: crm: $.body.name")
    );
}

fn forwarded(output: &str, verdict: Verdict, task: Option<Verdict>) -> ExecReply {
    ExecReply::Verified {
        output: JsonText(output.into()),
        duration_us: 5,
        replayed: false,
        executor: "executor@n1".into(),
        verdict: VerifyReply {
            verdict,
            task,
            cost_micros: 0,
            unavailable: None,
        },
    }
}

#[test]
fn an_outcome_forwarded_with_its_verdict_commits_both_at_once() {
    // The last step: its verdict carries the task's, as a separate verify would.
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    let tr = executed(
        &mut t,
        "a",
        1,
        forwarded(r#"{"n":1}"#, pass(), Some(pass())),
    );
    assert!(
        !tr.commit,
        "output and verdict are held together for the archive"
    );
    assert_eq!(kinds(&tr), ["step_succeeded", "verifying", "archiving"]);
    assert_eq!(tr.actions, vec![Action::Archive], "no verify hop");
    assert_eq!(t.steps[0].output, Some(JsonText(r#"{"n":1}"#.into())));

    // A failed verdict costs the attempt, as a failed separate verify does.
    let mut t = task();
    planned(&mut t, vec![spec("a", &[]), spec("b", &["a"])]);
    let no = Verdict {
        passed: false,
        reasons: vec!["FAILED: exit_code 1 (want 0)".into()],
    };
    let tr = executed(&mut t, "a", 1, forwarded("{}", no, None));
    assert_eq!(kinds(&tr), ["step_retry"]);
    assert_eq!(t.steps[0].status, StepStatus::RetryWait);
    assert_eq!(t.steps[0].next_attempt, 2);

    // No verdict reached (a judge unreachable): asked again, the effect not re-run.
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    let mut reply = forwarded("{}", pass(), None);
    if let ExecReply::Verified { verdict, .. } = &mut reply {
        verdict.unavailable = Some("llm_judge: down".into());
    }
    let tr = go(
        &mut t,
        Input::Executed {
            step: "a".into(),
            attempt: 1,
            reply,
        },
    );
    assert!(matches!(
        tr.actions[..],
        [Action::VerifyAt { attempt: 1, .. }]
    ));
    assert_eq!(t.steps[0].status, StepStatus::Verifying);
}

/// A gate whose ruling per step and policy version the test sets as it goes.
struct Rules {
    rulings: std::cell::RefCell<std::collections::HashMap<String, Ruling>>,
    version: std::cell::RefCell<String>,
}

impl Rules {
    fn new(rulings: &[(&str, Ruling)]) -> Rules {
        Rules {
            rulings: std::cell::RefCell::new(
                rulings.iter().map(|(s, r)| (s.to_string(), *r)).collect(),
            ),
            version: std::cell::RefCell::new("v1".into()),
        }
    }
}

impl Gate for Rules {
    fn check(&self, task: &Task, step: usize, _: u64) -> Gated {
        let id = &task.steps[step].spec.id;
        let ruling = self
            .rulings
            .borrow()
            .get(id)
            .copied()
            .unwrap_or(Ruling::Allow);
        Gated {
            ruling,
            reason: format!("rule for {id}"),
            policy_version: self.version.borrow().clone(),
            args_hash: format!("hash-of-{}", task.steps[step].spec.params.0),
            cost_micros: 1_500,
            charged_micros: 1_500,
        }
    }
}

fn gated(t: &mut Task, input: Input, now_ms: u64, gate: &Rules) -> Transition {
    apply(t, input, now_ms, 0.0, &limits(), gate).expect("accepted input")
}

fn decide(t: &mut Task, id: &str, decision: ApprovalDecision, gate: &Rules) -> Transition {
    gated(
        t,
        Input::Decide {
            approval_id: id.into(),
            decision,
            by: "ann".into(),
            note: Some("looked at it".into()),
        },
        5_000,
        gate,
    )
}

fn planned_with(t: &mut Task, steps: Vec<StepSpec>, gate: &Rules) -> Transition {
    gated(t, Input::Start, 2_000, gate);
    gated(
        t,
        Input::Planned(PlanReply::Planned {
            steps,
            checks: vec![],
            playbook_version: "1@x".into(),
            persona: "operator".into(),
            planning: None,
        }),
        2_000,
        gate,
    )
}

#[test]
fn an_allowed_step_records_the_policy_version_and_its_cost() {
    let gate = Rules::new(&[]);
    let mut t = task();
    let tr = planned_with(&mut t, vec![spec("a", &[])], &gate);
    assert_eq!(tr.actions, vec![exec("a", 1)]);
    let started = &tr.events[1];
    assert_eq!(started.kind, "step_started");
    assert_eq!(started.detail.as_deref(), Some("allowed by policies v1"));
    assert_eq!(t.steps[0].cost_micros, 1_500);
}

#[test]
fn a_denied_step_fails_its_task_without_being_sent() {
    let gate = Rules::new(&[("b", Ruling::Deny)]);
    let mut t = task();
    let tr = planned_with(&mut t, vec![spec("a", &[]), spec("b", &[])], &gate);
    assert_eq!(tr.actions, vec![exec("a", 1)], "b is never dispatched");
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(kinds(&tr)[..3], ["running", "step_started", "step_denied"]);
    assert_eq!(t.steps[1].status, StepStatus::Failed);
    assert_eq!(t.failure.as_deref(), Some("step `b` denied: rule for b"));
    assert_eq!(t.steps[1].cost_micros, 0, "nothing ran, nothing charged");
}

#[test]
fn approval_holds_the_step_until_approved_then_dispatches_it() {
    let gate = Rules::new(&[("a", Ruling::RequireApproval)]);
    let mut t = task();
    let tr = planned_with(&mut t, vec![spec("a", &[])], &gate);
    assert_eq!(t.status, TaskStatus::AwaitingApproval);
    assert_eq!(t.steps[0].status, StepStatus::AwaitingApproval);
    assert_eq!(
        kinds(&tr),
        ["running", "approval_requested", "awaiting_approval"]
    );
    let a = t.steps[0].approval.clone().expect("an approval");
    assert_eq!(a.id, "t1-a1");
    assert_eq!(
        (a.args_hash.as_str(), a.policy_version.as_str()),
        ("hash-of-{}", "v1")
    );
    assert_eq!(a.expires_at_ms, 2_000 + 60_000);
    assert_eq!(
        tr.actions,
        vec![Action::ApprovalAt {
            step: "a".into(),
            approval_id: "t1-a1".into(),
            at_ms: 62_000
        }]
    );

    let tr = decide(&mut t, "t1-a1", ApprovalDecision::Approve, &gate);
    assert_eq!(kinds(&tr), ["approval_granted", "running", "step_started"]);
    assert_eq!(
        tr.events[2].detail.as_deref(),
        Some("approved by ann (t1-a1); policies v1")
    );
    assert_eq!(tr.actions, vec![exec("a", 1)]);
    assert_eq!(t.status, TaskStatus::Running);
    let a = t.steps[0].approval.as_ref().expect("kept");
    assert_eq!(a.state, ApprovalState::Approved);
    assert_eq!(a.note.as_deref(), Some("looked at it"));

    // Decided once: a second decision is refused, and the expiry timer does nothing.
    let again = apply(
        &mut t.clone(),
        Input::Decide {
            approval_id: "t1-a1".into(),
            decision: ApprovalDecision::Deny,
            by: "bob".into(),
            note: None,
        },
        6_000,
        0.0,
        &limits(),
        &gate,
    );
    assert_eq!(
        again.err(),
        Some(Rejected("approval `t1-a1` is already approved".into()))
    );
    let tr = gated(
        &mut t,
        Input::ApprovalDue {
            step: "a".into(),
            approval_id: "t1-a1".into(),
        },
        70_000,
        &gate,
    );
    assert!(!tr.commit && tr.actions.is_empty());
}

#[test]
fn an_operator_denial_fails_the_step_and_the_task() {
    let gate = Rules::new(&[("a", Ruling::RequireApproval)]);
    let mut t = task();
    planned_with(&mut t, vec![spec("a", &[])], &gate);
    let tr = decide(&mut t, "t1-a1", ApprovalDecision::Deny, &gate);
    assert_eq!(kinds(&tr), ["approval_denied", "failed"]);
    assert!(tr.actions.is_empty());
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.failure.as_deref(), Some("step `a` denied by ann"));
    assert_eq!(
        t.steps[0].approval.as_ref().map(|a| a.state),
        Some(ApprovalState::Denied)
    );
}

#[test]
fn an_undecided_approval_expires_into_the_configured_default() {
    let gate = Rules::new(&[("a", Ruling::RequireApproval)]);
    let due = Input::ApprovalDue {
        step: "a".into(),
        approval_id: "t1-a1".into(),
    };
    let mut t = task();
    planned_with(&mut t, vec![spec("a", &[])], &gate);
    // Early (a timer armed before the clock moved): it waits the rest.
    let tr = gated(&mut t, due.clone(), 30_000, &gate);
    assert!(!tr.commit);
    assert_eq!(
        tr.actions,
        vec![Action::ApprovalAt {
            step: "a".into(),
            approval_id: "t1-a1".into(),
            at_ms: 62_000
        }]
    );
    let tr = gated(&mut t, due.clone(), 62_000, &gate);
    assert_eq!(kinds(&tr), ["approval_expired", "failed"]);
    assert_eq!(t.status, TaskStatus::Failed);

    // With `approve` as the default, the step runs.
    let mut approving = limits();
    approving.approval_default = ApprovalDecision::Approve;
    let mut t = task();
    planned_with(&mut t, vec![spec("a", &[])], &gate);
    let tr = apply(&mut t, due, 62_000, 0.0, &approving, &gate).expect("accepted");
    assert_eq!(kinds(&tr), ["approval_expired", "running", "step_started"]);
    assert_eq!(tr.actions, vec![exec("a", 1)]);
}

#[test]
fn an_approval_is_void_when_the_policies_change_before_it_is_used() {
    let gate = Rules::new(&[("a", Ruling::RequireApproval)]);
    let mut t = task();
    planned_with(&mut t, vec![spec("a", &[])], &gate);
    *gate.version.borrow_mut() = "v2".into();
    let tr = decide(&mut t, "t1-a1", ApprovalDecision::Approve, &gate);
    assert_eq!(
        kinds(&tr),
        [
            "approval_granted",
            "running",
            "approval_void",
            "approval_requested",
            "awaiting_approval"
        ]
    );
    assert_eq!(
        tr.events[2].detail.as_deref(),
        Some("t1-a1 is void: policies changed from v1 to v2")
    );
    assert!(tr.actions.iter().all(|a| !matches!(a, Action::Exec { .. })));
    let a = t.steps[0].approval.as_ref().expect("a new request");
    assert_eq!((a.id.as_str(), a.state), ("t1-a2", ApprovalState::Pending));
    assert_eq!(a.policy_version, "v2");

    // Approved under the policies now in force, it runs.
    let tr = decide(&mut t, "t1-a2", ApprovalDecision::Approve, &gate);
    assert_eq!(tr.actions, vec![exec("a", 1)]);
}

#[test]
fn an_approval_covers_retries_of_the_same_action() {
    let gate = Rules::new(&[("a", Ruling::RequireApproval)]);
    let mut t = task();
    planned_with(&mut t, vec![spec("a", &[])], &gate);
    decide(&mut t, "t1-a1", ApprovalDecision::Approve, &gate);
    gated(
        &mut t,
        Input::Executed {
            step: "a".into(),
            attempt: 1,
            reply: ExecReply::Failed {
                kind: FailureKind::Retryable,
                message: "503".into(),
                output: None,
            },
        },
        6_000,
        &gate,
    );
    let tr = gated(
        &mut t,
        Input::RetryDue {
            step: "a".into(),
            attempt: 2,
        },
        7_000,
        &gate,
    );
    assert_eq!(tr.actions, vec![exec("a", 2)], "same args, same policies");
    assert_eq!(t.steps[0].cost_micros, 3_000, "each attempt is charged");
}

#[test]
fn cancelling_voids_a_pending_approval_and_a_restart_rearms_its_expiry() {
    let gate = Rules::new(&[("a", Ruling::RequireApproval)]);
    let mut t = task();
    planned_with(&mut t, vec![spec("a", &[])], &gate);
    let tr = gated(&mut t.clone(), Input::Start, 9_000, &gate);
    assert_eq!(
        tr.actions,
        vec![Action::ApprovalAt {
            step: "a".into(),
            approval_id: "t1-a1".into(),
            at_ms: 62_000
        }]
    );
    gated(
        &mut t,
        Input::Cancel {
            reason: "not needed".into(),
        },
        9_000,
        &gate,
    );
    assert_eq!(
        t.steps[0].approval.as_ref().map(|a| a.state),
        Some(ApprovalState::Void)
    );
    let late = apply(
        &mut t,
        Input::Decide {
            approval_id: "t1-a1".into(),
            decision: ApprovalDecision::Approve,
            by: "ann".into(),
            note: None,
        },
        10_000,
        0.0,
        &limits(),
        &gate,
    );
    assert_eq!(
        late.err(),
        Some(Rejected("approval `t1-a1` is already void".into()))
    );
}

fn with_undo(mut s: StepSpec) -> StepSpec {
    let mut undo = spec(&StepSpec::undo_id(&s.id), &[]);
    undo.compensates = Some(s.id.clone());
    undo.max_attempts = 1;
    s.compensate = Some(Box::new(undo));
    s
}

/// Runs `step`'s current attempt to a verdict at `now_ms`.
fn succeed(t: &mut Task, step: &str, now_ms: u64, gate: &Rules) -> Transition {
    let attempt = t.step(step).map_or(0, |s| s.attempts);
    let executed = Input::Executed {
        step: step.into(),
        attempt,
        reply: done(r#"{"status":200}"#),
    };
    gated(t, executed, now_ms, gate);
    let verified = Input::Verified {
        step: step.into(),
        attempt,
        verdict: pass(),
        task_verdict: None,
        cost_micros: 0,
    };
    gated(t, verified, now_ms, gate)
}

#[test]
fn cancel_undoes_the_done_steps_newest_first_then_ends_cancelled() {
    let gate = Rules::new(&[("c", Ruling::RequireApproval)]);
    let mut t = task();
    planned_with(
        &mut t,
        vec![
            with_undo(spec("a", &[])),
            with_undo(spec("b", &["a"])),
            spec("c", &["b"]),
        ],
        &gate,
    );
    succeed(&mut t, "a", 3_000, &gate);
    succeed(&mut t, "b", 4_000, &gate);
    assert_eq!(t.status, TaskStatus::AwaitingApproval, "c waits");

    let tr = gated(
        &mut t,
        Input::Cancel {
            reason: "client left".into(),
        },
        5_000,
        &gate,
    );
    assert_eq!(kinds(&tr), ["compensating", "step_started"]);
    assert_eq!(
        tr.events[0].detail.as_deref(),
        Some("client left; undoing b, a")
    );
    assert_eq!(
        tr.actions,
        vec![exec("b.undo", 1)],
        "one at a time, newest first"
    );
    assert_eq!(t.step("c").map(|s| s.status), Some(StepStatus::Skipped));
    assert_eq!(
        t.step("c")
            .and_then(|s| s.approval.as_ref())
            .map(|a| a.state),
        Some(ApprovalState::Void)
    );
    // Cancelling again while undoing is refused.
    let again = apply(
        &mut t.clone(),
        Input::Cancel {
            reason: "again".into(),
        },
        5_000,
        0.0,
        &limits(),
        &gate,
    );
    assert!(again.is_err());

    let tr = succeed(&mut t, "b.undo", 6_000, &gate);
    assert_eq!(tr.actions, vec![exec("a.undo", 1)]);
    let tr = succeed(&mut t, "a.undo", 7_000, &gate);
    assert_eq!(kinds(&tr), ["step_succeeded", "cancelled"]);
    assert_eq!(tr.events[1].detail.as_deref(), Some("2 of 2 steps undone"));
    assert_eq!(t.status, TaskStatus::Cancelled);
    assert_eq!(t.failure.as_deref(), Some("cancelled: client left"));
}

#[test]
fn a_failed_task_compensates_and_a_failed_undo_is_reported_not_fatal() {
    let gate = Rules::new(&[]);
    let mut t = task();
    planned_with(
        &mut t,
        vec![
            with_undo(spec("a", &[])),
            with_undo(spec("b", &[])),
            spec("c", &["a", "b"]),
        ],
        &gate,
    );
    succeed(&mut t, "a", 3_000, &gate);
    succeed(&mut t, "b", 4_000, &gate);
    let failed = ExecReply::Failed {
        kind: FailureKind::Permanent,
        message: "422".into(),
        output: None,
    };
    let tr = gated(
        &mut t,
        Input::Executed {
            step: "c".into(),
            attempt: 1,
            reply: failed.clone(),
        },
        5_000,
        &gate,
    );
    assert_eq!(t.status, TaskStatus::Compensating);
    assert_eq!(tr.actions, vec![exec("b.undo", 1)]);
    // The undo of b fails for good (one attempt): a is still undone.
    let tr = gated(
        &mut t,
        Input::Executed {
            step: "b.undo".into(),
            attempt: 1,
            reply: failed,
        },
        6_000,
        &gate,
    );
    assert_eq!(tr.actions, vec![exec("a.undo", 1)]);
    let tr = succeed(&mut t, "a.undo", 7_000, &gate);
    assert_eq!(kinds(&tr), ["step_succeeded", "failed"]);
    assert_eq!(tr.events[1].detail.as_deref(), Some("1 of 2 steps undone"));
    assert_eq!(
        t.failure.as_deref(),
        Some(
            "step `c` failed after 1 attempt: 422; compensation failed: step `b.undo` failed after 1 attempt: 422"
        )
    );
}

#[test]
fn nothing_to_undo_ends_the_task_at_once() {
    let gate = Rules::new(&[]);
    let mut t = task();
    planned_with(&mut t, vec![spec("a", &[])], &gate);
    succeed(&mut t, "a", 3_000, &gate);
    assert_eq!(t.status, TaskStatus::Verifying);
    let tr = gated(
        &mut t,
        Input::Cancel {
            reason: "stop".into(),
        },
        5_000,
        &gate,
    );
    assert_eq!(kinds(&tr), ["cancelled"]);
    assert_eq!(t.ends_as, None);
}

#[test]
fn a_takeover_is_recorded_and_names_the_new_owner_then_resumes_in_flight_steps() {
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    let seq = t.event_seq;
    let tr = go(
        &mut t,
        Input::TakenOver {
            from: "n1".into(),
            by: "n2".into(),
            token: 42,
        },
    );
    assert!(tr.commit);
    assert!(tr.actions.is_empty(), "{:?}", tr.actions);
    assert_eq!(kinds(&tr), vec!["taken_over"]);
    let event = &tr.events[0];
    assert_eq!(event.seq, seq + 1);
    assert_eq!(event.node_id, "n2");
    assert_eq!(
        event.detail.as_deref(),
        Some("from n1, under fencing token 42")
    );
    assert_eq!(t.node_id, "n2");
    // The step the old owner had dispatched is re-sent, same attempt.
    let tr = go(&mut t, Input::Start);
    assert_eq!(tr.actions, vec![exec("a", 1)]);

    // A task that ended is not taken over: nothing happens.
    let mut ended = task();
    go(
        &mut ended,
        Input::Cancel {
            reason: "stop".into(),
        },
    );
    let tr = go(
        &mut ended,
        Input::TakenOver {
            from: "n1".into(),
            by: "n2".into(),
            token: 7,
        },
    );
    assert!(!tr.commit && tr.events.is_empty());
    assert_eq!(ended.node_id, "n1");
}

/// Archiving is effect-free and redone after a crash: the last step's success, the
/// verdicts and `archiving` are held and commit with `succeeded` (one commit fewer);
/// a failed archive hop commits them at once; an operator's input is never held.
#[test]
fn archiving_is_held_until_the_archive_answers() {
    let last_step_done = |t: &mut Task| {
        planned(t, vec![spec("a", &[])]);
        go(
            t,
            Input::Executed {
                step: "a".into(),
                attempt: 1,
                reply: forwarded("{}", pass(), Some(pass())),
            },
        )
    };
    let mut t = task();
    let tr = last_step_done(&mut t);
    assert!(!tr.commit);
    assert_eq!(kinds(&tr), ["step_succeeded", "verifying", "archiving"]);
    assert_eq!(t.updated_at_ms, 2_000, "changed now, whenever it commits");
    let tr = go(&mut t, Input::Archived(ArchiveReply::Archived));
    assert!(tr.commit, "`succeeded` commits, and what was held with it");
    assert_eq!(kinds(&tr), ["succeeded"]);

    let mut t = task();
    last_step_done(&mut t);
    let tr = go(
        &mut t,
        Input::Archived(ArchiveReply::Failed {
            message: "store full".into(),
        }),
    );
    assert!(
        tr.commit,
        "a task waiting for the archivist shows where it is"
    );
    assert!(matches!(tr.actions[..], [Action::HopAt { .. }]));
    assert_eq!(t.status, TaskStatus::Archiving);

    // Verified by a separate hop: `verifying` commits with the step, `archiving` is held.
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    let tr = executed(&mut t, "a", 1, forwarded("{}", pass(), None));
    assert!(tr.commit);
    assert_eq!(tr.actions, vec![Action::VerifyTask]);
    let tr = go(&mut t, Input::TaskVerified(pass()));
    assert!(!tr.commit);
    assert_eq!(kinds(&tr), ["archiving"]);

    // An operator who marks the last step done is answered after a commit.
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    let unknown = ExecReply::Failed {
        kind: FailureKind::OutcomeUnknown,
        message: "unknown".into(),
        output: None,
    };
    executed(&mut t, "a", 1, unknown);
    let tr = go(
        &mut t,
        Input::Resolve {
            step: "a".into(),
            decision: DecisionKind::MarkDone,
            by: "ops".into(),
            note: None,
        },
    );
    assert!(tr.commit);
    assert_eq!(t.steps[0].status, StepStatus::Succeeded);

    // In a cluster the verdict commits (and is replicated) before the archive hop.
    let mut t = task();
    planned(&mut t, vec![spec("a", &[])]);
    let replicated = Limits {
        checkpoints_replicated: true,
        ..limits()
    };
    let reply = forwarded("{}", pass(), Some(pass()));
    let tr = apply(
        &mut t,
        Input::Executed {
            step: "a".into(),
            attempt: 1,
            reply,
        },
        2_000,
        0.0,
        &replicated,
        &AllowAll,
    )
    .expect("accepted input");
    assert!(
        tr.commit,
        "a partitioned archive hop must not leave it unreplicated"
    );
    assert_eq!(kinds(&tr), ["step_succeeded", "verifying", "archiving"]);
}
