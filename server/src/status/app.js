// The status page: polls status.json once a second and redraws the tables in place (no
// reload). Everything is written with textContent, never as HTML, so nothing an agent put in
// a message type or a reason can run here; the page's CSP allows only this script.
"use strict";

const REFRESH_MS = 1000;
const token = new URLSearchParams(window.location.search).get("token");

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(1)} s`;
}

function fill(tableId, rows, render) {
  const body = document.querySelector(`#${tableId} tbody`);
  const fresh = document.createElement("tbody");
  for (const item of rows) render(fresh.insertRow(), item);
  body.replaceWith(fresh);
}

function draw(status) {
  document.getElementById("broker-id").textContent = status.broker_id;
  const readiness = document.getElementById("readiness");
  readiness.textContent = status.ready ? "ready" : `not ready: ${status.not_ready}`;
  readiness.className = status.ready ? "badge ready" : "badge not-ready";
  document.getElementById("store").textContent = status.store;
  document.getElementById("authz-revision").textContent = status.authz_revision;
  document.getElementById("updated").textContent = new Date(status.generated_at * 1000).toLocaleTimeString();
  fill("agents", status.agents, (row, agent) => {
    row.dataset.agent = agent.agent_id;
    cell(row, agent.agent_id);
    const sessions = cell(row, agent.sessions.length ? agent.sessions.map((s) => s.instance_id).join(", ") : "none",
      "sessions");
    sessions.title = agent.sessions
      .map((s) => `${s.instance_id} connected ${new Date(s.connected_at * 1000).toLocaleString()}`)
      .join("\n");
    cell(row, agent.in_flight_here, "number in-flight");
    cell(row, agent.queue_depth, "number queued");
    cell(row, seconds(agent.oldest_age_s), "number");
    cell(row, agent.circuit, `circuit circuit-${agent.circuit}`);
    cell(row, `${Math.round(agent.rate_pressure * 100)} %`, agent.rate_pressure >= 0.9 ? "number pressed" : "number");
    cell(row, agent.audit_records, "number");
    cell(row, agent.dead_letters, "number dead-letters");
  });
  const verified = status.last_verification;
  if (verified) {
    const when = new Date(verified.at * 1000).toLocaleTimeString();
    const verdict = document.getElementById("verification");
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    verdict.textContent = `${verified.intact ? "intact" : "BROKEN"} — ${plural(verified.chains, "chain")}, ` +
      `${plural(verified.records, "record")}, verified ${when}`;
    verdict.className = verified.intact ? "intact" : "broken";
  }
  fill("dead-letters", status.newest_dead_letters, (row, letter) => {
    row.dataset.messageId = letter.message_id;
    cell(row, letter.agent_id);
    cell(row, letter.id);
    cell(row, letter.reason, "reason");
    cell(row, letter.attempts, "number");
    cell(row, seconds(letter.age_ms / 1000), "number");
    cell(row, letter.message_type);
    cell(row, letter.sender_id);
    cell(row, letter.message_id);
  });
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch("status.json", { headers, cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    draw(await response.json());
    error.hidden = true;
  } catch (err) {
    error.textContent = `cannot read the broker's status: ${err.message}`;
    error.hidden = false;
  } finally {
    window.setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
