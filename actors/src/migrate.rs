//! Migrations of the records `actors` stores (tasks), run once when a node opens its store.
//!
//! postcard is not self-describing: a record decodes only as the exact layout that wrote
//! it. So a layout change keeps the old layout here, frozen, and rewrites every record
//! once. Enum variants appended at the end need no migration (postcard stores the index).
//! `storage` versions its own layout (column families, the audit chain) separately.

use serde::{Deserialize, Serialize};
use storage::{Batch, Cf, Store, StoreError};

use crate::model::{
    Approval, Criteria, Episode, EpisodeStep, JsonPathEquals, JsonText, Placement, Step, StepSpec,
    StepStatus, Task, TaskStatus,
};
use crate::protocol::{TaskCheck, Verdict};

/// Layout of the records in `Cf::Tasks`: 2 added approvals, cost, persona and
/// compensation; 3 added a step's placement; 4 added the LLM judge criterion, a task's
/// free-text goal and its planning record; 5 added a task's `not_before_ms`; 6 its
/// `priority`.
pub const RECORDS_VERSION: u32 = 6;
const META_RECORDS_KEY: &[u8] = b"records_version";
/// Records rewritten per synced batch.
const BATCH_RECORDS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the store's task records have layout {found}, newer than this binary's {RECORDS_VERSION}: run a newer cadre"
    )]
    TooNew { found: u32 },
    #[error("task record `{key}` cannot be read as layout {version}: {source}")]
    Record {
        key: String,
        version: u32,
        source: StoreError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Brings every task record to [`RECORDS_VERSION`]; returns how many were rewritten.
pub async fn run(store: &Store) -> Result<usize, MigrateError> {
    // Unstamped: a store from before records were versioned, or a new one.
    let found = store.get::<u32>(Cf::Meta, META_RECORDS_KEY)?.unwrap_or(1);
    if found > RECORDS_VERSION {
        return Err(MigrateError::TooNew { found });
    }
    let mut rewritten = 0;
    if found < RECORDS_VERSION {
        let keys = store.keys(Cf::Tasks)?;
        for chunk in keys.chunks(BATCH_RECORDS) {
            let mut batch = Batch::new();
            for key in chunk {
                let read = |source| MigrateError::Record {
                    key: String::from_utf8_lossy(key).into_owned(),
                    version: found,
                    source,
                };
                let task = match found {
                    ..2 => {
                        let old: Option<TaskV1> = store.get(Cf::Tasks, key).map_err(read)?;
                        old.map(|t| t.into_v2().into_v3().into_v4().into_v5().into_current())
                    }
                    2 => {
                        let old: Option<TaskV2> = store.get(Cf::Tasks, key).map_err(read)?;
                        old.map(|t| t.into_v3().into_v4().into_v5().into_current())
                    }
                    3 => {
                        let old: Option<TaskV3> = store.get(Cf::Tasks, key).map_err(read)?;
                        old.map(|t| t.into_v4().into_v5().into_current())
                    }
                    4 => {
                        let old: Option<TaskV4> = store.get(Cf::Tasks, key).map_err(read)?;
                        old.map(|t| t.into_v5().into_current())
                    }
                    _ => {
                        let old: Option<TaskV5> = store.get(Cf::Tasks, key).map_err(read)?;
                        old.map(TaskV5::into_current)
                    }
                };
                if let Some(task) = task {
                    batch.put(Cf::Tasks, key.clone(), &task)?;
                    rewritten += 1;
                }
            }
            store.commit(batch).await?;
        }
    }
    if found != RECORDS_VERSION {
        let mut batch = Batch::new();
        batch.put(Cf::Meta, META_RECORDS_KEY, &RECORDS_VERSION)?;
        store.commit(batch).await?;
    }
    Ok(rewritten + run_episodes(store).await?)
}

/// Layout of the records in `Cf::Episodes`: 2 added the plan (params as sent), verdicts,
/// attempts and per-step timestamps.
pub const EPISODES_VERSION: u32 = 2;
const META_EPISODES_KEY: &[u8] = b"episodes_version";

/// Brings every episode to [`EPISODES_VERSION`]; what layout 1 did not keep stays
/// empty (`null` params, no verdicts).
async fn run_episodes(store: &Store) -> Result<usize, MigrateError> {
    let found = store.get::<u32>(Cf::Meta, META_EPISODES_KEY)?.unwrap_or(1);
    if found > EPISODES_VERSION {
        return Err(MigrateError::TooNew { found });
    }
    if found == EPISODES_VERSION {
        return Ok(0);
    }
    let mut rewritten = 0;
    let keys = store.keys(Cf::Episodes)?;
    for chunk in keys.chunks(BATCH_RECORDS) {
        let mut batch = Batch::new();
        for key in chunk {
            let old: Option<EpisodeV1> =
                store
                    .get(Cf::Episodes, key)
                    .map_err(|source| MigrateError::Record {
                        key: String::from_utf8_lossy(key).into_owned(),
                        version: found,
                        source,
                    })?;
            if let Some(old) = old {
                batch.put(Cf::Episodes, key.clone(), &old.into_current())?;
                rewritten += 1;
            }
        }
        store.commit(batch).await?;
    }
    let mut batch = Batch::new();
    batch.put(Cf::Meta, META_EPISODES_KEY, &EPISODES_VERSION)?;
    store.commit(batch).await?;
    Ok(rewritten)
}

/// `Episode` as layout 1 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EpisodeV1 {
    task_id: String,
    playbook: String,
    input: JsonText,
    /// `(step_id, tool, output)`.
    steps: Vec<(String, String, JsonText)>,
    started_at_ms: u64,
    finished_at_ms: u64,
    archived_at_ms: u64,
}

