// fleetserve web console: plain ES2020, no dependencies.
//
// Six panels share one page: a prompt that streams its answer, the timeline of the last request, the worker
// table with join / drain / stop, the deployments and node agents and the pipelines of stage nodes (when there are
// any), and small charts fed from /metrics. Every text from the server is inserted with textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const MODELS_POLL_MS = 10000;
const CHART_WINDOW_S = 300;
const SVG_NS = "http://www.w3.org/2000/svg";
const DEAD_STATES = new Set(["dead", "exited"]);
const EVENTS_SHOWN = 5;

const $ = (id) => document.getElementById(id);

/** Make an element with optional class name and text. */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// ---------------------------------------------------------------------------------------------------------------
// Stored settings (localStorage may be unavailable, e.g. in private modes: then they only last for the page).

function loadSetting(key) {
  try {
    return window.localStorage.getItem(key) || "";
  } catch (_) {
    return "";
  }
}

function saveSetting(key, value) {
  try {
    if (value) window.localStorage.setItem(key, value);
    else window.localStorage.removeItem(key);
  } catch (_) {
    /* not persisted; the input still holds it */
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Error box. Each source (send, nodes, metrics, ...) has at most one message; a later success of the same source
// clears its own message, and a successful send clears them all.

const errors = new Map();

function showError(source, message) {
  errors.set(source, String(message || "Unknown error"));
  renderErrors();
}

function clearError(source) {
  if (errors.delete(source)) renderErrors();
}

function clearAllErrors() {
  errors.clear();
  renderErrors();
}

function renderErrors() {
  const box = $("error");
  box.replaceChildren(...[...errors.values()].map((message) => el("div", "error-line", message)));
  box.hidden = errors.size === 0;
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP helpers.

/** Headers for a call to `path`: the admin key on /admin routes (else the API key; a gateway with API keys but no
 * admin key refuses /admin, and one with no key at all needs none), the API key elsewhere. */
function authHeaders(path) {
  const apiKey = $("api-key").value.trim();
  const adminKey = $("admin-key").value.trim();
  const key = path.startsWith("/admin") ? adminKey || apiKey : apiKey;
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The readable message of a failed response: the `error.message` of a JSON body, else its text or status. */
async function errorMessage(response, path) {
  let message = "";
  try {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      const err = body && body.error;
      message = (err && (err.message || (typeof err === "string" ? err : ""))) || (body && body.detail) || "";
      if (typeof message !== "string") message = JSON.stringify(message);
    } catch (_) {
      message = text.trim().slice(0, 500);
    }
  } catch (_) {
    /* body unreadable: the status is all we have */
  }
  const status = `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
  if (response.status === 401) {
    const which = path.startsWith("/admin") ? "the admin key" : "the API key";
    return `Not authorized (${status}): enter ${which} in the field at the top of the page. ${message}`.trim();
  }
  return message ? `${message} (${status})` : `${status} from ${path}`;
}

/** An Error whose message is ready to show. */
class CallError extends Error {}

/** fetch(path) with the right key; throws a CallError with a readable message on network or HTTP errors. */
async function call(path, options = {}) {
  const headers = { ...authHeaders(path), ...(options.headers || {}) };
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (exc) {
    throw new CallError(`Network error on ${path}: ${exc.message || exc} (is the gateway running?)`);
  }
  if (!response.ok) throw new CallError(await errorMessage(response, path));
  return response;
}

async function getJson(path) {
  const response = await call(path);
  return response.json();
}

async function postJson(path, body) {
  const options = { method: "POST", headers: { "Content-Type": "application/json" } };
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await call(path, options);
  const text = await response.text();
  return text ? JSON.parse(text) : {};
}

// ---------------------------------------------------------------------------------------------------------------
// Formatting.

function fmtMs(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "-";
  const ms = seconds * 1000;
  return ms >= 100 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`;
}

function fmtNumber(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "-";
  return Math.abs(value) >= 100 ? String(Math.round(value)) : value.toFixed(digits);
}

function fmtBytes(bytes) {
  if (!bytes) return "";
  const mib = bytes / (1024 * 1024);
  return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${Math.round(mib)} MiB`;
}

function fmtClock(date) {
  return date.toLocaleTimeString([], { hour12: false });
}

function fmtRange(start, end) {
  return `[${start}, ${end})`;
}

function fmtPercent(fraction) {
  if (fraction === null || fraction === undefined || !Number.isFinite(fraction)) return "-";
  return `${Math.round(fraction * 100)}%`;
}

// ---------------------------------------------------------------------------------------------------------------
// Models.

let knownModels = null; // null until the first answer, so that an empty list still gets its placeholder

async function refreshModels() {
  try {
    const body = await getJson("/v1/models");
    clearError("models");
    // The prompt box chats: models of kind "embed" (vectors, on /v1/embeddings) are left out of it.
    const chat = (body.data || []).filter((m) => (m.fleetserve || {}).kind !== "embed");
    setModels(chat.map((m) => m.id).filter(Boolean));
  } catch (exc) {
    showError("models", `Could not list the models: ${exc.message}`);
  }
}

/**
 * Fill the model select and the join form's suggestions. The current choice stays even when the gateway stops
 * listing it (its last worker left): a send then gets the gateway's own explanation instead of going nowhere.
 */
function setModels(ids) {
  const select = $("model");
  const current = select.value;
  if (knownModels === null || ids.join("\n") !== knownModels.join("\n")) {
    knownModels = ids;
    const choices = current && !ids.includes(current) ? [...ids, current] : ids;
    select.replaceChildren(...choices.map((id) => new Option(id, id)));
    if (choices.length === 0) select.append(new Option("(no models: join a worker)", ""));
    if (current) select.value = current;
    $("model-list").replaceChildren(...ids.map((id) => new Option(id, id)));
  }
  syncJoinModel();
}

// The join form's model follows the selected model until the user types their own.
let joinModelEdited = false;

function syncJoinModel() {
  const input = $("join-model");
  const selected = $("model").value;
  if (selected && (!joinModelEdited || !input.value.trim())) input.value = selected;
}

// ---------------------------------------------------------------------------------------------------------------
// Sending a prompt and streaming its answer.

let streaming = false;

function readRequestSettings() {
  const body = {
    // With no model listed yet, the join form's model is the best guess.
    model: $("model").value || $("join-model").value.trim(),
    messages: [{ role: "user", content: $("prompt").value }],
    max_tokens: parseInt($("max-tokens").value, 10) || 64,
    temperature: Number.parseFloat($("temperature").value) || 0,
    stream: true,
    stream_options: { include_usage: true },
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

function setStreaming(on) {
  streaming = on;
  $("send").disabled = on;
  $("send").textContent = on ? "Streaming…" : "Send";
  $("answer").classList.toggle("streaming", on);
}

async function send() {
  if (streaming) return;
  // The gateway judges the request (an empty prompt, an unknown model): its answer goes to the error box.
  const body = readRequestSettings();

  const answer = $("answer");
  answer.textContent = "";
  setRequestInfo("Sending…");
  resetTimeline("Waiting for the answer…");
  setStreaming(true);

  const started = performance.now();
  const result = { requestId: null, firstTokenMs: null, pieces: 0, usage: null, finish: null, failed: false };
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
    });
    result.requestId = response.headers.get("X-Request-Id");
    clearAllErrors();
    const sawDone = await readEventStream(response, (event) => handleStreamEvent(event, result, started));
    if (!sawDone && !result.failed) {
      result.failed = true;
      showError("send", "The answer stream ended before it was complete.");
    }
  } catch (exc) {
    result.failed = true;
    showError("send", exc instanceof CallError ? exc.message : `Streaming failed: ${exc.message || exc}`);
  } finally {
    setStreaming(false);
  }

  showRequestSummary(result, performance.now() - started);
  if (result.requestId) await loadTrace(result.requestId);
  else resetTimeline(result.failed ? "No trace: the request failed before it started." : "No request id came back.");
}

/** Handle one parsed `data:` payload of the stream. */
function handleStreamEvent(event, result, started) {
  if (event.error) {
    result.failed = true;
    const err = event.error;
    showError("send", `The stream failed: ${(err && err.message) || JSON.stringify(err)}`);
    return;
  }
  if (!result.requestId && event.id) result.requestId = event.id;
  const choice = (event.choices || [])[0];
  const piece = choice && choice.delta && choice.delta.content;
  if (piece) {
    if (result.firstTokenMs === null) result.firstTokenMs = performance.now() - started;
    result.pieces += 1;
    // A text node per piece: the answer visibly grows as each piece arrives.
    $("answer").append(document.createTextNode(piece));
    setRequestInfo(`${result.requestId || "request"} · ${result.pieces} pieces so far…`);
  }
  if (choice && choice.finish_reason) result.finish = choice.finish_reason;
  if (event.usage) result.usage = event.usage;
}

/**
 * Read a server-sent event stream, calling onEvent with each `data:` JSON payload as soon as its line is complete.
 * Returns true when the stream ended with `data: [DONE]`.
 */
async function readEventStream(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const handleLine = (rawLine) => {
    const line = rawLine.endsWith("\r") ? rawLine.slice(0, -1) : rawLine;
    if (!line.startsWith("data:")) return false; // blank separators, comments (": ping"), other fields
    const data = line.slice(5).trim();
    if (data === "[DONE]") return true;
    if (!data) return false;
    let event;
    try {
      event = JSON.parse(data);
    } catch (_) {
      showError("send", `Unreadable stream event: ${data.slice(0, 200)}`);
      return false;
    }
    onEvent(event);
    return false;
  };

  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + 1);
      if (handleLine(line)) {
        reader.cancel().catch(() => {});
        return true;
      }
    }
    if (done) return buffer ? handleLine(buffer) : false;
  }
}

function setRequestInfo(text) {
  $("request-info").textContent = text;
}

function showRequestSummary(result, totalMs) {
  const parts = [result.requestId ? `id ${result.requestId}` : "no request id"];
  if (result.usage) {
    const u = result.usage;
    parts.push(`${u.completion_tokens ?? "?"} tokens (prompt ${u.prompt_tokens ?? "?"})`);
  } else if (result.pieces) {
    parts.push(`≈${result.pieces} tokens (counted from the stream)`);
  }
  parts.push(`TTFT ${result.firstTokenMs === null ? "-" : Math.round(result.firstTokenMs) + " ms"}`);
  parts.push(`total ${Math.round(totalMs)} ms`);
  if (result.finish) parts.push(`finish: ${result.finish}`);
  if (result.failed) parts.push("FAILED");
  setRequestInfo(parts.join(" · "));
}

// ---------------------------------------------------------------------------------------------------------------
// Request timeline.

function resetTimeline(hint) {
  $("timeline-rows").replaceChildren();
  $("timeline-axis").hidden = true;
  $("served-by").textContent = "";
  $("timeline-hint").textContent = hint;
  $("timeline-hint").hidden = false;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Fetch the trace; the gateway may still be closing it just after [DONE], so retry briefly until `finish`. */
async function loadTrace(requestId) {
  const path = `/v1/requests/${encodeURIComponent(requestId)}/trace`;
  let trace = null;
  for (let attempt = 0; attempt < 4; attempt += 1) {
    try {
      trace = await getJson(path);
    } catch (exc) {
      showError("trace", `Could not load the request's trace: ${exc.message}`);
      resetTimeline("No trace for this request.");
      return;
    }
    if ((trace.spans || []).some((s) => s.name === "finish")) break;
    await sleep(250);
  }
  clearError("trace");
  drawTimeline(trace);
}

function drawTimeline(trace) {
  const spans = trace.spans || [];
  if (spans.length === 0) {
    resetTimeline("The trace has no spans.");
    return;
  }
  const total = Math.max(...spans.map((s) => Number(s.end) || 0), 1e-6);
  $("timeline-hint").hidden = true;
  drawAxis(total);
  $("timeline-rows").replaceChildren(...spans.flatMap((span) => [spanRow(span, total), ...hopRows(span, total)]));
  $("served-by").textContent = servedBy(trace.attempts || []);
}

function drawAxis(total) {
  const axis = $("timeline-axis");
  const ticks = el("div", "axis-ticks");
  for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
    const tick = el("span", "", fraction === 0 ? "0 ms" : fmtMs(total * fraction));
    tick.style.left = `${fraction * 100}%`;
    ticks.append(tick);
  }
  axis.replaceChildren(el("span", "", "span"), ticks, el("span", "span-ms", "duration"));
  axis.hidden = false;
}

