// The cortex console: reads /ui/api/state every few seconds and draws it; admin keys get
// load / unload, pin / unpin and sleep / wake buttons (unload and sleep ask first). Plain DOM,
// no build step; data is set as text, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const KEY_STORE = "cortex-console-key";
let previous = null; // the last state, for requests per second
let timer = null;

const $ = (id) => document.getElementById(id);

function headers() {
  const key = sessionStorage.getItem(KEY_STORE);
  const found = { "content-type": "application/json" };
  if (key) found.authorization = "Bearer " + key;
  return found;
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method, headers: headers(), body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && (data.error.message || data.error)) || response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return data;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  if (text instanceof Node) td.appendChild(text); else td.textContent = text ?? "";
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function badge(text, state) {
  const span = document.createElement("span");
  span.className = "state " + state;
  span.textContent = text;
  return span;
}

function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function ago(seconds) {
  if (!seconds) return "never";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function fixed(value, digits, unit) {
  return value == null ? "–" : value.toFixed(digits) + (unit || "");
}

function rows(tableId, items, draw) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  for (const item of items) {
    const row = document.createElement("tr");
    draw(row, item);
    body.appendChild(row);
  }
}

function memoryBar(used, total) {
  const wrap = document.createElement("span");
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = (total ? Math.min(100, (100 * used) / total) : 0) + "%";
  bar.appendChild(fill);
  wrap.appendChild(bar);
  wrap.appendChild(document.createTextNode(bytes(used)));
  return wrap;
}

function actionButton(action, label, danger, onClick) {
  const button = document.createElement("button");
  button.textContent = label;
  button.dataset.action = action;
  if (danger) button.className = "danger";
  button.addEventListener("click", onClick);
  return button;
}

// The buttons an admin gets on a model's row: what its tier and pin allow now.
function modelActions(model) {
  const post = (action, body, destructive, description) =>
    act(description, "/ui/api/models/" + action, body, destructive);
  const buttons = [];
  if (!model.placements.length) {
    buttons.push(actionButton("load", "Load", false, () =>
      post("load", { model: model.name }, false, "Load " + model.name)));
  }
  for (const { node, state } of model.placements) {
    const body = { model: model.name, node };
    if (model.can_sleep && state === "READY") {
      buttons.push(actionButton("sleep", "Sleep on " + node, true, () =>
        post("sleep", body, true, `Put ${model.name} to sleep on ${node}`)));
    }
    if (state === "ASLEEP") {
      buttons.push(actionButton("wake", "Wake on " + node, false, () =>
        post("wake", body, false, `Wake ${model.name} on ${node}`)));
    }
    const unload = actionButton("unload", "Unload from " + node, true, () =>
      post("unload", body, true, `Unload ${model.name} from ${node}`));
    if (model.pinned) {
      unload.disabled = true;
      unload.title = "pinned: unpin it first";
    }
    buttons.push(unload);
  }
  const pin = model.pinned ? "unpin" : "pin";
  buttons.push(actionButton(pin, model.pinned ? "Unpin" : "Pin", false, () =>
    post(pin, { model: model.name }, false, (model.pinned ? "Unpin " : "Pin ") + model.name)));
  return buttons;
}

async function act(description, path, body, destructive) {
  if (destructive && !window.confirm(description + "?")) return;
  notice(description + "…");
  try {
    await call("POST", path, body);
    notice(description + ": done");
  } catch (error) {
    notice(description + " failed: " + error.message, true);
  }
  refresh();
}

function notice(text, bad) {
  const element = $("notice");
  element.hidden = !text;
  element.textContent = text || "";
  element.classList.toggle("error", Boolean(bad));
}

