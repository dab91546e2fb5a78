// The Cadre operator console. Plain JavaScript, no build step, no dependency: every
// action is a POST to /console/api/*, which the node turns into the same NATS request
// the CLI sends. All text from the server is set with textContent, never as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = {
  csrf: "",
  by: "",
  approvals: [],
  // Approvals decided from this page, kept to show their task's fate live.
  decided: new Map(),
  tasks: [],
  next: null,
  detail: null,
  killswitch: null,
  source: null,
};

// ---------------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, body) {
  const init = { headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-Cadre-Csrf"] = state.csrf;
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch("/console/api/" + path, init);
  } catch (e) {
    throw new ApiError(0, "unreachable", "the node does not answer");
  }
  let data = null;
  try {
    data = await res.json();
  } catch (e) {
    data = null;
  }
  if (!res.ok) {
    const err = (data && data.error) || {};
    if (res.status === 401 && path !== "login") showLogin();
    throw new ApiError(res.status, err.code || "http_" + res.status, err.message || res.statusText);
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return node;
}

function showError(e) {
  const msg = e instanceof ApiError ? `${e.message} (${e.code})` : String(e);
  $("#error").textContent = msg;
}

function clearError() {
  $("#error").textContent = "";
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.round((Date.now() - ms) / 1000);
  const fmt = (n) =>
    n < 60 ? `${n} s` : n < 3600 ? `${Math.round(n / 60)} min` : n < 86400 ? `${Math.round(n / 3600)} h` : `${Math.round(n / 86400)} d`;
  return s >= 0 ? `${fmt(s)} ago` : `in ${fmt(-s)}`;
}

function clock(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

function usd(x) {
  return "$" + Number(x || 0).toFixed(4);
}

const debounced = new Map();
function soon(key, fn, wait = 150) {
  clearTimeout(debounced.get(key));
  debounced.set(key, setTimeout(() => {
    debounced.delete(key);
    fn().catch(showError);
  }, wait));
}

function confirmDialog(text, yes) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-yes").textContent = yes;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
    dialog.showModal();
  });
}

// ---------------------------------------------------------------------------------
// Login
// ---------------------------------------------------------------------------------

function showLogin() {
  if (state.source) {
    state.source.close();
    state.source = null;
  }
  $("#app").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  setLive(false);
  $("#password").focus();
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("#login-error").textContent = "";
  try {
    const session = await api("login", { password: $("#password").value });
    $("#password").value = "";
    enter(session);
  } catch (e) {
    $("#login-error").textContent = e.message;
  }
});

$("#logout").addEventListener("click", async () => {
  try {
    await api("logout", {});
  } catch (e) {
    // Logged out either way.
  }
  showLogin();
});

function enter(session) {
  state.csrf = session.csrf;
  state.by = session.by;
  $("#node").textContent = `node ${session.node_id} · ${session.by}`;
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#logout").hidden = false;
  follow();
  refreshAll();
}

// ---------------------------------------------------------------------------------
// Live updates
// ---------------------------------------------------------------------------------

function setLive(on) {
  const pill = $("#live");
  pill.textContent = on ? "live" : "offline";
  pill.className = "pill " + (on ? "on" : "off");
}

function follow() {
  if (state.source) state.source.close();
  const source = new EventSource("/console/api/events");
  state.source = source;
  source.addEventListener("hello", () => {
    setLive(true);
    refreshAll();
  });
  source.addEventListener("task", (m) => onTaskEvent(JSON.parse(m.data)));
  source.addEventListener("approval", () => soon("approvals", loadApprovals));
  source.addEventListener("killswitch", () => {
    soon("killswitch", loadKillSwitch);
    soon("nodes", loadNodes, 500);
  });
  source.addEventListener("resync", () => refreshAll());
  source.onerror = () => {
    setLive(false);
    // Closed for good (e.g. the session ended): find out whether to log in again.
    api("session").then(() => {}, () => {});
  };
}

const TERMINAL = ["succeeded", "failed", "cancelled"];

// Replies and events cross on the wire: a status only moves forward in time, and a
// terminal one stays.
function newer(current, status, atMs) {
  if (!current.status) return true;
  if (TERMINAL.includes(current.status) && !TERMINAL.includes(status)) return false;
  return (atMs || 0) >= (current.at_ms || 0);
}