/** One row: name (and worker), a bar placed on the shared axis by start and duration, the duration. */
function spanRow(span, total) {
  const attrs = span.attributes || {};
  const row = el("div", "span-row");
  row.dataset.name = span.name;
  const failed = attrs.outcome && !["finished", "running"].includes(attrs.outcome);
  if (failed) row.classList.add("failed");

  const name = el("span", "span-name", span.name);
  const detail = [attrs.worker, span.name === "dispatch" ? attrs.outcome : null].filter(Boolean).join(", ");
  if (detail) name.append(el("small", "", detail));
  name.title = describeAttributes(span);

  const track = el("span", "span-track");
  const bar = el("span", "span-bar");
  const start = Math.max(0, Number(span.start) || 0);
  const duration = Math.max(0, Number(span.duration) || 0);
  bar.style.left = `${Math.min(100, (start / total) * 100)}%`;
  if (duration === 0) bar.classList.add("point"); // first_token and other instants
  else bar.style.width = `${Math.min(100, (duration / total) * 100)}%`;
  bar.title = `${span.name}: ${fmtMs(start)} → ${fmtMs(start + duration)}`;
  track.append(bar);

  row.append(name, track, el("span", "span-ms", duration === 0 ? "·" : fmtMs(duration)));
  return row;
}

