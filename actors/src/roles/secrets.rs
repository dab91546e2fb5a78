//! Secrets: this node's `cadre.node.<id>.secrets.set|rotate|list|delete`. Secrets are
//! per node (sealed with its key), so only the node named in the subject answers. A
//! value arrives once and is never sent back; what is logged is the name and who.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::protocol::{ErrorCode, ErrorReply, SecretListReply, SecretPut, SecretRef, subject};
use crate::roles::intake::parse_json;
use crate::secrets::SecretError;

#[derive(Clone, Copy)]
pub struct Secrets;

pub struct SecretsArgs {
    pub ctx: Arc<NodeContext>,
}

pub struct SecretsState {
    ctx: Arc<NodeContext>,
    pumps: Vec<JoinHandle<()>>,
}

pub enum SecretsMsg {
    Request(Inbound),
}

const OPS: [&str; 4] = ["set", "rotate", "list", "delete"];

impl Actor for Secrets {
    type Msg = SecretsMsg;
    type State = SecretsState;
    type Arguments = SecretsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SecretsMsg>,
        args: SecretsArgs,
    ) -> Result<SecretsState, ActorProcessingErr> {
        let ctx = args.ctx;
        let mut pumps = Vec::new();
        for op in OPS {
            let sub = ctx
                .nats
                .subscribe(subject::secrets(&ctx.settings.node_id, op))
                .await?;
            pumps.push(bus::spawn_pump(
                sub,
                myself.clone(),
                ctx.settings.mailbox_depth_max,
                SecretsMsg::Request,
            ));
        }
        Ok(SecretsState { ctx, pumps })
    }

    async fn handle(
        &self,
        _: ActorRef<SecretsMsg>,
        msg: SecretsMsg,
        state: &mut SecretsState,
    ) -> Result<(), ActorProcessingErr> {
        let SecretsMsg::Request(Inbound { msg, permit }) = msg;
        let subject = msg.subject.to_string();
        let op = subject.rsplit('.').next().unwrap_or_default().to_string();
        let result = state.answer(&op, &msg.payload).await;
        state.ctx.respond(&subject, msg.reply, result).await;
        drop(permit);
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<SecretsMsg>,
        state: &mut SecretsState,
    ) -> Result<(), ActorProcessingErr> {
        for pump in &state.pumps {
            pump.abort();
        }
        Ok(())
    }
}

impl SecretsState {
    async fn answer(&self, op: &str, payload: &[u8]) -> Result<Value, ErrorReply> {
        let Some(store) = self.ctx.secrets() else {
            return Err(ErrorReply::new(
                ErrorCode::Unavailable,
                "this node's secrets store is not open",
            ));
        };
        let max = self.ctx.settings.payload_bytes_max;
        let now = self.ctx.now_ms();
        let info = match op {
            "set" | "rotate" => {
                let req: SecretPut = parse_json(payload, max)?;
                let info = store
                    .put(&req.name, &req.value, op == "rotate", now)
                    .await
                    .map_err(error)?;
                tracing::info!(
                    name = %req.name,
                    version = info.version,
                    by = req.by.as_deref().unwrap_or("operator"),
                    "secret {op}"
                );
                info
            }
            "delete" => {
                let req: SecretRef = parse_json(payload, max)?;
                let info = store.delete(&req.name).await.map_err(error)?;
                tracing::info!(name = %req.name, "secret deleted");
                info
            }
            _ => {
                let reply = SecretListReply {
                    node_id: self.ctx.settings.node_id.clone(),
                    secrets: store.list().map_err(error)?,
                };
                return serde_json::to_value(reply)
                    .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()));
            }
        };
        serde_json::to_value(info).map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))
    }
}

fn error(e: SecretError) -> ErrorReply {
    let code = match &e {
        SecretError::BadName(_) | SecretError::BadValue => ErrorCode::InvalidRequest,
        SecretError::NotFound(_) => ErrorCode::NotFound,
        SecretError::Exists(_) => ErrorCode::Conflict,
        SecretError::Unsealable(_) | SecretError::Key { .. } | SecretError::Store(_) => {
            ErrorCode::Internal
        }
    };
    ErrorReply::new(code, e.to_string())
}
