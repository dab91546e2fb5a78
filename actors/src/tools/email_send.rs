//! `email.send`: one mail over SMTP (STARTTLS, or implicit TLS, or — for a relay on
//! the same host — none), authenticated with a password from the node's secrets. Class
//! `keyed`: the Message-ID is derived from the step's idempotency key, so a send that is
//! retried after a crash is recognisably the same mail to every mail system downstream.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{Value, json};

use super::{Call, Tool, ToolError, ToolInfo, str_param};
use crate::secrets::SecretStore;

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); refused if the server cannot.
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS: only for a relay on this host or a test server.
    None,
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// Empty: no authentication.
    pub user: String,
    /// The secret (in this node's store) holding the password, read at every send.
    pub password_secret: String,
    /// The default `From`.
    pub from: String,
    pub timeout: Duration,
    /// A PEM CA to trust besides the system's (a relay with your own CA).
    pub ca_pem: Option<Vec<u8>>,
}

pub struct EmailSend {
    config: Option<SmtpConfig>,
    secrets: Option<Arc<SecretStore>>,
}

impl EmailSend {
    pub fn new(config: Option<SmtpConfig>, secrets: Option<Arc<SecretStore>>) -> EmailSend {
        EmailSend { config, secrets }
    }
}

impl Tool for EmailSend {
    fn info(&self) -> &'static ToolInfo {
        &super::CATALOG[6]
    }

    fn run(&self, call: Call) -> BoxFuture<'_, Result<Value, ToolError>> {
        Box::pin(async move {
            let config = self.config.as_ref().ok_or_else(|| {
                ToolError::permanent(
                    "no SMTP server is configured on this node (CADRE_SMTP_HOST, CADRE_MAIL_FROM)",
                )
            })?;
            let p = &call.params;
            let to = mailboxes(p.get("to"), "to")?;
            let subject = str_param(p, "subject")?;
            let text = str_param(p, "text")?;
            let from: Mailbox = p
                .get("from")
                .and_then(Value::as_str)
                .unwrap_or(&config.from)
                .parse()
                .map_err(|e| ToolError::permanent(format!("param `from`: {e}")))?;
            let domain = from.email.domain().to_string();
            let message_id = message_id(&call.idempotency_key, &domain);
            let mut builder = Message::builder()
                .from(from)
                .subject(subject)
                .message_id(Some(message_id.clone()))
                .header(ContentType::TEXT_PLAIN);
            for m in to.iter() {
                builder = builder.to(m.clone());
            }
            if p.get("cc").is_some() {
                for m in mailboxes(p.get("cc"), "cc")?.iter() {
                    builder = builder.cc(m.clone());
                }
            }
            if let Some(r) = p.get("reply_to").and_then(Value::as_str) {
                let r: Mailbox = r
                    .parse()
                    .map_err(|e| ToolError::permanent(format!("param `reply_to`: {e}")))?;
                builder = builder.reply_to(r);
            }
            let message = builder
                .body(text.to_string())
                .map_err(|e| ToolError::permanent(format!("cannot build the mail: {e}")))?;
            let transport = self.transport(config, call.timeout)?;
            match transport.send(message).await {
                Ok(response) => Ok(json!({
                    "message_id": message_id,
                    "to": to.iter().map(|m| m.email.to_string()).collect::<Vec<_>>(),
                    "accepted": response.is_positive(),
                    "smtp": format!("{} {}", response.code(), response.message().collect::<Vec<_>>().join(" ")),
                })),
                Err(e) if e.is_permanent() => Err(ToolError::permanent(format!(
                    "the SMTP server refused the mail: {e}"
                ))),
                Err(e) => Err(ToolError::retryable(format!("SMTP: {e}"))),
            }
        })
    }
}

impl EmailSend {
    fn transport(
        &self,
        config: &SmtpConfig,
        timeout: Duration,
    ) -> Result<AsyncSmtpTransport<Tokio1Executor>, ToolError> {
        let tls = || {
            let mut params = TlsParameters::builder(config.host.clone());
            if let Some(pem) = &config.ca_pem {
                let ca = Certificate::from_pem(pem)
                    .map_err(|e| ToolError::permanent(format!("smtp_ca_file: {e}")))?;
                params = params.add_root_certificate(ca);
            }
            params
                .build()
                .map_err(|e| ToolError::permanent(format!("SMTP TLS for `{}`: {e}", config.host)))
        };
        let builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host);
        let builder = match config.tls {
            // Required, not opportunistic: a server that cannot upgrade gets nothing.
            SmtpTls::StartTls => builder.tls(Tls::Required(tls()?)),
            SmtpTls::Tls => builder.tls(Tls::Wrapper(tls()?)),
            SmtpTls::None => builder.tls(Tls::None),
        };
        let mut builder = builder
            .port(config.port)
            .timeout(Some(timeout.min(config.timeout)));
        if !config.user.is_empty() {
            // Read at every send: a rotated password applies at once.
            let password = self
                .secrets
                .as_ref()
                .ok_or_else(|| ToolError::permanent("this node has no secrets store"))?
                .open_value(&config.password_secret)
                .map_err(|e| ToolError::permanent(format!("SMTP password: {e}")))?;
            builder = builder.credentials(Credentials::new(config.user.clone(), password));
        }
        Ok(builder.build())
    }
}

/// `<task.step@domain>` from the key `<task_id>.<step_id>`: the same for every attempt.
pub fn message_id(key: &str, domain: &str) -> String {
    let local: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("<{local}@{domain}>")
}

fn mailboxes(v: Option<&Value>, key: &str) -> Result<Mailboxes, ToolError> {
    let bad = |e: String| ToolError::permanent(format!("param `{key}`: {e}"));
    let list: Vec<&str> = match v {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().ok_or_else(|| bad("must be addresses".into())))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("must be an address or a list of them".into())),
    };
    if list.is_empty() {
        return Err(bad("names no recipient".into()));
    }
    let mut out = Mailboxes::new();
    for s in list {
        out.push(
            s.parse::<Mailbox>()
                .map_err(|e| bad(format!("`{s}`: {e}")))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_ids_come_from_the_key() {
        assert_eq!(
            super::message_id("01JDQ6Z8K3V9.welcome", "acme.test"),
            "<01JDQ6Z8K3V9.welcome@acme.test>"
        );
    }
}