/**
 * A pipeline's hops under its prefill or decode span: one row per stage (node, layers), its compute and the
 * transfer into it as two bars, summed over the span's steps and laid end to end (prefill's ending with the
 * span, decode's starting with it); the title adds the bytes and, for decode, the figures per step.
 */
function hopRows(span, total) {
  const attrs = span.attributes || {};
  const hops = Array.isArray(attrs.hops) ? attrs.hops : [];
  if (hops.length === 0) return [];
  const seconds = (hop) => (Number(hop.compute_s) || 0) + (Number(hop.transfer_s) || 0);
  const sum = hops.reduce((acc, hop) => acc + seconds(hop), 0);
  const start = Math.max(0, Number(span.start) || 0);
  const end = start + Math.max(0, Number(span.duration) || 0);
  const steps = Number(attrs.steps) || 0;
  let cursor = span.name === "decode" ? start : Math.max(start, end - sum);
  return hops.map((hop) => {
    const row = el("div", "span-row hop-row");
    row.dataset.name = "hop";
    row.dataset.phase = span.name;
    row.dataset.stage = hop.name;
    const name = el("span", "span-name", `↳ ${hop.name}`);
    name.append(el("small", "", fmtRange(hop.layer_start, hop.layer_end)));
    const parts = [
      `${span.name} on ${hop.name}, layers ${fmtRange(hop.layer_start, hop.layer_end)}`,
      `compute ${fmtMs(hop.compute_s)}, transfer in ${fmtMs(hop.transfer_s)}, ${fmtNumber(hop.bytes / 1024, 1)} KiB`,
    ];
    if (steps > 0) {
      parts.push(`over ${steps} steps: ${fmtMs(hop.compute_s / steps)} compute, ${fmtMs(hop.transfer_s / steps)} transfer per step`);
    }
    row.title = parts.join("\n");
    const track = el("span", "span-track");
    for (const [kind, value] of [["transfer", hop.transfer_s], ["compute", hop.compute_s]]) {
      const width = Math.max(0, Number(value) || 0);
      const bar = el("span", `span-bar hop-${kind}`);
      bar.style.left = `${Math.min(100, (cursor / total) * 100)}%`;
      bar.style.width = `${Math.min(100, (width / total) * 100)}%`;
      bar.title = `${kind}: ${fmtMs(width)}`;
      track.append(bar);
      cursor += width;
    }
    row.append(name, track, el("span", "span-ms", fmtMs(seconds(hop))));
    return row;
  });
}

