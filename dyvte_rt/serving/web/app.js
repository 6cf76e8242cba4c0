// dyvte-rt's web page: one conversation about one image, answers streamed from
// /v1/chat/completions, and for each answer where the image left the model (the server's `dyvte`
// extension fields). Talks to this server alone; no library, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const state = {
  model: null,
  info: { layers: 0, exit_layers: [], routers: false, default_exit: "never", threshold: 0.5, prune_layers: [] },
  image: null, // the chosen image as a data: URI
  turns: [], // the conversation so far, as OpenAI messages
  busy: false,
  key: sessionStorage.getItem("dyvte-api-key") || "",
};

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (response.status === 401) $("key-row").hidden = false;
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function option(select, value, label) {
  const item = document.createElement("option");
  item.value = value;
  item.textContent = label;
  select.append(item);
}

async function loadModel() {
  const response = await api("/v1/models");
  if (!response.ok) {
    showError(await errorText(response));
    return;
  }
  const entry = (await response.json()).data[0];
  state.model = entry.id;
  Object.assign(state.info, entry.dyvte || {});
  const info = state.info;
  $("model-name").textContent = `${entry.id} · ${info.family} · ${info.layers} layers`;
  const select = $("exit-policy");
  select.replaceChildren();
  option(select, "", `bundle default (${info.default_exit})`);
  option(select, "never", "never");
  if (info.routers) option(select, "router", "router");
  for (const layer of info.exit_layers) option(select, `layer:${layer}`, `after layer ${layer}`);
  $("threshold").value = info.threshold;
  $("prune-row").hidden = info.prune_layers.length === 0;
  $("prune").placeholder = `default: ${info.default_prune}`;
  updateThreshold();
}

function routerChosen() {
  const value = $("exit-policy").value;
  return value === "router" || (value === "" && state.info.default_exit === "router");
}

function updateThreshold() {
  $("threshold-row").hidden = !routerChosen();
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
}

async function pollHealth() {
  let text;
  try {
    const health = await (await fetch("/health")).json();
    text = health.status === "ok"
      ? `batch slots ${health.active}/${health.slots} busy · queue ${health.queued}/${health.max_queue}`
      : health.reason;
    const metrics = await fetch("/metrics", { headers: headers(false) });
    if (metrics.ok) {
      const served = (await metrics.text()).split("\n")
        .filter((line) => line.startsWith("dyvte_requests_total{"))
        .reduce((sum, line) => sum + Number(line.split(" ").pop()), 0);
      text += ` · ${served} ${served === 1 ? "request" : "requests"} served`;
    }
  } catch {
    text = "the server does not answer";
  }
  $("server-state").textContent = text;
  setTimeout(pollHealth, 2000);
}

function chooseImage(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("preview").src = reader.result;
    $("preview").hidden = false;
    $("drop-hint").textContent = `${file.name} · a new image starts a new conversation`;
    reset();
  };
  reader.readAsDataURL(file);
}

function reset() {
  state.turns = [];
  $("conversation").replaceChildren();
  hideError();
}

function turnElement(role, text) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  turn.append(body);
  $("conversation").append(turn);
  return turn;
}

function stat(parent, label, value, name) {
  const item = document.createElement("span");
  item.dataset.stat = name;
  item.append(`${label} `);
  const strong = document.createElement("b");
  strong.textContent = value;
  item.append(strong);
  parent.append(item);
}

function svg(name, attributes, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  parent.append(node);
  return node;
}

// p(exit) of each router asked, per layer, against the threshold; the exit layer in red
function chart(dyvte) {
  const layers = state.info.layers || 1;
  const width = 32 + layers * 28, height = 110, top = 8, base = 88;
  const root = document.createElementNS(SVG, "svg");
  root.setAttribute("class", "chart");
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("width", Math.min(width, 520));
  root.setAttribute("role", "img");
  svg("line", { x1: 28, y1: base, x2: width, y2: base, stroke: "#aab3bd" }, root);
  svg("text", { x: 0, y: top + 8 }, root).textContent = "p=1";
  svg("text", { x: 0, y: base }, root).textContent = "0";
  const probs = dyvte.exit_probs || {};
  for (let layer = 0; layer < layers; layer += 1) {
    const x = 32 + layer * 28;
    svg("text", { x: x + 6, y: base + 14 }, root).textContent = String(layer);
    if (!(String(layer) in probs)) continue;
    const p = probs[String(layer)];
    const h = Math.max(1, p * (base - top));
    const bar = svg("rect", {
      x, y: base - h, width: 20, height: h,
      fill: layer === dyvte.exit_layer ? "#d1242f" : "#1f6feb",
      "data-layer": layer, "data-p": p.toFixed(4),
    }, root);
    svg("title", {}, bar).textContent = `layer ${layer}: p(exit) = ${p.toFixed(3)}`;
  }
  if (dyvte.threshold !== null && dyvte.threshold !== undefined) {
    const y = base - dyvte.threshold * (base - top);
    svg("line", { x1: 28, y1: y, x2: width, y2: y, stroke: "#d1242f", "stroke-dasharray": "4 3", class: "threshold" }, root);
  }
  if (Object.keys(probs).length === 0) {
    svg("text", { x: 34, y: top + 20 }, root).textContent = "no router asked (this policy does not use them)";
  }
  return root;
}