function applyStatus(target, status, atMs) {
  if (!newer(target, status, atMs)) return false;
  target.status = status;
  target.at_ms = atMs;
  return true;
}

function onTaskEvent(ev) {
  const row = state.tasks.find((t) => t.task_id === ev.task_id);
  if (row) {
    if (applyStatus(row, ev.status, ev.at_ms)) row.updated_at_ms = ev.at_ms;
    renderTasks();
  } else {
    soon("tasks", loadTasks, 300);
  }
  for (const d of state.decided.values()) {
    if (d.task_id === ev.task_id) applyStatus(d, ev.status, ev.at_ms);
  }
  renderDecided();
  if (state.detail === ev.task_id) soon("detail", loadDetail, 200);
  if (ev.kind.includes("approval")) soon("approvals", loadApprovals);
}

function refreshAll() {
  clearError();
  for (const [key, fn] of [
    ["approvals", loadApprovals],
    ["tasks", loadTasks],
    ["killswitch", loadKillSwitch],
    ["nodes", loadNodes],
    ["budgets", loadBudgets],
  ]) {
    soon(key, fn, 0);
  }
  if (state.detail) soon("detail", loadDetail, 0);
}

// Heartbeats and spend are not events: read them again now and then.
setInterval(() => {
  if (!$("#app").hidden) {
    soon("nodes", loadNodes, 0);
    soon("budgets", loadBudgets, 0);
  }
}, 15000);

// ---------------------------------------------------------------------------------
// Tabs
// ---------------------------------------------------------------------------------

for (const tab of document.querySelectorAll(".tabs button")) {
  tab.addEventListener("click", () => showTab(tab.dataset.tab));
}

function showTab(name) {
  for (const tab of document.querySelectorAll(".tabs button")) {
    tab.classList.toggle("active", tab.dataset.tab === name);
  }
  for (const name2 of ["inbox", "tasks", "control"]) {
    $("#tab-" + name2).hidden = name2 !== name;
  }
}

// ---------------------------------------------------------------------------------
// Approvals inbox
// ---------------------------------------------------------------------------------

async function loadApprovals() {
  const reply = await api("approvals?state=pending");
  state.approvals = reply.approvals || [];
  renderApprovals(reply.unanswered || []);
}

function renderApprovals(unanswered) {
  const box = $("#approvals");
  box.replaceChildren(...state.approvals.map(approvalCard));
  $("#approvals-empty").hidden = state.approvals.length > 0;
  $("#inbox-count").textContent = String(state.approvals.length);
  if (unanswered.length) {
    box.append(el("p", { class: "muted", text: `no answer from ${unanswered.join(", ")}: their approvals are missing` }));
  }
  renderDecided();
}

function approvalCard(a) {
  const note = el("textarea", { class: "note", rows: "2", placeholder: "note (optional, recorded)", "aria-label": "note" });
  const result = el("p", { class: "result", role: "status" });
  const decide = (decision) => async () => {
    for (const b of card.querySelectorAll("button")) b.disabled = true;
    try {
      const reply = await api("approvals/decide", { approval_id: a.approval_id, decision, note: note.value });
      if (reply.state === "void") {
        result.textContent = "void: the action changed since it was requested; it asks again";
      } else {
        const d = {
          approval_id: a.approval_id,
          task_id: reply.task_id,
          label: `${a.playbook}/${a.step_id} (${a.tool})`,
          decision: reply.state,
          status: reply.task_status,
          at_ms: 0,
        };
        state.decided.set(a.approval_id, d);
        // Events of the task may have come before this reply: read where it is now.
        api("task?id=" + encodeURIComponent(reply.task_id)).then((t) => {
          applyStatus(d, t.status, t.updated_at_ms);
          renderDecided();
        }, () => {});
      }
      await loadApprovals();
    } catch (e) {
      result.textContent = e.message;
      for (const b of card.querySelectorAll("button")) b.disabled = false;
    }
  };
  const buttons =
    a.kind === "outcome_unknown"
      ? [
          el("button", { class: "retry", onclick: decide("retry"), text: "Run again" }),
          el("button", { class: "mark-done", onclick: decide("mark_done"), text: "It happened" }),
          el("button", { class: "abort danger", onclick: decide("abort"), text: "Abort task" }),
        ]
      : [
          el("button", { class: "approve primary", onclick: decide("approve"), text: "Approve" }),
          el("button", { class: "deny danger", onclick: decide("deny"), text: "Deny" }),
        ];
  const card = el(
    "article",
    { class: "card approval", "data-approval-id": a.approval_id, "data-task-id": a.task_id },
    el("h3", {}, el("span", { class: "tool", text: a.tool }), " · ", `${a.playbook} / ${a.step_id}`),
    el("p", { class: "reason", text: a.reason }),
    el(
      "dl",
      { class: "facts" },
      el("dt", { text: "task" }), el("dd", { class: "mono", text: `${a.task_id} (attempt ${a.attempt})` }),
      el("dt", { text: "cost" }), el("dd", { text: usd(a.cost_usd) }),
      el("dt", { text: "expires" }), el("dd", { text: `${ago(a.expires_at_ms)} (${clock(a.expires_at_ms)})` }),
      el("dt", { text: "policy" }), el("dd", { class: "mono", text: a.policy_version }),
      el("dt", { text: "node" }), el("dd", { text: a.node_id }),
      el("dt", { text: "params hash" }), el("dd", { class: "mono", text: a.args_hash.slice(0, 16) }),
    ),
    el("pre", { class: "params", text: JSON.stringify(a.params, null, 2) }),
    note,
    el("div", { class: "actions" }, ...buttons),
    result,
  );
  return card;
}

