//! LLM providers: one client for the OpenAI-compatible chat-completions API, which
//! OpenAI, Ollama, vLLM, llama.cpp's server and most hosted models speak.
//!
//! Every call goes through [`Provider::chat`]: a per-provider concurrency cap, retries
//! of 429, 5xx and timeouts with backoff (honouring `Retry-After`), token usage read
//! from every response and priced with the configured table. The API key is held as
//! an [`ApiKey`], whose `Debug` never shows it, and is sent only in the
//! `Authorization` header.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

pub mod judge;
pub mod plan;
pub mod schema;

/// A provider's API key. Never printed: `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Who asks: models are routed by role (a larger one plans, a cheaper one runs steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Planner,
    Executor,
    Judge,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Planner => "planner",
            Role::Executor => "executor",
            Role::Judge => "judge",
        }
    }
}

/// US dollars per million tokens. (So a token count times the price is millionths of a
/// dollar, the unit budgets count in.)
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
}

impl Price {
    /// `2.5/10`: input and output dollars per million tokens.
    pub fn parse(text: &str) -> Result<Price, String> {
        let (i, o) = text
            .split_once('/')
            .ok_or_else(|| format!("price `{text}` must look like `2.5/10` (input/output US dollars per million tokens)"))?;
        let num = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("price `{text}`: `{s}` is not a non-negative number"))
        };
        Ok(Price {
            input_usd_per_mtok: num(i)?,
            output_usd_per_mtok: num(o)?,
        })
    }

    /// What `prompt` + `completion` tokens cost, in millionths of a dollar.
    pub fn cost_micros(&self, prompt: u64, completion: u64) -> u64 {
        (prompt as f64 * self.input_usd_per_mtok + completion as f64 * self.output_usd_per_mtok)
            .round() as u64
    }
}

/// Models per role; an empty one falls back to `default`.
#[derive(Debug, Clone, Default)]
pub struct Models {
    pub default: String,
    pub planner: String,
    pub executor: String,
    pub judge: String,
}

impl Models {
    pub fn for_role(&self, role: Role) -> &str {
        let routed = match role {
            Role::Planner => &self.planner,
            Role::Executor => &self.executor,
            Role::Judge => &self.judge,
        };
        if routed.is_empty() {
            &self.default
        } else {
            routed
        }
    }
}

/// How the node reaches its LLM, and how the planner uses it.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// `https://api.openai.com/v1`, `http://localhost:11434/v1` (Ollama).
    pub base_url: String,
    pub api_key: Option<ApiKey>,
    pub models: Models,
    /// One attempt of one call.
    pub timeout: Duration,
    /// Calls in flight at once, per provider.
    pub concurrency_max: usize,
    /// Retries of a 429, 5xx or timeout before the call fails.
    pub retries_max: u32,
    pub retry_delay_base: Duration,
    pub retry_delay_max: Duration,
    /// By model; a model without a price costs 0 (and is counted as unpriced).
    pub prices: HashMap<String, Price>,
    /// Times an invalid plan is sent back with its errors before the task fails.
    pub plan_repairs_max: u32,
    /// Hard cap on a planning prompt, in characters.
    pub prompt_chars_max: usize,
    /// Steps an LLM plan has, at least (at most [`crate::playbook::STEPS_MAX`]).
    pub plan_steps_min: usize,
    /// Tools the LLM planner may use.
    pub plan_tools: Vec<String>,
    /// Context keys (by prefix) whose latest values the planning prompt shows.
    pub context_prefixes: Vec<String>,
}

impl LlmSettings {
    /// Time one call may take at worst: every attempt and the pauses between them.
    pub fn call_budget(&self) -> Duration {
        let attempts = self.retries_max + 1;
        self.timeout * attempts + self.retry_delay_max * self.retries_max
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Message {
        Message {
            role: "system".into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Message {
        Message {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub role: Role,
    /// Empty: the role's model.
    pub model: String,
    pub messages: Vec<Message>,
    /// Structured output: `(name, JSON schema)`; the reply's content is JSON of it.
    pub schema: Option<(String, Value)>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
}

/// Tokens a call used and what they cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Millionths of a US dollar.
    pub cost_micros: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        if self.model.is_empty() {
            self.model = other.model.clone();
        }
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cost_micros += other.cost_micros;
    }

    pub fn to_json(&self) -> Value {
        json!({
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": crate::budget::usd(self.cost_micros),
        })
    }
}

#[derive(Debug, Clone)]
pub struct ChatReply {
    pub content: String,
    pub finish_reason: Option<String>,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    #[error(
        "no LLM provider is configured on this node (set CADRE_LLM_BASE_URL and CADRE_LLM_MODEL)"
    )]
    NotConfigured,
    /// 429, 5xx or timeouts past the retries: worth trying again later.
    #[error("{0}")]
    Unavailable(String),
    /// The provider refused the request (4xx) or answered something unreadable.
    #[error("{0}")]
    Refused(String),
}

/// The chat-completions client of one provider.
pub struct Provider {
    settings: LlmSettings,
    http: reqwest::Client,
    permits: Semaphore,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("base_url", &self.settings.base_url)
            .finish_non_exhaustive()
    }
}