impl EpisodeV1 {
    fn into_current(self) -> Episode {
        Episode {
            task_id: self.task_id,
            playbook: self.playbook,
            playbook_version: String::new(),
            input: self.input,
            steps: self
                .steps
                .into_iter()
                .map(|(id, tool, output)| EpisodeStep {
                    id,
                    tool,
                    params: JsonText::null(),
                    output,
                    verdict: None,
                    attempts: 0,
                    started_at_ms: None,
                    finished_at_ms: None,
                })
                .collect(),
            task_verdict: None,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            archived_at_ms: self.archived_at_ms,
        }
    }
}

/// `StepSpec` as layout 1 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepSpecV1 {
    id: String,
    tool: String,
    params: JsonText,
    params_template: Option<JsonText>,
    verify: CriteriaV3,
    depends_on: Vec<String>,
    max_attempts: u32,
    timeout_ms: u64,
}

/// `Step` as layout 1 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepV1 {
    spec: StepSpecV1,
    status: StepStatus,
    attempts: u32,
    redeliveries: u32,
    output: Option<JsonText>,
    error: Option<String>,
    verdict: Option<Verdict>,
    started_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    retry_at_ms: Option<u64>,
    next_attempt: u32,
}

/// `Task` as layout 1 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskV1 {
    id: String,
    playbook: String,
    playbook_version: String,
    input: JsonText,
    idempotency_key: Option<String>,
    node_id: String,
    status: TaskStatus,
    created_at_ms: u64,
    updated_at_ms: u64,
    steps: Vec<StepV1>,
    checks: Vec<TaskCheckV3>,
    task_verdict: Option<Verdict>,
    failure: Option<String>,
    attention: Option<(String, String)>,
    event_seq: u64,
    hop_retries: u32,
}

impl TaskV1 {
    fn into_v2(self) -> TaskV2 {
        TaskV2 {
            id: self.id,
            playbook: self.playbook,
            playbook_version: self.playbook_version,
            input: self.input,
            idempotency_key: self.idempotency_key,
            node_id: self.node_id,
            status: self.status,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            steps: self
                .steps
                .into_iter()
                .map(|s| StepV2 {
                    spec: StepSpecV2 {
                        id: s.spec.id,
                        tool: s.spec.tool,
                        params: s.spec.params,
                        params_template: s.spec.params_template,
                        verify: s.spec.verify,
                        depends_on: s.spec.depends_on,
                        max_attempts: s.spec.max_attempts,
                        timeout_ms: s.spec.timeout_ms,
                        compensate: None,
                        compensates: None,
                    },
                    status: s.status,
                    attempts: s.attempts,
                    redeliveries: s.redeliveries,
                    output: s.output,
                    error: s.error,
                    verdict: s.verdict,
                    started_at_ms: s.started_at_ms,
                    finished_at_ms: s.finished_at_ms,
                    retry_at_ms: s.retry_at_ms,
                    next_attempt: s.next_attempt,
                    approval: None,
                    cost_micros: 0,
                })
                .collect(),
            checks: self.checks,
            task_verdict: self.task_verdict,
            failure: self.failure,
            attention: self.attention,
            event_seq: self.event_seq,
            hop_retries: self.hop_retries,
            // Tasks planned before personas existed ran as the operator.
            persona: String::new(),
            ends_as: None,
            approvals_requested: 0,
        }
    }
}