function describeAttributes(span) {
  const attrs = span.attributes || {};
  const pairs = Object.entries(attrs).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
  return [span.name, ...pairs].join("\n");
}

function servedBy(attempts) {
  if (attempts.length === 0) return "Served without a worker (e.g. from the answer cache).";
  const list = attempts.map((a) => `${a.worker} (${a.outcome}, ${a.tokens ?? 0} tokens)`);
  const label = attempts.length === 1 ? "Served by" : `Served by ${attempts.length} attempts:`;
  return `${label} ${list.join("; ")}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Nodes table.

let workersSeen = [];

async function refreshNodes() {
  try {
    const body = await getJson("/admin/workers");
    clearError("nodes");
    workersSeen = body.workers || [];
    renderNodes(workersSeen);
    // Same cadence and key as the workers; not asked when the workers' call failed (its message says why).
    await refreshPipelines();
    await refreshDeployments();
  } catch (exc) {
    showError("nodes", `Could not list the workers: ${exc.message}`);
  }
  renderStatus();
}

/** Update the table in place (rows keyed by worker), so that a click is not lost to a refresh. */
function renderNodes(workers) {
  const body = $("nodes-body");
  const rows = new Map([...body.querySelectorAll("tr.node-row")].map((tr) => [tr.dataset.key, tr]));
  workers.forEach((worker, index) => {
    const key = String(worker.worker_id || worker.name);
    let row = rows.get(key);
    if (!row) row = createNodeRow(key);
    rows.delete(key);
    fillNodeRow(row, worker);
    if (body.children[index] !== row) body.insertBefore(row, body.children[index] || null);
  });
  for (const stale of rows.values()) stale.remove();
  $("nodes-empty").hidden = workers.length > 0;
}

const NODE_CELLS = ["name", "state", "role", "model", "device", "load", "kv", "ttft", "actions"];
const NODE_LABELS = {
  state: "State",
  role: "Role",
  model: "Model",
  device: "Device",
  load: "Run / wait",
  kv: "KV",
  ttft: "TTFT",
};

function createNodeRow(key) {
  const row = el("tr", "node-row");
  row.dataset.key = key;
  for (const cell of NODE_CELLS) {
    const td = el("td", `cell-${cell}`);
    if (NODE_LABELS[cell]) td.dataset.label = NODE_LABELS[cell];
    if (["load", "kv", "ttft"].includes(cell)) td.classList.add("num");
    row.append(td);
  }
  const actions = el("div", "node-actions");
  const drain = el("button", "drain secondary", "Drain");
  const stop = el("button", "stop danger", "Stop");
  drain.type = "button";
  stop.type = "button";
  drain.addEventListener("click", () => workerAction(row.dataset.name, "drain", drain));
  stop.addEventListener("click", () => workerAction(row.dataset.name, "stop", stop));
  actions.append(drain, stop);
  row.querySelector(".cell-actions").append(actions);
  return row;
}

function fillNodeRow(row, w) {
  const cell = (name) => row.querySelector(`.cell-${name}`);
  row.dataset.name = w.name;
  row.dataset.state = w.state;
  row.dataset.role = w.role || "";

  const name = el("span", "node-name", w.name);
  const sub = [w.address, w.local ? "launched here" : ""];
  cell("name").replaceChildren(name, el("span", "node-sub", sub.filter(Boolean).join(" · ")));

  cell("state").replaceChildren(el("span", `badge state-${w.state}`, w.state));
  cell("role").replaceChildren(document.createTextNode(roleText(w)));
  if (w.role === "stage" && w.serving) cell("role").append(" ", el("span", "badge role-head", "head"));
  cell("model").textContent = w.model || "";
  cell("device").textContent = [w.device, fmtBytes(w.memory_cap_bytes)].filter(Boolean).join(" · ");
  cell("load").textContent = `${w.running ?? 0} / ${w.waiting ?? 0}`;

  const kv = Number(w.kv_usage);
  const meter = el("span", "meter");
  const fill = el("span");
  fill.style.width = `${Number.isFinite(kv) ? Math.min(100, kv * 100) : 0}%`;
  meter.append(fill);
  cell("kv").replaceChildren(meter, document.createTextNode(Number.isFinite(kv) ? `${Math.round(kv * 100)}%` : "-"));
  cell("ttft").textContent = w.recent_ttft_s ? fmtMs(w.recent_ttft_s) : "-";

  const gone = DEAD_STATES.has(w.state);
  row.querySelector("button.drain").disabled = gone || w.state === "draining";
  row.querySelector("button.stop").disabled = gone;
}

/**
 * "replica", "prefill", "decode", "stage [0, 12)", "stage (spare)" (registered, holding no layers), or "stage" (not
 * registered yet).
 */
function roleText(w) {
  if (w.role !== "stage") return w.role || "-";
  if (!Number.isFinite(w.layer_end)) return "stage";
  return w.layer_end > w.layer_start ? `stage ${fmtRange(w.layer_start, w.layer_end)}` : "stage (spare)";
}

async function workerAction(name, action, button) {
  button.disabled = true;
  try {
    await postJson(`/admin/workers/${encodeURIComponent(name)}/${action}`);
    clearError("action");
    flashStatus(action === "drain" ? `Draining ${name}.` : `Stopping ${name}.`);
  } catch (exc) {
    showError("action", `Could not ${action} ${name}: ${exc.message}`);
  }
  await refreshNodes(); // re-enables the button from the worker's new state
}

/** What each role of the join form holds; a prefill or decode worker holds the whole model, as a replica does. */
const JOIN_ROLE_HINTS = {
  replica: "A replica holds the whole model; its cap covers the weights, the runtime and the KV cache.",
  prefill:
    "A prefill worker holds the whole model and computes prompts, handing their KV to a decode worker; " +
    "its cap covers the weights, the runtime and the KV cache.",
  decode:
    "A decode worker holds the whole model and goes on from a prefill worker's KV; " +
    "its cap covers the weights, the runtime and the KV cache.",
  stage: "A stage node holds the layers the gateway gives it; its cap covers their weights and KV cache.",
};

/** The join form's memory field is a whole-model worker's cap or a stage node's cap for its layers plus their KV. */
function syncJoinRole() {
  const role = $("join-role").value;
  $("join-memory-label").textContent = role === "stage" ? "Stage cap (MiB)" : "Max memory (MiB)";
  $("join-memory-hint").textContent = JOIN_ROLE_HINTS[role] || JOIN_ROLE_HINTS.replica;
}

/** How the join form names what it starts: "stage node", "prefill worker", "decode worker" or "worker". */
function joinWhat(role) {
  if (role === "stage") return "stage node";
  return role === "prefill" || role === "decode" ? `${role} worker` : "worker";
}

async function joinWorker() {
  const model = $("join-model").value.trim();
  const device = $("join-device").value.trim() || "cpu";
  const role = $("join-role").value;
  const memory = parseInt($("join-memory").value, 10);
  const what = joinWhat(role);
  if (!model) {
    showError("action", `Choose the model the new ${what} should serve.`);
    return;
  }
  if (!Number.isFinite(memory) || memory <= 0) {
    showError("action", `${role === "stage" ? "The stage cap" : "Max memory"} must be a positive number of MiB.`);
    return;
  }
  const button = $("join");
  button.disabled = true;
  try {
    const body = await postJson("/admin/workers", { model, device, max_memory_mb: memory, role });
    clearError("action");
    const pid = body.pid ? ` (pid ${body.pid})` : "";
    const who = body.name ? `${what === "worker" ? "" : `${what} `}${body.name}` : `a ${what}`;
    flashStatus(`Starting ${who}${pid} for ${model} on ${device}, ${memory} MiB cap.`);
  } catch (exc) {
    showError("action", `Could not start a ${what}: ${exc.message}`);
  } finally {
    button.disabled = false;
  }
  await refreshNodes();
  refreshModels();
}

// ---------------------------------------------------------------------------------------------------------------
// Deployments: per model and role, desired against actual, crash-looping workers, the latest autoscaling decision;
// then the node agents that run them.

let deploymentsDrawn = null;

async function refreshDeployments() {
  let deployments, nodes;
  try {
    deployments = (await getJson("/admin/deployments")).deployments || [];
    nodes = (await getJson("/admin/nodes")).nodes || [];
    clearError("deployments");
  } catch (exc) {
    showError("deployments", `Could not list the deployments: ${exc.message}`);
    return;
  }
  const drawn = JSON.stringify([deployments, nodes]);
  if (drawn === deploymentsDrawn) return;
  deploymentsDrawn = drawn;
  $("deployments-list").replaceChildren(...deployments.map(deploymentView));
  $("node-agents").replaceChildren(...nodes.map(nodeAgentView));
  $("deployments").hidden = deployments.length === 0 && nodes.length === 0;
}

function deploymentView(d) {
  const s = d.status || {};
  const box = el("article", "deployment");
  box.dataset.model = d.model;
  box.dataset.role = d.role;
  box.append(el("h3", "", `${d.model} · ${d.role}`));
  const counts = el("dl", "pipeline-facts deployment-counts");
  for (const [term, value] of [["Desired", s.desired], ["Placed", s.planned], ["Running", s.running],
                               ["Serving", s.serving], ["Range", `${d.min_replicas}..${d.max_replicas}`]]) {
    const pair = el("div");
    pair.dataset.count = term.toLowerCase();
    pair.append(el("dt", "", term), el("dd", "", value ?? "-"));
    counts.append(pair);
  }
  box.append(counts);
  if (s.waiting) box.append(el("p", "pipeline-status not-serving", `Waiting: ${s.waiting}`));
  for (const looping of s.crash_looping || []) {
    const notice = el("div", "crash-looping");
    notice.append(el("strong", "", `${looping.worker} on ${looping.node} is crash-looping (exit ${looping.exit_code})`));
    notice.append(el("pre", "", (looping.last_lines || []).join("\n")));
    box.append(notice);
  }
  const decisions = (d.autoscaling && d.autoscaling.decisions) || [];
  if (decisions.length) {
    const last = decisions[decisions.length - 1];
    box.append(el("p", "hint", `Autoscaled ${last.from} → ${last.to}: ${last.reason}`));
  }
  return box;
}

function nodeAgentView(n) {
  const free = n.free || {};
  const item = el("li", `node-agent ${n.state}`);
  item.dataset.node = n.name;
  item.append(el("strong", "", n.name), document.createTextNode(
    ` ${n.state}: ${(n.workers || []).length} of ${n.max_workers} workers, ` +
    `${free.memory_mb} of ${n.memory_mb} MiB and ${free.cpus} of ${n.cpus} cores free`));
  return item;
}

// ---------------------------------------------------------------------------------------------------------------
// Pipelines: per model, its status, and for a serving one its stages, figures, latest step and recent events.

let pipelinesDrawn = null; // the JSON last drawn: an unchanged answer leaves the panel (and a text selection) alone

async function refreshPipelines() {
  let pipelines;
  try {
    pipelines = (await getJson("/admin/pipelines")).pipelines || [];
    clearError("pipelines");
  } catch (exc) {
    showError("pipelines", `Could not list the pipelines: ${exc.message}`);
    return;
  }
  const drawn = JSON.stringify(pipelines);
  if (drawn === pipelinesDrawn) return;
  pipelinesDrawn = drawn;
  $("pipelines-list").replaceChildren(...pipelines.map(pipelineView));
  $("pipelines").hidden = pipelines.length === 0;
}

function pipelineView(p) {
  const box = el("article", "pipeline");
  box.dataset.model = p.model;
  box.dataset.serving = p.serving ? "yes" : "no";
  box.append(el("h3", "", p.model));

  // Not serving, the status is the message that matters (what to add): shown as a notice, not in a corner.
  const status = el("p", p.serving ? "pipeline-status" : "pipeline-status not-serving");
  if (!p.serving) status.append(el("strong", "", "Pipeline not serving: "));
  status.append(document.createTextNode(p.status || ""));
  box.append(status);

  const stages = p.stages || [];
  const hops = p.hops || [];
  if (stages.length) {
    box.append(stageBar(p.model, stages));
    const facts = el("dl", "pipeline-facts");
    const fact = (term, value) => {
      const pair = el("div");
      pair.append(el("dt", "", term), el("dd", "", value));
      facts.append(pair);
    };
    fact("Re-partitions", p.repartitions ?? "-");
    fact("Bubble", hops.length || p.bubble ? fmtPercent(p.bubble) : "-");
    fact("Micro-batch depth", p.depth || "-");
    box.append(facts);
  }

  const details = el("div", "pipeline-details");
  if (stages.length) details.append(hops.length ? hopsTable(hops) : el("p", "hint", "No step reported yet."));
  const events = (p.events || []).slice(-EVENTS_SHOWN).reverse();
  if (events.length) details.append(eventList(events));
  if (details.children.length) box.append(details);
  return box;
}

/** The stages, head first, each as wide as its share of the layers (a minimum width keeps a short one legible). */
function stageBar(model, stages) {
  const bar = el("ol", "stage-bar");
  bar.setAttribute("aria-label", `Stages of ${model}, head first`);
  stages.forEach((s, i) => {
    const item = el("li", i === 0 ? "stage head" : "stage");
    item.style.flexGrow = String(Math.max(1, s.layer_end - s.layer_start));
    const name = el("span", "stage-name", s.name);
    if (i === 0) name.append(el("small", "", " head"));
    const range = el("span", "stage-range");
    range.append(el("span", "visually-hidden", "layers "), fmtRange(s.layer_start, s.layer_end));
    item.append(name, range);
    item.append(el("span", "stage-kv", `${s.kv_blocks ?? "-"} KV blocks`));
    item.title = `${s.name} (${s.worker_id}): layers ${fmtRange(s.layer_start, s.layer_end)}, ${s.kv_blocks} KV blocks`;
    bar.append(item);
  });
  return bar;
}

function hopsTable(hops) {
  const table = el("table", "hops-table");
  table.append(el("caption", "", "Latest step"));
  const head = el("tr");
  for (const [text, num] of [["Stage"], ["Layers"], ["Compute ms", 1], ["Transfer ms", 1], ["KiB", 1]]) {
    const th = el("th", num ? "num" : "", text);
    th.scope = "col";
    head.append(th);
  }
  const thead = el("thead");
  thead.append(head);
  const tbody = el("tbody");
  for (const hop of hops) {
    const row = el("tr");
    row.append(
      el("td", "", hop.name),
      el("td", "", fmtRange(hop.layer_start, hop.layer_end)),
      el("td", "num", fmtNumber(hop.compute_s * 1000, 2)),
      el("td", "num", fmtNumber(hop.transfer_s * 1000, 2)),
      el("td", "num", fmtNumber(hop.bytes / 1024, 1)),
    );
    tbody.append(row);
  }
  table.append(thead, tbody);
  const wrap = el("div", "table-wrap");
  wrap.append(table);
  return wrap;
}

/** Events, newest first, each with its time of day. */
function eventList(events) {
  const box = el("div", "pipeline-events");
  box.append(el("h4", "", "Recent events"));
  const list = el("ol");
  for (const event of events) {
    const item = el("li");
    const when = new Date(Number(event.time) * 1000);
    const time = el("time", "", Number.isFinite(when.getTime()) ? fmtClock(when) : "-");
    if (Number.isFinite(when.getTime())) time.dateTime = when.toISOString();
    item.append(time, el("span", "", event.text));
    list.append(item);
  }
  box.append(list);
  return box;
}

// ---------------------------------------------------------------------------------------------------------------
// Status line.

let flash = null;

function flashStatus(text) {
  flash = { text, until: Date.now() + 6000 };
  renderStatus();
}

function renderStatus() {
  const status = $("status");
  const parts = [];
  if (flash && Date.now() < flash.until) parts.push(flash.text);
  const live = workersSeen.filter((w) => !DEAD_STATES.has(w.state));
  const healthy = workersSeen.filter((w) => w.state === "healthy").length;
  parts.push(`${live.length} worker${live.length === 1 ? "" : "s"} (${healthy} healthy)`);
  const models = (knownModels || []).length;
  parts.push(`${models} model${models === 1 ? "" : "s"}`);
  const unreachable = [...errors.values()].some((m) => m.startsWith("Network error"));
  parts.push(unreachable ? "gateway unreachable" : `updated ${fmtClock(new Date())}`);
  status.textContent = parts.join(" · ");
  status.classList.toggle("bad", unreachable);
}

// ---------------------------------------------------------------------------------------------------------------
// Prometheus text parsing and the derived figures.

/** Parse one label set body (`a="x",b="y"`) into an object, undoing the format's escapes. */
function parseLabels(text) {
  const labels = {};
  const re = /([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"/g;
  let match;
  while ((match = re.exec(text)) !== null) {
    labels[match[1]] = match[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
  }
  return labels;
}

function parseValue(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text); // NaN stays NaN
}

/** Samples of a Prometheus text exposition: [{name, labels, value}], comments skipped. */
function parseMetrics(text) {
  const samples = [];
  const re = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const match = re.exec(line);
    if (!match) continue;
    samples.push({ name: match[1], labels: parseLabels(match[2] || ""), value: parseValue(match[3]) });
  }
  return samples;
}

function sumOf(samples, name) {
  return samples.filter((s) => s.name === name && Number.isFinite(s.value)).reduce((a, s) => a + s.value, 0);
}

/** Cumulative TTFT bucket counts summed over models: Map of upper bound (le, seconds) -> count. */
function ttftBuckets(samples) {
  const buckets = new Map();
  for (const s of samples) {
    if (s.name !== "fleetserve_time_to_first_token_seconds_bucket") continue;
    const le = parseValue(s.labels.le);
    if (Number.isNaN(le)) continue;
    buckets.set(le, (buckets.get(le) || 0) + s.value);
  }
  return buckets;
}

/**
 * Median of the observations made between two snapshots of a cumulative histogram, interpolating linearly inside
 * the bucket that holds it (as Prometheus' histogram_quantile does). Null when nothing new was observed.
 */
function medianBetween(previous, current) {
  const bounds = [...current.keys()].sort((a, b) => a - b);
  const delta = (le) => Math.max(0, (current.get(le) || 0) - (previous.get(le) || 0));
  const total = bounds.length ? delta(bounds[bounds.length - 1]) : 0;
  if (total <= 0) return null;
  const target = total / 2;
  let lower = 0;
  let below = 0;
  for (const upper of bounds) {
    const count = delta(upper);
    if (count >= target) {
      if (!Number.isFinite(upper)) return lower; // above the last finite bound: its lower edge is all we know
      const inBucket = count - below;
      return inBucket > 0 ? lower + ((upper - lower) * (target - below)) / inBucket : upper;
    }
    lower = upper;
    below = count;
  }
  return lower;
}

/** Mean KV cache use over the workers that are not dead or exited, as a percentage; null without any. */
function kvUsagePercent(samples) {
  const gone = new Set();
  for (const s of samples) {
    if (s.name === "fleetserve_worker_state" && s.value === 1 && DEAD_STATES.has(s.labels.state)) {
      gone.add(`${s.labels.worker}\u0000${s.labels.model}`);
    }
  }
  const values = samples
    .filter((s) => s.name === "fleetserve_worker_kv_cache_usage_ratio" && Number.isFinite(s.value))
    .filter((s) => !gone.has(`${s.labels.worker}\u0000${s.labels.model}`))
    .map((s) => s.value);
  if (values.length === 0) return null;
  return (values.reduce((a, v) => a + v, 0) / values.length) * 100;
}

// ---------------------------------------------------------------------------------------------------------------
// Charts.

const history = { tokens: [], ttft: [], kv: [] };
let lastScrape = null; // {time (s), tokens, buckets}

async function refreshMetrics() {
  let samples;
  try {
    const response = await call("/metrics");
    samples = parseMetrics(await response.text());
    clearError("metrics");
  } catch (exc) {
    showError("metrics", `Could not read the metrics: ${exc.message}`);
    return;
  }
  const now = performance.now() / 1000;
  const tokens = sumOf(samples, "fleetserve_generation_tokens_total");
  const buckets = ttftBuckets(samples);

  let rate = null;
  let ttftMs = null;
  if (lastScrape) {
    const seconds = now - lastScrape.time;
    // A counter that went down means the gateway restarted: count from zero.
    const produced = tokens >= lastScrape.tokens ? tokens - lastScrape.tokens : tokens;
    rate = seconds > 0 ? produced / seconds : null;
    const median = medianBetween(lastScrape.buckets, buckets);
    ttftMs = median === null ? null : median * 1000;
  }
  lastScrape = { time: now, tokens, buckets };

  record("tokens", now, rate);
  record("ttft", now, ttftMs);
  record("kv", now, kvUsagePercent(samples));
  drawChart("chart-tokens", "latest-tokens", history.tokens, now, { unit: "", digits: 1 });
  drawChart("chart-ttft", "latest-ttft", history.ttft, now, { unit: " ms", digits: 0 });
  drawChart("chart-kv", "latest-kv", history.kv, now, { unit: "%", digits: 1, max: 100 });
}

function record(series, time, value) {
  const points = history[series];
  points.push({ time, value });
  while (points.length && points[0].time < time - CHART_WINDOW_S) points.shift();
}

/** Draw a series as SVG polylines (a gap wherever the value is unknown) and print its latest value. */
function drawChart(id, latestId, points, now, { unit, digits, max }) {
  const box = $(id);
  const svg = box.querySelector("svg");
  const width = 300;
  const height = 80;
  const known = points.filter((p) => p.value !== null && Number.isFinite(p.value));
  const top = max || Math.max(1, ...known.map((p) => p.value)) * 1.1;
  const x = (t) => ((t - (now - CHART_WINDOW_S)) / CHART_WINDOW_S) * width;
  const y = (v) => height - 2 - (Math.min(v, top) / top) * (height - 4);

  // Split into runs of consecutive known values; an isolated point becomes a short tick so that it shows.
  const runs = [];
  let run = [];
  for (const p of points) {
    if (p.value === null || !Number.isFinite(p.value)) {
      if (run.length) runs.push(run);
      run = [];
    } else {
      run.push(p);
    }
  }
  if (run.length) runs.push(run);

  const lines = runs.map((r) => {
    const line = document.createElementNS(SVG_NS, "polyline");
    const coords = r.length === 1
      ? [[x(r[0].time) - 1.5, y(r[0].value)], [x(r[0].time) + 1.5, y(r[0].value)]]
      : r.map((p) => [x(p.time), y(p.value)]);
    line.setAttribute("points", coords.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "));
    line.setAttribute("vector-effect", "non-scaling-stroke");
    return line;
  });
  svg.replaceChildren(...lines);

  const latest = points.length ? points[points.length - 1].value : null;
  const text = latest === null || !Number.isFinite(latest) ? "-" : `${fmtNumber(latest, digits)}${unit}`;
  $(latestId).textContent = text;
  box.querySelector(".scale-max").textContent = `max ${fmtNumber(top, digits)}${unit}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Polling loops: each waits for its previous round to finish, so that a slow gateway does not pile up calls.

function every(ms, task) {
  const loop = async () => {
    try {
      await task();
    } catch (exc) {
      // The tasks report their own failures; this only catches a bug in the page itself.
      showError("console", `Console error: ${exc.message || exc}`);
    }
    setTimeout(loop, ms);
  };
  loop();
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring.

function bindKeyInput(id, storageKey) {
  const input = $(id);
  input.value = loadSetting(storageKey);
  input.addEventListener("input", () => saveSetting(storageKey, input.value.trim()));
  input.addEventListener("change", () => {
    saveSetting(storageKey, input.value.trim());
    refreshNodes();
    refreshModels();
  });
}

function init() {
  bindKeyInput("api-key", "fleetserve.apiKey");
  bindKeyInput("admin-key", "fleetserve.adminKey");

  $("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      send();
    }
  });
  $("join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    joinWorker();
  });
  $("join-model").addEventListener("input", () => {
    joinModelEdited = $("join-model").value.trim() !== "";
  });
  $("join-role").addEventListener("change", syncJoinRole);
  syncJoinRole();
  $("model").addEventListener("change", syncJoinModel);
  $("error").addEventListener("click", clearAllErrors);

  every(MODELS_POLL_MS, refreshModels);
  every(POLL_MS, refreshNodes);
  every(POLL_MS, refreshMetrics);
}

document.addEventListener("DOMContentLoaded", init);