impl Provider {
    pub fn new(settings: LlmSettings, metrics: Arc<Metrics>) -> Result<Provider, LlmError> {
        // reqwest is built without a default crypto provider (see `tools::http_request`).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("cadre/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LlmError::Refused(format!("cannot build the HTTP client: {e}")))?;
        Ok(Provider {
            permits: Semaphore::new(settings.concurrency_max.max(1)),
            settings,
            http,
            metrics,
        })
    }

    pub fn settings(&self) -> &LlmSettings {
        &self.settings
    }

    /// The model a role uses unless told otherwise.
    pub fn model_for(&self, role: Role) -> &str {
        self.settings.models.for_role(role)
    }

    pub fn price(&self, model: &str) -> Option<Price> {
        self.settings.prices.get(model).copied()
    }

    /// One chat completion, retried while it is worth it. The permit is held only
    /// while a request is on the wire, not during a backoff.
    pub async fn chat(&self, req: ChatRequest) -> Result<ChatReply, LlmError> {
        let model = if req.model.is_empty() {
            self.model_for(req.role).to_string()
        } else {
            req.model.clone()
        };
        if model.is_empty() {
            return Err(LlmError::Refused(format!(
                "no model for the {} (set CADRE_LLM_MODEL)",
                req.role.as_str()
            )));
        }
        let mut body = json!({"model": model, "messages": req.messages});
        if let Some((name, schema)) = &req.schema {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": false},
            });
        }
        if let Some(n) = req.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = req.temperature {
            body["temperature"] = json!(t);
        }
        let url = format!(
            "{}/chat/completions",
            self.settings.base_url.trim_end_matches('/')
        );
        let role = req.role.as_str();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let outcome = {
                let _permit =
                    self.permits.acquire().await.map_err(|_| {
                        LlmError::Unavailable("the provider is shutting down".into())
                    })?;
                self.metrics.llm_in_flight.inc();
                let timer = self
                    .metrics
                    .llm_request_seconds
                    .with_label_values(&[role])
                    .start_timer();
                let outcome = self.send(&url, &body).await;
                timer.observe_duration();
                self.metrics.llm_in_flight.dec();
                outcome
            };
            let wait = match outcome {
                Ok(reply) => {
                    let usage = self.usage(&model, &reply);
                    self.count(role, &model, "ok");
                    self.metrics
                        .llm_tokens_total
                        .with_label_values(&[role, &model, "prompt"])
                        .inc_by(usage.prompt_tokens);
                    self.metrics
                        .llm_tokens_total
                        .with_label_values(&[role, &model, "completion"])
                        .inc_by(usage.completion_tokens);
                    self.metrics
                        .llm_cost_usd_total
                        .with_label_values(&[role, &model])
                        .inc_by(crate::budget::usd(usage.cost_micros));
                    return Ok(ChatReply {
                        content: reply.content,
                        finish_reason: reply.finish_reason,
                        usage,
                    });
                }
                Err(Failure::Permanent(message)) => {
                    self.count(role, &model, "refused");
                    return Err(LlmError::Refused(message));
                }
                Err(Failure::Retryable {
                    message,
                    retry_after,
                }) => {
                    if attempt > self.settings.retries_max {
                        self.count(role, &model, "unavailable");
                        return Err(LlmError::Unavailable(format!(
                            "{message} (after {attempt} attempts)"
                        )));
                    }
                    self.count(role, &model, "retried");
                    let backoff = backoff(
                        self.settings.retry_delay_base,
                        self.settings.retry_delay_max,
                        attempt,
                        rand::random::<f64>(),
                    );
                    // The server's word beats our guess, within our own ceiling.
                    retry_after
                        .map(|d| d.min(self.settings.retry_delay_max))
                        .unwrap_or(backoff)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn count(&self, role: &str, model: &str, outcome: &str) {
        self.metrics
            .llm_requests_total
            .with_label_values(&[role, model, outcome])
            .inc();
    }

    fn usage(&self, model: &str, reply: &Completion) -> Usage {
        let price = self.price(model);
        if price.is_none() {
            self.metrics
                .llm_unpriced_total
                .with_label_values(&[model])
                .inc();
        }
        Usage {
            model: model.to_string(),
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
            cost_micros: price
                .map(|p| p.cost_micros(reply.prompt_tokens, reply.completion_tokens))
                .unwrap_or(0),
        }
    }

    async fn send(&self, url: &str, body: &Value) -> Result<Completion, Failure> {
        let mut request = self
            .http
            .post(url)
            .timeout(self.settings.timeout)
            .json(body);
        if let Some(ApiKey(key)) = &self.settings.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| Failure::Retryable {
            // reqwest's message names the URL, never the headers.
            message: format!("cannot reach the LLM provider: {e}"),
            retry_after: None,
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        let text = response.text().await.map_err(|e| Failure::Retryable {
            message: format!("the LLM provider's answer was cut off: {e}"),
            retry_after: None,
        })?;
        if !status.is_success() {
            let message = format!(
                "the LLM provider answered {status}: {}",
                error_message(&text)
            );
            return Err(if status.as_u16() == 429 || status.is_server_error() {
                Failure::Retryable {
                    message,
                    retry_after,
                }
            } else {
                Failure::Permanent(message)
            });
        }
        parse_completion(&text).map_err(Failure::Permanent)
    }
}

enum Failure {
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    Permanent(String),
}

/// What Cadre reads of a chat completion.
#[derive(Debug, Clone, PartialEq)]
struct Completion {
    content: String,
    finish_reason: Option<String>,
    prompt_tokens: u64,
    completion_tokens: u64,
}

fn parse_completion(text: &str) -> Result<Completion, String> {
    #[derive(Deserialize)]
    struct Wire {
        choices: Vec<Choice>,
        #[serde(default)]
        usage: Option<WireUsage>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: WireMessage,
        #[serde(default)]
        finish_reason: Option<String>,
    }
    #[derive(Deserialize)]
    struct WireMessage {
        #[serde(default)]
        content: Option<String>,
        #[serde(default)]
        refusal: Option<String>,
    }
    #[derive(Deserialize)]
    struct WireUsage {
        #[serde(default)]
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    let wire: Wire = serde_json::from_str(text)
        .map_err(|e| format!("the LLM provider's answer is not a chat completion: {e}"))?;
    let choice = wire
        .choices
        .into_iter()
        .next()
        .ok_or("the LLM provider's answer has no choices")?;
    if let Some(refusal) = choice.message.refusal.filter(|r| !r.is_empty()) {
        return Err(format!("the model refused: {refusal}"));
    }
    let usage = wire.usage.unwrap_or(WireUsage {
        prompt_tokens: 0,
        completion_tokens: 0,
    });
    Ok(Completion {
        content: choice.message.content.unwrap_or_default(),
        finish_reason: choice.finish_reason,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    })
}

/// The `error.message` of an OpenAI-style error body, else the body cut short.
fn error_message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| text.chars().take(300).collect())
}

/// `Retry-After` as seconds (`7`) or an HTTP date, as a wait from `now`.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An IMF-fixdate (`Wed, 25 Nov 2026 01:17:32 GMT`), the form `Retry-After` uses.
fn httpdate(s: &str) -> Option<std::time::SystemTime> {
    let mut parts = s.split_whitespace();
    let _weekday = parts.next()?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" {
        return None;
    }
    // Days from civil (Howard Hinnant), the inverse of `budget::day_of`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Exponential backoff with full jitter over its upper half: `base · 2^(n-1)`, capped.
fn backoff(base: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ceiling = exp.min(max);
    ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_turn_tokens_into_millionths_of_a_dollar() {
        let p = Price::parse("2.5/10").unwrap();
        // 1,000 prompt tokens at $2.5/M = $0.0025; 500 completion at $10/M = $0.005.
        assert_eq!(p.cost_micros(1_000, 500), 7_500);
        assert!(Price::parse("2.5").is_err());
        assert!(Price::parse("-1/2").is_err());
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_795_569_452); // Wed, 25 Nov 2026 01:17:32 GMT
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 01:17:40 GMT", now),
            Some(Duration::from_secs(8))
        );
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 01:17:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn completions_are_read_with_their_usage() {
        let c = parse_completion(
            r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
        )
        .unwrap();
        assert_eq!(c.content, "hi");
        assert_eq!((c.prompt_tokens, c.completion_tokens), (12, 3));
        assert!(parse_completion(r#"{"choices":[]}"#).is_err());
        let refused = parse_completion(
            r#"{"choices":[{"message":{"role":"assistant","content":null,"refusal":"no"}}]}"#,
        );
        assert!(refused.is_err_and(|e| e.contains("refused")));
    }

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let b = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert_eq!(backoff(b, max, 1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(b, max, 3, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(b, max, 9, 1.0), max);
        assert_eq!(backoff(b, max, 3, 0.0), Duration::from_millis(200));
    }

    #[test]
    fn api_keys_do_not_print() {
        let k = ApiKey::new("sk-secret");
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
    }
}