/// `StepSpec` as layout 2 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepSpecV2 {
    id: String,
    tool: String,
    params: JsonText,
    params_template: Option<JsonText>,
    verify: CriteriaV3,
    depends_on: Vec<String>,
    max_attempts: u32,
    timeout_ms: u64,
    compensate: Option<Box<StepSpecV2>>,
    compensates: Option<String>,
}

impl StepSpecV2 {
    fn into_v3(self) -> StepSpecV3 {
        StepSpecV3 {
            id: self.id,
            tool: self.tool,
            params: self.params,
            params_template: self.params_template,
            verify: self.verify,
            depends_on: self.depends_on,
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            compensate: self.compensate.map(|c| Box::new(c.into_v3())),
            compensates: self.compensates,
            // Steps planned before placement existed ran on any node.
            placement: None,
        }
    }
}

/// `Step` as layout 2 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepV2 {
    spec: StepSpecV2,
    status: StepStatus,
    attempts: u32,
    redeliveries: u32,
    output: Option<JsonText>,
    error: Option<String>,
    verdict: Option<Verdict>,
    started_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    retry_at_ms: Option<u64>,
    next_attempt: u32,
    approval: Option<Approval>,
    cost_micros: u64,
}

/// `Task` as layout 2 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskV2 {
    id: String,
    playbook: String,
    playbook_version: String,
    input: JsonText,
    idempotency_key: Option<String>,
    node_id: String,
    status: TaskStatus,
    created_at_ms: u64,
    updated_at_ms: u64,
    steps: Vec<StepV2>,
    checks: Vec<TaskCheckV3>,
    task_verdict: Option<Verdict>,
    failure: Option<String>,
    attention: Option<(String, String)>,
    event_seq: u64,
    hop_retries: u32,
    persona: String,
    ends_as: Option<TaskStatus>,
    approvals_requested: u32,
}

impl TaskV2 {
    fn into_v3(self) -> TaskV3 {
        TaskV3 {
            id: self.id,
            playbook: self.playbook,
            playbook_version: self.playbook_version,
            input: self.input,
            idempotency_key: self.idempotency_key,
            node_id: self.node_id,
            status: self.status,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            steps: self
                .steps
                .into_iter()
                .map(|s| StepV3 {
                    spec: s.spec.into_v3(),
                    status: s.status,
                    attempts: s.attempts,
                    redeliveries: s.redeliveries,
                    output: s.output,
                    error: s.error,
                    verdict: s.verdict,
                    started_at_ms: s.started_at_ms,
                    finished_at_ms: s.finished_at_ms,
                    retry_at_ms: s.retry_at_ms,
                    next_attempt: s.next_attempt,
                    approval: s.approval,
                    cost_micros: s.cost_micros,
                })
                .collect(),
            checks: self.checks,
            task_verdict: self.task_verdict,
            failure: self.failure,
            attention: self.attention,
            event_seq: self.event_seq,
            hop_retries: self.hop_retries,
            persona: self.persona,
            ends_as: self.ends_as,
            approvals_requested: self.approvals_requested,
        }
    }
}

/// `Criteria` as layouts 1 to 3 stored it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct CriteriaV3 {
    exit_code: Option<i64>,
    status_in: Option<Vec<u16>>,
    file_exists: Option<bool>,
    file_contains: Option<String>,
    json_path_equals: Option<JsonPathEquals>,
    output_contains: Option<String>,
}

impl CriteriaV3 {
    fn into_current(self) -> Criteria {
        Criteria {
            exit_code: self.exit_code,
            status_in: self.status_in,
            file_exists: self.file_exists,
            file_contains: self.file_contains,
            json_path_equals: self.json_path_equals,
            output_contains: self.output_contains,
            llm_judge: None,
        }
    }
}

/// `TaskCheck` as layouts 1 to 3 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskCheckV3 {
    step: String,
    criteria: CriteriaV3,
}

/// `StepSpec` as layout 3 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepSpecV3 {
    id: String,
    tool: String,
    params: JsonText,
    params_template: Option<JsonText>,
    verify: CriteriaV3,
    depends_on: Vec<String>,
    max_attempts: u32,
    timeout_ms: u64,
    compensate: Option<Box<StepSpecV3>>,
    compensates: Option<String>,
    placement: Option<Placement>,
}

