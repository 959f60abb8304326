// The soft-serve playground: one prompt answered at several exits side by side, the
// policy's budget -> depth choice (GET /v1/soft/plan), and the live per-depth picture
// (GET /v1/soft/stats). Plain DOM, no build step, no dependencies. The API key lives in
// `state.key` only (never in storage).
"use strict";

const POLL_MS = 1000; // the live strip and the plan follow the load at this period
const HISTORY = 60; // points in each sparkline (one per poll)

const state = {
  key: "",
  model: "",
  exits: [],
  numLayers: 0,
  policy: "",
  maxModelLen: 0,
  plan: null,
  range: [10, 10000], // the slider's ends, ms (log scale); set from the first plan
  promptTokens: null, // {key, n}: the last answered prompt's tokens, from its usage
  running: [], // AbortControllers of the requests in flight
  polls: [], // the last few stats polls: {t, body}
  history: { cap: [] }, // depth -> mean latency per poll (ms or null); "cap" -> depth caps
  polling: false,
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function fmtMs(ms) {
  if (ms === null || ms === undefined || !isFinite(ms)) return "–";
  if (ms >= 10000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  return `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
}

// -- HTTP -----------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders(extra = {}) {
  const h = { ...extra };
  if (state.key) h.authorization = `Bearer ${state.key}`;
  return h;
}

// An OpenAI-shaped error ({"error": {message, type, param, code}}) as one readable line.
function describe(status, statusText, text, retryAfter) {
  let msg = text || statusText;
  try {
    const e = JSON.parse(text).error;
    msg = e.message;
    const what = [e.type, e.param ? `param: ${e.param}` : null, e.code].filter(Boolean);
    if (what.length) msg += ` (${what.join(", ")})`;
  } catch (_) {
    /* not JSON: the text as it came */
  }
  let out = `${status}${statusText ? " " + statusText : ""}: ${msg}`;
  if (retryAfter) out += ` — retry after ${retryAfter} s`;
  return out;
}

async function apiError(resp) {
  const text = await resp.text();
  return new ApiError(
    resp.status,
    describe(resp.status, resp.statusText, text, resp.headers.get("retry-after")),
  );
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: authHeaders() });
  if (!resp.ok) throw await apiError(resp);
  return resp.json();
}

// POST a streaming request; `on.open(headers)`, `on.delta(text)`, `on.usage(usage)`.
async function streamRequest(body, headers, signal, on) {
  const chat = body.messages !== undefined;
  const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
    method: "POST",
    headers: authHeaders({ "content-type": "application/json", ...headers }),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!resp.ok) throw await apiError(resp);
  on.open(resp.headers);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, describe(500, "", data, null));
        if (chunk.usage) on.usage(chunk.usage);
        for (const c of chunk.choices || []) {
          const text = chat ? c.delta && c.delta.content : c.text;
          if (text) on.delta(text);
        }
      }
    }
  }
}

function requestBody(model) {
  const text = $("#prompt").value;
  const body = {
    model,
    max_tokens: Number($("#max-tokens").value),
    temperature: Number($("#temperature").value),
  };
  if (mode() === "chat") body.messages = [{ role: "user", content: text }];
  else body.prompt = text;
  const schema = jsonSchema();
  if (schema !== null) {
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
  }
  return body;
}

// The "JSON schema" box: null when empty; text that is not JSON goes as it is (the server's
// 400 then says what is wrong with it, in the column or the banner)
function jsonSchema() {
  const text = $("#json-schema").value.trim();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function showBanner(message) {
  const b = $("#banner");
  b.textContent = message;
  b.hidden = !message;
}

// -- the columns: one prompt at several exits -------------------------------------------------
function selectedExits() {
  return [...document.querySelectorAll("#exit-picks input:checked")].map((i) => Number(i.value));
}

function makeColumn(depth) {
  const stat = (name, label) => el("div", {}, label, el("b", { class: name, text: "–" }));
  const bar = el("div");
  bar.style.width = `${(100 * depth) / state.numLayers}%`;
  const col = el(
    "article",
    { class: "column", "data-depth": String(depth) },
    el("h3", {}, el("span", { text: `depth ${depth}` }),
      el("span", { class: "layers", text: `${depth} / ${state.numLayers} layers` })),
    el("div", { class: "depthbar" }, bar),
    el("div", { class: "stats" }, stat("ttft", "TTFT"), stat("tps", "tok/s"),
      stat("total", "total"), stat("tokens", "tokens")),
    el("div", { class: "text" }),
    el("div", { class: "status", text: "waiting…" }),
  );
  return col;
}

// Streams one request into `col`, updating its numbers as tokens arrive.
async function runColumn(col, body, headers, signal) {
  const set = (sel, v) => (col.querySelector(sel).textContent = v);
  const t0 = performance.now();
  let first = null;
  let last = null;
  let chunks = 0;
  let usage = null;
  const key = promptKey();
  col.classList.add("streaming");
  set(".status", "sending…");
  const tick = () => {
    const now = last ?? performance.now();
    set(".total", fmtMs(now - t0));
    const n = usage ? usage.completion_tokens : chunks;
    set(".tokens", String(n));
    if (first !== null && last > first && n > 1) {
      set(".tps", ((n - 1) / ((last - first) / 1000)).toFixed(1));
    }
  };
  try {
    await streamRequest(body, headers, signal, {
      open: (h) => set(".status", `streaming · served at depth ${h.get("x-soft-depth")}`),
      delta: (text) => {
        const now = performance.now();
        if (first === null) {
          first = now;
          set(".ttft", fmtMs(first - t0));
        }
        last = now;
        chunks += 1;
        col.dataset.chunks = String(chunks); // how many pieces arrived (and were shown) apart
        col.querySelector(".text").textContent += text;
        tick();
      },
      usage: (u) => {
        usage = u;
        learnPromptTokens(key, u);
      },
    });
    last = performance.now();
    tick();
    const reason = usage ? `${usage.completion_tokens} tokens` : "done";
    set(".status", `done · ${reason}`);
    col.classList.add("done");
  } catch (e) {
    col.classList.add("failed");
    if (e.name === "AbortError") {
      set(".status", "stopped");
    } else {
      set(".status", "failed");
      col.append(el("div", { class: "error", text: e.message }));
      throw e;
    }
  } finally {
    col.classList.remove("streaming");
  }
}

async function runAll() {
  showBanner("");
  const exits = selectedExits();
  const columns = $("#columns");
  columns.replaceChildren();
  if (!exits.length) {
    showBanner("Pick at least one exit to compare.");
    return;
  }
  const ctrl = new AbortController();
  state.running.push(ctrl);
  $("#stop").disabled = false;
  const runs = exits.map((d) => {
    const col = makeColumn(d);
    columns.append(col);
    return runColumn(col, requestBody(`${state.model}@${d}`), {}, ctrl.signal);
  });
  const results = await Promise.allSettled(runs);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) showBanner(failed.reason.message);
  state.running = state.running.filter((c) => c !== ctrl);
  $("#stop").disabled = state.running.length === 0;
}

function stopAll() {
  for (const c of state.running) c.abort();
}

// -- the budget: what the policy would pick ---------------------------------------------------
function sliderMs() {
  const [lo, hi] = state.range;
  return lo * Math.pow(hi / lo, Number($("#budget").value) / 1000);
}

// The prompt's tokens, as the last answer to this very prompt counted them (usage), else
// a guess: the page has no tokenizer, ~4 characters a token plus a chat template's few.
function promptKey() {
  return `${mode()}\u0000${$("#prompt").value}`;
}

function promptTokens() {
  if (state.promptTokens && state.promptTokens.key === promptKey()) return state.promptTokens.n;
  const chars = $("#prompt").value.length;
  return Math.max(1, Math.ceil(chars / 4) + (mode() === "chat" ? 8 : 0));
}

function learnPromptTokens(key, usage) {
  if (usage && usage.prompt_tokens) state.promptTokens = { key, n: usage.prompt_tokens };
}

async function refreshPlan() {
  const maxTokens = Number($("#max-tokens").value) || 16;
  const budget = Math.round(sliderMs());
  $("#budget-value").textContent = fmtMs(budget);
  const q = new URLSearchParams({
    max_tokens: String(maxTokens),
    prompt_tokens: String(promptTokens()),
    budget: `${budget}ms`,
  });
  try {
    const plan = await getJSON(`/v1/soft/plan?${q}`);
    if (!state.plan || state.plan.max_tokens !== plan.max_tokens) {
      state.plan = plan;
      if (setRange(plan)) return refreshPlan(); // again, from the slider's new place
    } else if (outOfRange(plan)) {
      setRange(plan, budget); // the load moved the predictions: the same budget, rescaled
    }
    state.plan = plan;
    renderPlan(plan);
  } catch (e) {
    $("#plan-pick").className = "pick infeasible";
    $("#plan-pick").textContent = e.message;
    $("#plan-bars").replaceChildren();
  }
}

function predictedRange(plan) {
  const ms = plan.exits.map((x) => x.predicted_ms).filter((v) => v > 0);
  return ms.length ? [Math.min(...ms), Math.max(...ms)] : null;
}

// Whether an exit's prediction has come near an end of the slider (or past it).
function outOfRange(plan) {
  const r = predictedRange(plan);
  return r !== null && (r[0] < state.range[0] * 1.25 || r[1] > state.range[1] / 1.25);
}

// The slider spans the predictions, from half the shallowest's to twice the deepest's, and
// is put at `budget` ms, by default between them (a middle exit's side of the trade-off).
// True when it moved.
function setRange(plan, budget) {
  const r = predictedRange(plan);
  if (r === null) return false;
  const lo = Math.max(1, r[0] * 0.5);
  const hi = Math.max(lo * 4, r[1] * 2);
  state.range = [lo, hi];
  const start = budget ?? Math.sqrt(r[0] * r[1]);
  const pos = (1000 * Math.log(start / lo)) / Math.log(hi / lo);
  $("#budget").value = String(Math.min(1000, Math.max(0, Math.round(pos))));
  $("#budget-value").textContent = fmtMs(sliderMs());
  return true;
}

function renderPlan(plan) {
  const pick = $("#plan-pick");
  const chosen = plan.exits.find((x) => x.depth === plan.depth);
  const budget = fmtMs(plan.budget_ms);
  pick.className = plan.feasible ? "pick" : "pick infeasible";
  if (plan.policy === "fixed") {
    pick.textContent = `--policy fixed ignores budgets: depth ${plan.depth} (predicted ${fmtMs(chosen.predicted_ms)})`;
  } else if (plan.feasible) {
    pick.textContent = `Within ${budget} the server would pick depth ${plan.depth} — predicted ${fmtMs(chosen.predicted_ms)}`;
  } else {
    pick.textContent = `No exit fits ${budget}: the shallowest, depth ${plan.depth}, would serve it (predicted ${fmtMs(chosen.predicted_ms)})`;
  }
  if (plan.depth_cap < plan.default_depth) {
    pick.textContent += ` · governor cap: depth ${plan.depth_cap}`;
  }
  pick.dataset.depth = String(plan.depth);
  pick.dataset.budget = String(Math.round(plan.budget_ms));
  const scale = Math.max(state.range[1], ...plan.exits.map((x) => x.predicted_ms));
  const rows = [];
  for (const x of [...plan.exits].reverse()) {
    const cls = x.depth === plan.depth ? "chosen" : x.fits ? "fits" : "over";
    const bar = el("div", { class: "bar" });
    bar.style.width = `${Math.min(100, (100 * x.predicted_ms) / scale)}%`;
    const marker = el("div", { class: "marker", title: `budget ${budget}` });
    marker.style.left = `${Math.min(100, (100 * plan.budget_ms) / scale)}%`;
    rows.push(
      el("div", { class: `label ${cls}`, "data-depth": String(x.depth), text: `depth ${x.depth}` }),
      el("div", { class: `track ${cls}` }, bar, marker),
      el("div", { class: "ms", text: `${fmtMs(x.predicted_ms)} · TTFT ${fmtMs(x.ttft_ms)}` }),
    );
  }
  $("#plan-bars").replaceChildren(...rows);
}

// One request with x-latency-budget and no pin: the server picks. Not streamed, so that
// x-soft-depth is the depth that finished it (a request that falls behind its deadline is
// moved to a shallower exit mid-way; a stream's header can only say where it started).
async function sendWithBudget() {
  const out = $("#budget-result");
  const budget = Math.round(sliderMs());
  const planned = state.plan ? state.plan.depth : null;
  out.replaceChildren(el("span", { text: `sending with x-latency-budget: ${budget}ms…` }));
  const body = requestBody(state.model);
  const chat = body.messages !== undefined;
  const t0 = performance.now();
  try {
    const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: authHeaders({ "content-type": "application/json", "x-latency-budget": `${budget}ms` }),
      body: JSON.stringify(body),
    });
    if (!resp.ok) throw await apiError(resp);
    const answer = await resp.json();
    const took = performance.now() - t0;
    const served = Number(resp.headers.get("x-soft-depth"));
    const predicted = Number(resp.headers.get("x-soft-predicted-ms"));
    const choice = answer.choices[0];
    learnPromptTokens(promptKey(), answer.usage);
    let note = "";
    if (planned !== null) note = served === planned ? " (as planned)" : ` (the plan said ${planned})`;
    out.replaceChildren(
      el("span", { class: "served", "data-depth": String(served), text: `served at depth ${served}${note}` }),
      el("span", { text: ` · x-soft-depth ${served} · predicted ${fmtMs(predicted)} · took ${fmtMs(took)}` }),
      el("div", { class: "text", text: chat ? choice.message.content : choice.text }),
    );
  } catch (e) {
    out.replaceChildren(el("span", { class: "error", text: e.message }));
    showBanner(e.message);
  }
}

// -- the live strip ---------------------------------------------------------------------------
// Per depth: the requests that finished in the last WINDOW_S (mean latency, TTFT, tokens/s),
// from two polls' difference of the cumulative totals; a bar per poll of the mean latency.
const WINDOW_S = 5;

function bars(values, cls, top) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${HISTORY} 26`);
  svg.setAttribute("preserveAspectRatio", "none");
  const base = document.createElementNS(svgNS, "rect");
  Object.entries({ x: 0, y: 25, width: HISTORY, height: 1, class: "spark-base" })
    .forEach(([k, v]) => base.setAttribute(k, v));
  svg.append(base);
  const max = top ?? Math.max(1e-9, ...values.filter((v) => v !== null));
  values.forEach((v, i) => {
    if (v === null) return;
    const h = Math.max(1, (24 * v) / max);
    const r = document.createElementNS(svgNS, "rect");
    const at = { x: HISTORY - values.length + i + 0.1, y: 25 - h, width: 0.8, height: h, class: cls };
    Object.entries(at).forEach(([k, val]) => r.setAttribute(k, String(val)));
    svg.append(r);
  });
  return svg;
}

function push(key, v) {
  const h = (state.history[key] = state.history[key] || []);
  h.push(v);
  if (h.length > HISTORY) h.shift();
}

// The per-depth change between two polls: {requests, latency mean, ttft mean, tokens/s}.
function change(now, then, dt) {
  const n = then ? now.requests - then.requests : 0;
  const nt = then ? now.ttft_count - then.ttft_count : 0;
  return {
    n,
    mean: n > 0 ? (1000 * (now.latency_seconds_sum - then.latency_seconds_sum)) / n : null,
    ttft: nt > 0 ? (1000 * (now.ttft_seconds_sum - then.ttft_seconds_sum)) / nt : null,
    tps: then && dt > 0 ? (now.generated_tokens - then.generated_tokens) / dt : 0,
  };
}

function renderStats(body, now) {
  const polls = (state.polls = state.polls || []);
  const prev = polls[polls.length - 1];
  // the oldest poll within the window (the previous one, at least)
  const old = polls.find((p) => now - p.t <= WINDOW_S * 1000 + 100) || prev;
  polls.push({ t: now, body });
  while (polls.length > WINDOW_S + 2) polls.shift();
  const byDepth = (poll) => new Map((poll ? poll.body.depths : []).map((x) => [x.depth, x]));
  const prevBy = byDepth(prev);
  const oldBy = byDepth(old);
  const dt = old ? (now - old.t) / 1000 : 0;
  push("cap", body.depth_cap);
  const cards = body.depths.map((x) => {
    const step = change(x, prevBy.get(x.depth), 0);
    push(x.depth, step.mean);
    const w = change(x, oldBy.get(x.depth), dt);
    const all = x.requests ? (1000 * x.latency_seconds_sum) / x.requests : null;
    const recent = w.n
      ? `${(w.n / Math.max(dt, 1e-3)).toFixed(1)} req/s · mean ${fmtMs(w.mean)} · TTFT ${fmtMs(w.ttft)} · ${w.tps.toFixed(0)} tok/s`
      : "idle";
    const card = el(
      "div",
      {
        class: `live-depth${x.depth > body.depth_cap ? " capped" : ""}`,
        "data-depth": String(x.depth),
        "data-requests": String(x.requests),
      },
      el("div", { class: "title" }, el("span", { text: `depth ${x.depth}` }),
        el("span", { class: "nums", text: `${x.running} running` })),
      el("div", { class: "nums", text: `last ${WINDOW_S} s: ${recent}` }),
      el("div", { class: "nums", text: `${x.requests} requests since start, mean ${fmtMs(all)}` }),
      bars(state.history[x.depth], "spark"),
    );
    card.title = "bars: mean end-to-end latency of the requests that finished at this depth, per second";
    return card;
  });
  const capCard = el(
    "div",
    { class: "live-depth cap-card" },
    el("div", { class: "title" }, el("span", { text: "depth cap" }),
      el("span", { class: "cap", "data-cap": String(body.depth_cap), text: `${body.depth_cap} / ${body.default_depth}` })),
    el("div", { class: "nums", text: body.policy === "load" ? "the governor's cap on unbudgeted requests" : `--policy ${body.policy}: no governor` }),
    bars(state.history.cap, "spark-cap", Math.max(...state.exits)),
  );
  $("#live-depths").replaceChildren(...cards, capCard);
  $("#live-summary").textContent =
    `${body.running} running · ${body.waiting} waiting · batch ${body.batch_size} · ` +
    `KV cache ${(100 * body.kv_cache_usage_ratio).toFixed(0)}% · decode step ${fmtMs(body.decode_step_ms)}`;
}

async function poll() {
  if (state.polling) return;
  state.polling = true;
  try {
    const body = await getJSON("/v1/soft/stats");
    renderStats(body, performance.now());
  } catch (e) {
    $("#live-summary").textContent =
      e.status === 401 ? "enter the API key to see the live stats" : e.message;
  }
  try {
    await refreshPlan();
  } finally {
    state.polling = false;
  }
}

// -- start-up ---------------------------------------------------------------------------------
async function connect() {
  let info;
  try {
    const resp = await fetch("/version");
    info = await resp.json();
  } catch (e) {
    $("#model-info").textContent = `cannot reach the server: ${e.message}`;
    setTimeout(connect, 2000);
    return;
  }
  if (!info.exits) {
    $("#model-info").textContent = `${info.model}: loading the model…`;
    setTimeout(connect, 1000);
    return;
  }
  Object.assign(state, {
    model: info.model,
    exits: info.exits,
    numLayers: info.num_layers,
    policy: info.policy,
    maxModelLen: info.max_model_len,
  });
  $("#model-info").textContent =
    `${info.model} · ${info.method} · ${info.num_layers} layers · exits ${info.exits.join(", ")} · ` +
    `policy ${info.policy} · default depth ${info.default_depth} · context ${info.max_model_len}`;
  const picks = info.exits.map((d) =>
    el("label", {}, el("input", { type: "checkbox", value: String(d), checked: "" }), ` ${d}`),
  );
  $("#exit-picks").replaceChildren("exits:", ...picks);
  for (const d of info.exits) state.history[d] = [];
  poll();
  setInterval(poll, POLL_MS);
}

let planTimer = null;
function planSoon() {
  clearTimeout(planTimer);
  $("#budget-value").textContent = fmtMs(sliderMs());
  planTimer = setTimeout(refreshPlan, 60);
}

$("#api-key").addEventListener("input", (e) => {
  state.key = e.target.value.trim();
  planSoon();
});
$("#run").addEventListener("click", runAll);
$("#stop").addEventListener("click", stopAll);
$("#send-budget").addEventListener("click", sendWithBudget);
$("#budget").addEventListener("input", planSoon);
$("#max-tokens").addEventListener("input", planSoon);
$("#prompt").addEventListener("input", planSoon);
for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", planSoon);
$("#prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) runAll();
});
connect();
