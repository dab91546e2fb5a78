//! LeaseKeeper: keeps this node's task leases alive and takes over the tasks of nodes
//! that stopped keeping theirs (see `crate::ownership`). On a node outside a cluster it
//! starts and does nothing.
//!
//! Every `ttl / 3` it renews every lease held: one lost to another node stops that
//! task's actor (which claims again, and stays down if the new owner is live), one
//! renewed after a lapse releases the dispatches held back meanwhile. It watches the
//! `CADRE_LEASES` bucket: the server marks a lease whose TTL ran out, and the first node
//! to claim the task over that marker takes it over from its replicated checkpoint.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::context::NodeContext;
use crate::ownership::Renewal;
use crate::roles::task::TaskMsg;
use crate::roles::task_supervisor::TaskSupervisorMsg;
use crate::roles::{TASKS, lookup};

#[derive(Clone, Copy)]
pub struct LeaseKeeper;

pub struct LeaseKeeperArgs {
    pub ctx: Arc<NodeContext>,
}

pub struct LeaseKeeperState {
    ctx: Arc<NodeContext>,
    tasks: Vec<JoinHandle<()>>,
}

pub enum LeaseKeeperMsg {
    Renew,
    /// The server expired this task's lease.
    Expired(String),
}

impl Actor for LeaseKeeper {
    type Msg = LeaseKeeperMsg;
    type State = LeaseKeeperState;
    type Arguments = LeaseKeeperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LeaseKeeperMsg>,
        args: LeaseKeeperArgs,
    ) -> Result<LeaseKeeperState, ActorProcessingErr> {
        let ctx = args.ctx;
        let mut tasks = Vec::new();
        if let Some(own) = ctx.ownership() {
            let me = myself.clone();
            let every = own.ttl / 3;
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if me.cast(LeaseKeeperMsg::Renew).is_err() {
                        return;
                    }
                }
            }));
            tasks.push(tokio::spawn(watch_expiries(own.leases().clone(), myself)));
        }
        Ok(LeaseKeeperState { ctx, tasks })
    }

    async fn handle(
        &self,
        _: ActorRef<LeaseKeeperMsg>,
        msg: LeaseKeeperMsg,
        state: &mut LeaseKeeperState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(own) = state.ctx.ownership() else {
            return Ok(());
        };
        let node = &state.ctx.settings.node_id;
        let supervisor = lookup::<TaskSupervisorMsg>(TASKS, node);
        match msg {
            LeaseKeeperMsg::Renew => {
                for (task_id, renewal) in own.renew_all().await {
                    match renewal {
                        Renewal::Renewed => {
                            if let Some(task) = own.take_waiting(&task_id) {
                                let _ = task.cast(TaskMsg::Released);
                            }
                        }
                        Renewal::Lost => {
                            tracing::warn!(task_id, "task lease lost to another node");
                            if let Some(s) = &supervisor {
                                let _ = s.cast(TaskSupervisorMsg::LeaseLost(task_id));
                            }
                        }
                        Renewal::Unreachable => {}
                    }
                }
                state.ctx.metrics.leases_held.set(own.held_count() as i64);
            }
            LeaseKeeperMsg::Expired(task_id) => {
                // Our own lapsed lease shows up at the next renewal, as lost.
                if !own.holds(&task_id)
                    && let Some(s) = &supervisor
                {
                    let _ = s.cast(TaskSupervisorMsg::TakeOver(task_id));
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<LeaseKeeperMsg>,
        state: &mut LeaseKeeperState,
    ) -> Result<(), ActorProcessingErr> {
        for task in &state.tasks {
            task.abort();
        }
        Ok(())
    }
}

/// Follows the lease bucket for as long as the actor lives, re-subscribing after NATS
/// comes back: every expiry marker (the latest entry of its key, so a lease already
/// taken over is not one) is reported.
async fn watch_expiries(leases: kv::Store, keeper: ActorRef<LeaseKeeperMsg>) {
    loop {
        match leases.watch_all().await {
            Ok(mut watch) => {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(e) if e.operation == kv::Operation::Purge => {
                            if keeper.cast(LeaseKeeperMsg::Expired(e.key)).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "lease watch interrupted");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch leases"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