function renderStats(turn, dyvte, clientTtft) {
  const stats = document.createElement("div");
  stats.className = "stats";
  const exit = dyvte.exit_layer === null ? "none: every layer saw the image" : `after layer ${dyvte.exit_layer}`;
  stat(stats, "exit", exit, "exit-layer");
  stat(stats, "visual tokens kept", `${dyvte.visual_tokens_kept} of ${dyvte.visual_tokens}`, "visual-kept");
  stat(stats, "prefill multiply-adds saved", `${(100 * dyvte.prefill_macs_saved).toFixed(1)}%`, "macs-saved");
  stat(stats, "TTFT", `${Math.round(dyvte.ttft_ms)} ms (here ${Math.round(clientTtft)} ms)`, "ttft");
  if (dyvte.tokens_per_s !== null) stat(stats, "decode", `${dyvte.tokens_per_s.toFixed(1)} tok/s`, "tokens-per-s");
  stat(stats, "policy", dyvte.policy, "policy");
  turn.append(stats, chart(dyvte));
}

function requestBody(question) {
  const first = state.turns.length === 0;
  const content = first && state.image
    ? [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text: question }]
    : question;
  const body = {
    model: state.model,
    messages: [...state.turns, { role: "user", content }],
    stream: true,
    max_tokens: Number($("max-tokens").value) || 64,
  };
  if ($("exit-policy").value) body.exit = $("exit-policy").value;
  if (routerChosen()) body.exit_threshold = Number($("threshold").value);
  if (!$("prune-row").hidden && $("prune").value.trim()) body.prune = $("prune").value.trim();
  return body;
}

// Server-sent events from a fetch body: each `data:` line as parsed JSON, until [DONE]
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("ask").disabled = busy;
}

async function ask(question) {
  if (question === "/reset") {
    reset();
    return;
  }
  if (!question || state.busy) return;
  hideError();
  const body = requestBody(question);
  const userTurn = turnElement("user", question);
  const answerTurn = turnElement("assistant", "");
  answerTurn.querySelector(".text").classList.add("answer");
  const started = performance.now();
  let clientTtft = null, text = "", dyvte = null;
  setBusy(true);
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body) });
    if (!response.ok) {
      userTurn.remove();
      answerTurn.remove();
      showError(await errorText(response));
      return;
    }
    for await (const event of events(response)) {
      if (event.error) {
        showError(event.error.message);
        break;
      }
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        clientTtft = clientTtft === null ? performance.now() - started : clientTtft;
        text += delta.content;
        answerTurn.querySelector(".text").textContent = text;
      }
      if (event.dyvte) dyvte = event.dyvte;
    }
    state.turns.push(body.messages[body.messages.length - 1], { role: "assistant", content: text });
    if (dyvte) renderStats(answerTurn, dyvte, clientTtft === null ? performance.now() - started : clientTtft);
  } catch (err) {
    showError(`the request failed: ${err.message || err}`);
  } finally {
    setBusy(false);
  }
}

function wire() {
  const drop = $("drop");
  $("image-file").addEventListener("change", (event) => chooseImage(event.target.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseImage(event.dataTransfer.files[0]);
  });
  $("exit-policy").addEventListener("change", updateThreshold);
  $("threshold").addEventListener("input", updateThreshold);
  $("api-key").addEventListener("change", (event) => {
    state.key = event.target.value;
    sessionStorage.setItem("dyvte-api-key", state.key);
    hideError();
    loadModel();
  });
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    $("question").value = "";
    ask(question);
  });
  $("reset").addEventListener("click", reset);
}

wire();
loadModel();
pollHealth();
