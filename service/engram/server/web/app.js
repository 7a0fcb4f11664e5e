// Engram chat page: the session id lives in localStorage, so a reload (or a restart of every replica)
// continues the same conversation. Each reply shows which replica served it and how it loaded history.
"use strict";

const SESSION_KEY = "engram.session_id";
const API_KEY = "engram.api_key";
const $ = (id) => document.getElementById(id);

function newId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sessionId() {
  let id = localStorage.getItem(SESSION_KEY);
  if (!id) {
    id = newId("web-");
    localStorage.setItem(SESSION_KEY, id);
  }
  return id;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(API_KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function addMessage(role, text, meta) {
  const item = document.createElement("li");
  item.className = "msg " + role;
  item.textContent = text;
  if (meta) {
    const line = document.createElement("span");
    line.className = "meta";
    line.dataset.servedBy = meta.served_by;
    line.dataset.cache = meta.cache;
    line.dataset.messages = String(meta.messages);
    line.dataset.api = meta.api;
    line.dataset.redisNode = meta.redis_node || "";
    line.append("via " + meta.api + " · served by " + meta.served_by);
    if (meta.redis_node) line.append(" · redis " + meta.redis_node);
    line.append(" · history ");
    const badge = document.createElement("span");
    badge.className = "badge " + meta.cache;
    badge.textContent = meta.cache;
    line.append(badge, " · " + meta.messages + " earlier messages");
    item.append(line);
  }
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error.code + ": " + body.error.message;  // both APIs' error bodies have code and message
  } catch {
    return "HTTP " + response.status;
  }
}

async function loadHistory() {
  $("messages").replaceChildren();
  let cursor = null;
  do {
    const query = "?limit=200" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "");
    const response = await fetch("/v1/sessions/" + encodeURIComponent(sessionId()) + "/messages" + query, {
      headers: headers(),
    });
    if (!response.ok) {
      $("status").textContent = "could not load history: " + (await errorText(response));
      if (response.status === 401) $("key-box").open = true;
      return;
    }
    const page = await response.json();
    for (const m of page.messages) addMessage(m.role === "user" ? "user" : "assistant", m.content);
    cursor = page.next;
  } while (cursor);
  $("status").textContent = $("messages").children.length ? "conversation restored from Redis" : "";
}

// The two APIs a turn can go through; both read and commit the same session's memory.
const APIS = {
  engram: {
    path: "/v1/chat",
    body: (text, turnId) => ({ session_id: sessionId(), message: text, turn_id: turnId }),
    headers: () => ({}),
    reply: (data) => ({
      text: data.reply, served_by: data.served_by, redis_node: data.redis_node,
      cache: data.history.cache, messages: data.history.messages,
    }),
  },
  openai: {
    path: "/v1/chat/completions",
    // The session's memory is put in front of this one message by the service: the page sends no history.
    body: (text) => ({ model: servedModel, messages: [{ role: "user", content: text }] }),
    headers: (turnId) => ({ "X-Engram-Session": sessionId(), "Idempotency-Key": turnId }),
    reply: (data, response) => ({
      text: data.choices[0].message.content,
      served_by: response.headers.get("X-Served-By"),
      redis_node: response.headers.get("X-Engram-Redis-Node"),
      cache: response.headers.get("X-Engram-Cache"),
      messages: response.headers.get("X-Engram-History-Messages"),
    }),
  },
};
let servedModel = "echo";

async function send(text) {
  const api = APIS[$("api").value] || APIS.engram;
  const turnId = newId("t-");
  const init = { method: "POST", headers: { ...headers(), ...api.headers(turnId) }, body: JSON.stringify(api.body(text, turnId)) };
  // A retry of the same turn id is safe: the service answers it once and stores it once.
  for (let attempt = 1; ; attempt++) {
    try {
      const response = await fetch(api.path, init);
      if (response.ok) return { ok: true, data: { ...api.reply(await response.json(), response), api: api.path } };
      if (response.status !== 503 || attempt >= 3) return { ok: false, text: await errorText(response), status: response.status };
    } catch (error) {
      if (attempt >= 3) return { ok: false, text: String(error) };
    }
    await new Promise((resolve) => setTimeout(resolve, 500 * attempt));
  }
}

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text) return;
  $("message").value = "";
  $("send").disabled = true;
  $("status").textContent = "…";
  addMessage("user", text);
  const result = await send(text);
  if (result.ok) {
    const d = result.data;
    addMessage("assistant", d.text, d);
    $("status").textContent = "";
  } else {
    addMessage("error", result.text);
    $("status").textContent = "";
    if (result.status === 401) $("key-box").open = true;
  }
  $("send").disabled = false;
  $("message").focus();
});

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("new-session").addEventListener("click", () => {
  localStorage.setItem(SESSION_KEY, newId("web-"));
  $("session-id").textContent = sessionId();
  loadHistory();
});

// `make run` prints a page URL ending in #key=<api key>: keep the key, then drop it from the address bar.
// (A fragment never reaches the server, so the key is in no request line or access log.)
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("key")) {
  localStorage.setItem(API_KEY, fragment.get("key"));
  history.replaceState(null, "", location.pathname + location.search);
}

$("api-key").value = localStorage.getItem(API_KEY) || "";
$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(API_KEY, key);
  else localStorage.removeItem(API_KEY);
  loadHistory();
});

// The API choice is kept like the session; the OpenAI-compatible API needs the served model's id.
const API_CHOICE = "engram.api";
async function loadModel() {
  if ($("api").value !== "openai") return;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.ok) servedModel = (await response.json()).data[0].id;
  } catch {
    // keep the default: a failed turn then says what is wrong
  }
}
$("api").value = localStorage.getItem(API_CHOICE) || "engram";
$("api").addEventListener("change", () => {
  localStorage.setItem(API_CHOICE, $("api").value);
  loadModel();
});

$("session-id").textContent = sessionId();
loadModel();
loadHistory();