function renderDecided() {
  let box = $("#decided");
  if (!box) {
    box = el("div", { id: "decided" });
    $("#tab-inbox").append(box);
  }
  const items = [...state.decided.values()].reverse().slice(0, 10);
  box.replaceChildren(
    ...(items.length ? [el("h2", { text: "Decided here" })] : []),
    ...items.map((d) =>
      el(
        "div",
        { class: "decided", "data-decided-approval": d.approval_id, "data-task-id": d.task_id },
        el("span", { class: "decision", text: d.decision }),
        " ",
        d.label,
        " — task ",
        el("button", { class: "link mono", onclick: () => openTask(d.task_id), text: d.task_id }),
        " ",
        el("span", { class: `task-status status s-${d.status}`, text: d.status }),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------

function filters() {
  const q = new URLSearchParams();
  const status = $("#filter-status").value;
  const playbook = $("#filter-playbook").value.trim();
  if (status) q.set("status", status);
  if (playbook) q.set("playbook", playbook);
  q.set("limit", "50");
  return q;
}

async function loadTasks() {
  const reply = await api("tasks?" + filters().toString());
  const known = new Map(state.tasks.map((t) => [t.task_id, t]));
  state.tasks = (reply.tasks || []).map((t) => {
    t.at_ms = t.updated_at_ms;
    const seen = known.get(t.task_id);
    // An event newer than this reply already moved the row on: keep it.
    if (seen && !newer(seen, t.status, t.updated_at_ms)) return seen;
    return t;
  });
  state.next = reply.next || null;
  renderTasks();
}

$("#filter-status").addEventListener("change", () => soon("tasks", loadTasks, 0));
$("#filter-playbook").addEventListener("input", () => soon("tasks", loadTasks, 300));
$("#more").addEventListener("click", async () => {
  const q = filters();
  q.set("before", state.next);
  try {
    const reply = await api("tasks?" + q.toString());
    state.tasks = state.tasks.concat(reply.tasks || []);
    state.next = reply.next || null;
    renderTasks();
  } catch (e) {
    showError(e);
  }
});

function renderTasks() {
  const status = $("#filter-status").value;
  const shown = state.tasks.filter((t) => !status || t.status === status);
  $("#tasks").replaceChildren(
    ...shown.map((t) =>
      el(
        "li",
        { class: "task", "data-task-id": t.task_id },
        el("button", { class: "link mono open", onclick: () => openTask(t.task_id), text: t.task_id }),
        el("span", { class: "playbook", text: t.playbook }),
        el("span", { class: `status s-${t.status}`, text: t.status }),
        el("span", { class: "muted when", text: ago(t.updated_at_ms) }),
        t.failure ? el("span", { class: "error failure", text: t.failure }) : null,
      ),
    ),
  );
  if (!shown.length) $("#tasks").append(el("li", { class: "muted", text: "no tasks" }));
  $("#more").hidden = !state.next;
}

function openTask(id) {
  state.detail = id;
  showTab("tasks");
  $("#task-detail").hidden = false;
  soon("detail", loadDetail, 0);
}

$("#detail-close").addEventListener("click", () => {
  state.detail = null;
  $("#task-detail").hidden = true;
});

async function loadDetail() {
  const id = state.detail;
  if (!id) return;
  const [task, trace] = await Promise.all([
    api("task?id=" + encodeURIComponent(id)),
    api("trace?id=" + encodeURIComponent(id)).catch(() => ({ entries: [] })),
  ]);
  if (state.detail !== id) return;
  renderDetail(task, trace);
}

function renderDetail(t, trace) {
  const box = $("#task-detail");
  box.dataset.taskId = t.task_id;
  $("#detail-title").textContent = `${t.playbook} · ${t.task_id}`;
  const status = $("#detail-status");
  status.textContent = t.status;
  status.className = `status s-${t.status}`;
  $("#detail-meta").textContent = `on ${t.node_id} · ${usd(t.cost_usd)} · created ${clock(t.created_at_ms)}`;
  const attention = $("#detail-attention");
  attention.hidden = !t.attention;
  attention.textContent = t.attention ? `waits for you at step ${t.attention.step_id}: ${t.attention.reason}` : "";
  const failure = $("#detail-failure");
  failure.hidden = !t.failure;
  failure.textContent = t.failure || "";
  $("#detail-steps").replaceChildren(...t.steps.map((s) => stepItem(t, s)));
  $("#detail-timeline").replaceChildren(
    ...(trace.entries || []).map((e) => {
      const r = e.record;
      return el(
        "li",
        {},
        el("time", { class: "muted", text: new Date(r.at_ms).toLocaleTimeString() }),
        " ",
        el("span", { class: "action", text: r.action }),
        r.step_id ? ` ${r.step_id}${r.attempt ? "#" + r.attempt : ""}` : "",
        " → ",
        el("span", { class: "outcome", text: r.outcome }),
        r.operator ? el("span", { class: "muted", text: ` by ${r.operator}` }) : null,
        r.detail ? el("div", { class: "muted detail", text: r.detail }) : null,
      );
    }),
  );
  const terminal = ["succeeded", "failed", "cancelled"].includes(t.status);
  $("#detail-cancel").hidden = terminal;
}

function stepItem(t, s) {
  const item = el(
    "li",
    { class: "step", "data-step-id": s.id },
    el("strong", { text: s.id }),
    ` ${s.tool} `,
    el("span", { class: `status s-${s.status}`, text: s.status }),
    el("span", { class: "muted", text: ` attempts ${s.attempts}` }),
    s.error ? el("div", { class: "error", text: s.error }) : null,
    s.verdict ? el("div", { class: "muted", text: `verdict: ${s.verdict.passed ? "passed" : "failed"}${s.verdict.reasons ? " — " + s.verdict.reasons.join("; ") : ""}` }) : null,
  );
  if (s.status === "outcome_unknown") {
    const resolve = (decision, words) => async () => {
      if (!(await confirmDialog(`Step ${s.id} of task ${t.task_id}: ${words}?`, words))) return;
      try {
        await api("tasks/resolve", { task_id: t.task_id, step_id: s.id, decision });
        soon("detail", loadDetail, 0);
      } catch (e) {
        showError(e);
      }
    };
    item.append(
      el("p", { class: "attention", text: "The outcome of this step is unknown: did it happen?" }),
      el(
        "div",
        { class: "actions" },
        el("button", { class: "resolve-retry", onclick: resolve("retry", "Run it again"), text: "Run again" }),
        el("button", { class: "resolve-done", onclick: resolve("mark_done", "Mark it done"), text: "It happened" }),
        el("button", { class: "resolve-abort danger", onclick: resolve("abort", "Abort the task"), text: "Abort" }),
      ),
    );
  }
  return item;
}

$("#detail-cancel").addEventListener("click", async () => {
  const id = state.detail;
  if (!id || !(await confirmDialog(`Cancel task ${id}? Done steps are undone where they can be.`, "Cancel task"))) return;
  try {
    await api("tasks/cancel", { task_id: id });
    soon("detail", loadDetail, 0);
  } catch (e) {
    showError(e);
  }
});

// ---------------------------------------------------------------------------------
// Control: kill switch, budgets, nodes
// ---------------------------------------------------------------------------------

async function loadKillSwitch() {
  state.killswitch = await api("killswitch");
  renderKillSwitch();
}

function renderKillSwitch() {
  const ks = state.killswitch;
  if (!ks) return;
  const who = ks.by ? ` by ${ks.by}` : "";
  const why = ks.reason ? ` — ${ks.reason}` : "";
  const since = ks.at_ms ? ` (since ${clock(ks.at_ms)})` : "";
  const text = ks.engaged ? `ENGAGED${who}${why}${since}: no node dispatches any step.` : `Off: nodes dispatch.${since}`;
  $("#killswitch-state").textContent = text;
  $("#killswitch-state").className = ks.engaged ? "engaged" : "";
  const button = $("#killswitch-toggle");
  button.textContent = ks.engaged ? "Release kill switch" : "Engage kill switch";
  button.dataset.engaged = String(ks.engaged);
  const banner = $("#banner");
  banner.hidden = !ks.engaged;
  banner.textContent = ks.engaged ? `Kill switch engaged${who}${why}: nothing is dispatched.` : "";
}

$("#killswitch-toggle").addEventListener("click", async () => {
  const engaged = !(state.killswitch && state.killswitch.engaged);
  const text = engaged
    ? "Engage the kill switch? Every node stops dispatching steps at once, and running shell steps are stopped."
    : "Release the kill switch? Held steps are dispatched again.";
  if (!(await confirmDialog(text, engaged ? "Engage" : "Release"))) return;
  try {
    state.killswitch = await api("killswitch", { engaged, reason: $("#killswitch-reason").value });
    $("#killswitch-reason").value = "";
    renderKillSwitch();
    soon("nodes", loadNodes, 300);
  } catch (e) {
    showError(e);
  }
});

async function loadNodes() {
  const reply = await api("nodes");
  $("#nodes").replaceChildren(
    ...reply.nodes.map((n) =>
      el(
        "div",
        { class: "node", "data-node-id": n.node_id },
        el("span", { class: n.alive ? "dot ok" : "dot down", title: n.alive ? "alive" : "not heard from" }),
        el("strong", { text: n.node_id }),
        el("span", { class: "muted", text: ` v${n.version} · heartbeat ${ago(n.heartbeat_at_ms)}` }),
        el(
          "div",
          { class: "muted" },
          `${n.tasks_in_flight} tasks, ${n.steps_in_flight} steps in flight · ${n.approvals_pending} approvals pending`,
          n.killswitch_engaged ? ` · kill switch engaged, ${n.tasks_held || 0} tasks held` : "",
          Object.keys(n.tags || {}).length ? " · " + Object.entries(n.tags).map(([k, v]) => `${k}=${v}`).join(" ") : "",
        ),
      ),
    ),
  );
}

async function loadBudgets() {
  const reply = await api("budgets");
  $("#budgets").replaceChildren(
    ...reply.budgets.map((b) => {
      if (b.error) return el("p", { class: "error", text: `${b.node_id}: ${b.error}` });
      const cap = (x) => (x > 0 ? usd(x) : "no cap");
      const rows = (b.playbooks || []).map((p) =>
        el(
          "tr",
          {},
          el("td", { text: p.playbook }),
          el("td", { text: usd(p.spent_today_usd) }),
          el("td", { text: cap(p.day_cap_usd) }),
          el("td", { text: p.verified_tasks ? usd(p.cost_per_verified_task_usd) : "—" }),
        ),
      );
      const over = b.day_cap_usd > 0 && b.spent_today_usd >= b.day_cap_usd;
      return el(
        "div",
        { class: "budget", "data-node-id": b.node_id },
        el(
          "p",
          {},
          el("strong", { text: b.node_id }),
          ` spent ${b.day} (UTC): `,
          el("span", { class: over ? "error" : "", text: b.day_cap_usd > 0 ? `${usd(b.spent_today_usd)} of ${usd(b.day_cap_usd)}` : `${usd(b.spent_today_usd)} (no daily cap)` }),
          b.task_cap_usd > 0 ? ` · at most ${usd(b.task_cap_usd)} per task` : "",
        ),
        rows.length
          ? el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "playbook" }), el("th", { text: "today" }), el("th", { text: "cap" }), el("th", { text: "per verified task" }))), el("tbody", {}, ...rows))
          : null,
      );
    }),
  );
}

// ---------------------------------------------------------------------------------

api("session").then(enter, () => showLogin());