function draw(state) {
  $("who").textContent =
    "key: " + state.you.name + (state.you.admin ? " (admin)" : " (read-only)");
  rows("nodes", state.nodes.flatMap((node) =>
    (node.gpus.length ? node.gpus : [null]).map((gpu) => ({ node, gpu }))), (row, { node, gpu }) => {
    row.dataset.node = node.name;
    cell(row, node.name);
    cell(row, badge(node.up ? "up" : "down", node.up ? "up" : "down"));
    cell(row, gpu ? `${gpu.index}: ${gpu.name}${gpu.virtual ? " (budget)" : ""}` : "–");
    cell(row, gpu ? memoryBar(gpu.memory_used_bytes, gpu.memory_total_bytes) : "");
    cell(row, gpu ? bytes(gpu.memory_free_bytes) : "", "num");
    cell(row, gpu ? bytes(gpu.memory_total_bytes) : "", "num");
  });
  const elapsed = previous ? (state.at - previous.at) : 0;
  const before = new Map((previous ? previous.models : []).map((m) => [m.name, m.requests]));
  rows("models", state.models, (row, model) => {
    row.dataset.model = model.name;
    cell(row, model.name);
    cell(row, model.engine + (model.can_sleep ? "" : " (no sleep)"));
    const where = document.createElement("span");
    for (const placement of model.placements) {
      // A copy's tier (loaded, asleep), or its state while it is between tiers.
      const tier = placement.tier || placement.state;
      where.appendChild(badge(placement.node + " " + tier, tier));
      where.appendChild(document.createTextNode(" "));
    }
    if (!model.placements.length) where.textContent = "not loaded";
    cell(row, where, "where");
    cell(row, model.pinned ? badge("pinned", "pinned") : "–", "pin");
    cell(row, model.in_flight, "num");
    const rate = elapsed > 0 && before.has(model.name)
      ? (model.requests - before.get(model.name)) / elapsed : null;
    cell(row, fixed(rate, 2), "num");
    cell(row, model.mean_ttft_s == null ? "–" : fixed(model.mean_ttft_s * 1000, 0, " ms"), "num");
    cell(row, fixed(model.mean_tokens_per_s, 1), "num");
    cell(row, model.requests, "num");
    cell(row, ago(model.last_used));
    const actions = document.createElement("span");
    if (state.you.admin) actions.replaceChildren(...modelActions(model));
    cell(row, actions, "actions");
  });
  rows("keys", Object.entries(state.keys), (row, [name, usage]) => {
    row.dataset.key = name;
    cell(row, name);
    for (const field of ["requests", "refused", "rate_limited", "in_flight", "input_tokens",
      "cached_input_tokens", "output_tokens"]) cell(row, usage[field], "num");
    const limits = usage.limits;
    cell(row, limits ? [
      limits.rpm ? `${limits.requests_last_minute}/${limits.rpm} rpm` : "",
      limits.tpm ? `${limits.tokens_last_minute}/${limits.tpm} tpm` : "",
      limits.max_concurrent ? `≤${limits.max_concurrent} at once` : "",
    ].filter(Boolean).join(", ") : "none");
    cell(row, ago(usage.last_used));
  });
  $("errors-section").hidden = !state.you.admin;
  rows("errors", state.errors.slice().reverse(), (row, entry) => {
    cell(row, new Date(entry.time * 1000).toLocaleTimeString());
    cell(row, entry.level);
    cell(row, entry.model || "");
    cell(row, entry.message);
  });
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    const state = await call("GET", "/ui/api/state");
    state.at = Date.now() / 1000;
    $("sign-in").hidden = true;
    $("console").hidden = false;
    $("sign-out").hidden = !sessionStorage.getItem(KEY_STORE);
    draw(state);
    previous = state;
  } catch (error) {
    if (error.status === 401) {
      signIn(sessionStorage.getItem(KEY_STORE) ? "That key is not accepted." : "");
      return;
    }
    $("updated").textContent = "update failed: " + error.message;
  }
  clearTimeout(timer);
  timer = setTimeout(refresh, REFRESH_MS);
}

function signIn(message) {
  clearTimeout(timer);
  $("console").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("key").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key").value.trim());
    $("key").value = "";
    previous = null;
    refresh();
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    signIn("");
  });
  refresh();
});