impl StepSpecV3 {
    fn into_current(self) -> StepSpec {
        StepSpec {
            id: self.id,
            tool: self.tool,
            params: self.params,
            params_template: self.params_template,
            verify: self.verify.into_current(),
            depends_on: self.depends_on,
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            compensate: self.compensate.map(|c| Box::new(c.into_current())),
            compensates: self.compensates,
            placement: self.placement,
        }
    }
}

/// `Step` as layout 3 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepV3 {
    spec: StepSpecV3,
    status: StepStatus,
    attempts: u32,
    redeliveries: u32,
    output: Option<JsonText>,
    error: Option<String>,
    verdict: Option<Verdict>,
    started_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    retry_at_ms: Option<u64>,
    next_attempt: u32,
    approval: Option<Approval>,
    cost_micros: u64,
}

/// `Task` as layout 3 stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskV3 {
    id: String,
    playbook: String,
    playbook_version: String,
    input: JsonText,
    idempotency_key: Option<String>,
    node_id: String,
    status: TaskStatus,
    created_at_ms: u64,
    updated_at_ms: u64,
    steps: Vec<StepV3>,
    checks: Vec<TaskCheckV3>,
    task_verdict: Option<Verdict>,
    failure: Option<String>,
    attention: Option<(String, String)>,
    event_seq: u64,
    hop_retries: u32,
    persona: String,
    ends_as: Option<TaskStatus>,
    approvals_requested: u32,
}

impl TaskV3 {
    fn into_v4(self) -> TaskV4 {
        TaskV4 {
            id: self.id,
            playbook: self.playbook,
            playbook_version: self.playbook_version,
            input: self.input,
            idempotency_key: self.idempotency_key,
            node_id: self.node_id,
            status: self.status,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            steps: self
                .steps
                .into_iter()
                .map(|s| Step {
                    spec: s.spec.into_current(),
                    status: s.status,
                    attempts: s.attempts,
                    redeliveries: s.redeliveries,
                    output: s.output,
                    error: s.error,
                    verdict: s.verdict,
                    started_at_ms: s.started_at_ms,
                    finished_at_ms: s.finished_at_ms,
                    retry_at_ms: s.retry_at_ms,
                    next_attempt: s.next_attempt,
                    approval: s.approval,
                    cost_micros: s.cost_micros,
                })
                .collect(),
            checks: self
                .checks
                .into_iter()
                .map(|c| TaskCheck {
                    step: c.step,
                    criteria: c.criteria.into_current(),
                })
                .collect(),
            task_verdict: self.task_verdict,
            failure: self.failure,
            attention: self.attention,
            event_seq: self.event_seq,
            hop_retries: self.hop_retries,
            persona: self.persona,
            ends_as: self.ends_as,
            approvals_requested: self.approvals_requested,
            // Tasks from before LLM planning ran playbooks.
            goal: None,
            planning: None,
        }
    }
}

/// `Task` as layout 4 stored it (its steps and checks are today's).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskV4 {
    id: String,
    playbook: String,
    playbook_version: String,
    input: JsonText,
    idempotency_key: Option<String>,
    node_id: String,
    status: TaskStatus,
    created_at_ms: u64,
    updated_at_ms: u64,
    steps: Vec<Step>,
    checks: Vec<TaskCheck>,
    task_verdict: Option<Verdict>,
    failure: Option<String>,
    attention: Option<(String, String)>,
    event_seq: u64,
    hop_retries: u32,
    persona: String,
    ends_as: Option<TaskStatus>,
    approvals_requested: u32,
    goal: Option<String>,
    planning: Option<crate::model::Planning>,
}

impl TaskV4 {
    fn into_v5(self) -> TaskV5 {
        TaskV5 {
            id: self.id,
            playbook: self.playbook,
            playbook_version: self.playbook_version,
            input: self.input,
            idempotency_key: self.idempotency_key,
            node_id: self.node_id,
            status: self.status,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            steps: self.steps,
            checks: self.checks,
            task_verdict: self.task_verdict,
            failure: self.failure,
            attention: self.attention,
            event_seq: self.event_seq,
            hop_retries: self.hop_retries,
            persona: self.persona,
            ends_as: self.ends_as,
            approvals_requested: self.approvals_requested,
            goal: self.goal,
            planning: self.planning,
            // Tasks from before delayed submission ran at once.
            not_before_ms: None,
        }
    }
}

/// `Task` as layout 5 stored it (its steps and checks are today's).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskV5 {
    id: String,
    playbook: String,
    playbook_version: String,
    input: JsonText,
    idempotency_key: Option<String>,
    node_id: String,
    status: TaskStatus,
    created_at_ms: u64,
    updated_at_ms: u64,
    steps: Vec<Step>,
    checks: Vec<TaskCheck>,
    task_verdict: Option<Verdict>,
    failure: Option<String>,
    attention: Option<(String, String)>,
    event_seq: u64,
    hop_retries: u32,
    persona: String,
    ends_as: Option<TaskStatus>,
    approvals_requested: u32,
    goal: Option<String>,
    planning: Option<crate::model::Planning>,
    not_before_ms: Option<u64>,
}

impl TaskV5 {
    fn into_current(self) -> Task {
        Task {
            id: self.id,
            playbook: self.playbook,
            playbook_version: self.playbook_version,
            input: self.input,
            idempotency_key: self.idempotency_key,
            node_id: self.node_id,
            status: self.status,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            steps: self.steps,
            checks: self.checks,
            task_verdict: self.task_verdict,
            failure: self.failure,
            attention: self.attention,
            event_seq: self.event_seq,
            hop_retries: self.hop_retries,
            persona: self.persona,
            ends_as: self.ends_as,
            approvals_requested: self.approvals_requested,
            goal: self.goal,
            planning: self.planning,
            not_before_ms: self.not_before_ms,
            // Tasks from before priorities were all normal.
            priority: crate::model::Priority::Normal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1(id: &str) -> TaskV1 {
        TaskV1 {
            id: id.into(),
            playbook: "pb".into(),
            playbook_version: "1@abc".into(),
            input: JsonText("{}".into()),
            idempotency_key: Some("k".into()),
            node_id: "n1".into(),
            status: TaskStatus::Running,
            created_at_ms: 1,
            updated_at_ms: 2,
            steps: vec![StepV1 {
                spec: StepSpecV1 {
                    id: "s1".into(),
                    tool: "file.write".into(),
                    params: JsonText("{}".into()),
                    params_template: None,
                    verify: CriteriaV3::default(),
                    depends_on: vec![],
                    max_attempts: 3,
                    timeout_ms: 1000,
                },
                status: StepStatus::Succeeded,
                attempts: 2,
                redeliveries: 0,
                output: Some(JsonText("{\"ok\":true}".into())),
                error: None,
                verdict: None,
                started_at_ms: Some(1),
                finished_at_ms: Some(2),
                retry_at_ms: None,
                next_attempt: 2,
            }],
            checks: vec![],
            task_verdict: None,
            failure: None,
            attention: None,
            event_seq: 7,
            hop_retries: 0,
        }
    }

    #[tokio::test]
    async fn layout_1_tasks_are_rewritten_once_and_keep_their_state() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut batch = Batch::new();
        for id in ["T1", "T2"] {
            batch
                .put(Cf::Tasks, id.as_bytes(), &v1(id))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        store.commit(batch).await.unwrap_or_else(|e| panic!("{e}"));
        // Layout 1 does not decode as the current layout: the migration is needed.
        assert!(store.get::<Task>(Cf::Tasks, b"T1").is_err());

        assert_eq!(run(&store).await.unwrap_or_else(|e| panic!("{e}")), 2);
        let task: Task = store
            .get(Cf::Tasks, b"T1")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("T1 gone"));
        assert_eq!((task.event_seq, task.status), (7, TaskStatus::Running));
        assert_eq!(task.steps[0].attempts, 2);
        assert_eq!(task.steps[0].approval, None);
        // Stamped: a second open rewrites nothing.
        assert_eq!(run(&store).await.unwrap_or_else(|e| panic!("{e}")), 0);
    }

    #[tokio::test]
    async fn layout_1_episodes_are_rewritten_with_what_they_had() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let old = EpisodeV1 {
            task_id: "T1".into(),
            playbook: "pb".into(),
            input: JsonText("{\"a\":1}".into()),
            steps: vec![(
                "s1".into(),
                "file.write".into(),
                JsonText("{\"ok\":true}".into()),
            )],
            started_at_ms: 1,
            finished_at_ms: 2,
            archived_at_ms: 3,
        };
        let mut batch = Batch::new();
        batch
            .put(Cf::Episodes, b"T1".to_vec(), &old)
            .unwrap_or_else(|e| panic!("{e}"));
        store.commit(batch).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(store.get::<Episode>(Cf::Episodes, b"T1").is_err());
        assert_eq!(run(&store).await.unwrap_or_else(|e| panic!("{e}")), 1);
        let ep: Episode = store
            .get(Cf::Episodes, b"T1")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("T1 gone"));
        assert_eq!(
            (ep.steps[0].id.as_str(), ep.steps[0].output.0.as_str()),
            ("s1", "{\"ok\":true}")
        );
        assert_eq!((ep.started_at_ms, ep.archived_at_ms), (1, 3));
        assert_eq!(run(&store).await.unwrap_or_else(|e| panic!("{e}")), 0);
    }

    #[tokio::test]
    async fn layout_4_tasks_keep_their_goal_and_gain_no_delay() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut old = v1("T1").into_v2().into_v3().into_v4();
        old.goal = Some("Welcome Acme".into());
        let mut batch = Batch::new();
        batch
            .put(Cf::Tasks, b"T1".to_vec(), &old)
            .unwrap_or_else(|e| panic!("{e}"));
        batch
            .put(Cf::Meta, META_RECORDS_KEY, &4u32)
            .unwrap_or_else(|e| panic!("{e}"));
        store.commit(batch).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run(&store).await.unwrap_or_else(|e| panic!("{e}")), 1);
        let task: Task = store
            .get(Cf::Tasks, b"T1")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("T1 gone"));
        assert_eq!(task.goal.as_deref(), Some("Welcome Acme"));
        assert_eq!(task.not_before_ms, None);
        assert_eq!(task.priority, crate::model::Priority::Normal);
        assert_eq!(task.steps.len(), 1);
    }

    #[tokio::test]
    async fn layout_3_tasks_keep_their_criteria_and_gain_no_goal() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut old = v1("T1").into_v2().into_v3();
        old.steps[0].spec.verify.output_contains = Some("done".into());
        old.steps[0].spec.placement = Some(Placement::Node("laptop".into()));
        old.checks.push(TaskCheckV3 {
            step: "s1".into(),
            criteria: CriteriaV3 {
                status_in: Some(vec![201]),
                ..Default::default()
            },
        });
        let mut batch = Batch::new();
        batch
            .put(Cf::Tasks, b"T1".to_vec(), &old)
            .unwrap_or_else(|e| panic!("{e}"));
        batch
            .put(Cf::Meta, META_RECORDS_KEY, &3u32)
            .unwrap_or_else(|e| panic!("{e}"));
        store.commit(batch).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run(&store).await.unwrap_or_else(|e| panic!("{e}")), 1);
        let task: Task = store
            .get(Cf::Tasks, b"T1")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("T1 gone"));
        let spec = &task.steps[0].spec;
        assert_eq!(spec.verify.output_contains.as_deref(), Some("done"));
        assert_eq!(spec.verify.llm_judge, None);
        assert_eq!(spec.placement, Some(Placement::Node("laptop".into())));
        assert_eq!(task.checks[0].criteria.status_in, Some(vec![201]));
        assert_eq!((task.goal, task.planning), (None, None));
        assert_eq!(task.event_seq, 7);
    }

    #[tokio::test]
    async fn layout_2_tasks_gain_no_placement() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut batch = Batch::new();
        let mut old = v1("T1").into_v2();
        let undo = old.steps[0].spec.clone();
        old.steps[0].spec.compensate = Some(Box::new(undo));
        batch
            .put(Cf::Tasks, b"T1".to_vec(), &old)
            .unwrap_or_else(|e| panic!("{e}"));
        batch
            .put(Cf::Meta, META_RECORDS_KEY, &2u32)
            .unwrap_or_else(|e| panic!("{e}"));
        store.commit(batch).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run(&store).await.unwrap_or_else(|e| panic!("{e}")), 1);
        let task: Task = store
            .get(Cf::Tasks, b"T1")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("T1 gone"));
        assert_eq!(task.steps[0].spec.placement, None);
        assert!(
            task.steps[0].spec.compensate.is_some(),
            "the undo step survives"
        );
    }

    #[tokio::test]
    async fn a_newer_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut batch = Batch::new();
        batch
            .put(Cf::Meta, META_RECORDS_KEY, &(RECORDS_VERSION + 1))
            .unwrap_or_else(|e| panic!("{e}"));
        store.commit(batch).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            run(&store).await,
            Err(MigrateError::TooNew { .. })
        ));
    }
}
