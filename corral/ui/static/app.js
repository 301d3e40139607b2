// Corral's chat page. It talks only to the server's public, OpenAI-shaped API, as the `openai` SDK does:
//   /v1/models                 the model picker (llm models)
//   /v1/chat/completions       streamed chat (SSE), with images as image_url data-URL parts
//   /v1/responses              chat over uploaded documents (the file_search tool, with citations)
//   /v1/files, /v1/vector_stores  document upload and indexing
//   /v1/conversations          every chat is saved as a conversation and can be resumed
//   /v1/shields, /v1/moderations  the shield toggle
// A feature whose route is missing (404/501) or whose model is absent is switched off with a message
// on the page. Model text is rendered by markdown.js, which escapes it before adding any markup.

import { escapeHtml, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const store = {
  get: (key, fallback) => JSON.parse(localStorage.getItem(`corral.${key}`) ?? "null") ?? fallback,
  set: (key, value) => localStorage.setItem(`corral.${key}`, JSON.stringify(value)),
};

const state = {
  models: [],          // llm entries of /v1/models
  history: [],         // this chat's messages, in the chat/completions shape (system prompt excluded)
  conversationId: null,
  images: [],          // data URLs attached to the next message
  controller: null,    // the AbortController of the reply being streamed (the stop button aborts it)
  documents: [],       // {id, filename, status} in the page's vector store
  vectorStoreId: store.get("vectorStore", null),
  shields: [],
  features: { conversations: true, responses: true, files: true },
};

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
  // The server lacks the feature: no such route, a route whose API is not configured, or 501.
  get missingRoute() {
    return this.status === 501 ||
      this.status === 404 && (/^no route/.test(this.message) || this.code === "not_configured");
  }
}

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = store.get("apiKey", "");
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`, code = null;
  try {
    const body = await res.json();
    message = body?.error?.message || body?.detail || message;
    code = body?.error?.code ?? null;
  } catch { /* not JSON: keep the status line */ }
  if (res.status === 401) message += " — enter the server's API key under Settings";
  return new ApiError(res.status, message, code);
}

async function api(path, { method = "GET", body, form, signal } = {}) {
  const res = await fetch(path, {
    method, signal,
    headers: headers(!form),
    body: form ?? (body === undefined ? undefined : JSON.stringify(body)),
  });
  if (!res.ok) throw await errorOf(res);
  return res.status === 204 ? null : res.json();
}

// Server-Sent Events from a fetch response: yields {event, data} with data as text.
async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const raw = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of raw.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Page messages

function notice(text, kind = "info") {
  const el = $("notice");
  el.textContent = text;
  el.className = kind;
  el.hidden = !text;
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function addMessage(role, text = "", images = []) {
  $("empty")?.remove();
  const el = document.createElement("div");
  el.className = `message ${role}`;
  el.dataset.role = role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? currentModel() || "Assistant" : role;
  const body = document.createElement("div");
  body.className = "body";
  el.append(who);
  for (const url of images) {
    if (!/^data:image\//.test(url)) continue;
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = "attached image";
    img.src = url;
    el.append(img);
  }
  el.append(body);
  $("messages").append(el);
  const msg = { el, body, text: "", set(t) {
    this.text = t;
    // escaped first, then our markup only (markdown.js); user text is shown as plain text
    if (role === "assistant") body.innerHTML = renderMarkdown(t) || '<span class="cursor"></span>';
    else body.textContent = t;
    scrollDown();
  } };
  msg.set(text);
  return msg;
}

// A tool call and its result, shown as such (a collapsible block under the reply).
function addToolBlock(parent, title, args, result) {
  const box = document.createElement("details");
  box.className = "tool";
  box.open = true;
  const summary = document.createElement("summary");
  summary.textContent = title;
  box.append(summary);
  const argsPre = document.createElement("pre");
  argsPre.className = "tool-args";
  argsPre.textContent = args ?? "";
  box.append(argsPre);
  const resultEl = document.createElement("div");
  resultEl.className = "tool-result";
  box.append(resultEl);
  parent.el.insertBefore(box, parent.body);
  const block = {
    box,
    setArgs: (text) => { argsPre.textContent = text; },
    setResult: (text) => { resultEl.textContent = text; },
  };
  if (result) block.setResult(result);
  return block;
}

function addCitations(msg, annotations) {
  const cited = [];
  for (const a of annotations) {
    const name = a.filename || a.file_id;
    if (a.type === "file_citation" && name && !cited.includes(name)) cited.push(name);
  }
  if (!cited.length) return;
  const box = document.createElement("div");
  box.className = "citations";
  box.append("Sources: ");
  cited.forEach((name, i) => {
    const tag = document.createElement("span");
    tag.className = "citation";
    tag.textContent = `[${i + 1}] ${name}`;
    box.append(tag);
  });
  msg.el.append(box);
}

function addUsage(msg, usage, extra = "") {
  if (!usage) return;
  const inTok = usage.prompt_tokens ?? usage.input_tokens;
  const outTok = usage.completion_tokens ?? usage.output_tokens;
  const el = document.createElement("div");
  el.className = "usage";
  el.textContent = `${inTok} tokens in, ${outTok} out${extra}`;
  msg.el.append(el);
}

// ---------------------------------------------------------------------------------------------
// Models and settings

function currentModel() {
  return $("model").value;
}

function modelEntry(id = currentModel()) {
  return state.models.find((m) => m.id === id);
}

// Vision: the model says so in its metadata, or it is a Llama 3.2 Vision model by name.
function hasVision(entry) {
  const meta = entry?.custom_metadata ?? {};
  if (typeof meta.vision === "boolean") return meta.vision;
  if (typeof meta.supports_images === "boolean") return meta.supports_images;
  return /vision/i.test(entry?.id ?? "");
}

async function loadModels() {
  try {
    const { data } = await api("/v1/models");
    // Guard models classify, they do not chat: they are offered as shields, not in the picker.
    const guards = new Set(state.shields.flatMap((s) => [s.identifier, s.provider_resource_id]));
    state.models = data.filter((m) => (m.custom_metadata?.model_type ?? "llm") === "llm" && !guards.has(m.id) &&
      !/llama-guard/i.test(m.id));
  } catch (e) {
    notice(`Cannot list models: ${e.message}`, "error");
    return;
  }
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  const saved = store.get("model", null);
  if (saved && state.models.some((m) => m.id === saved)) select.value = saved;
  if (!state.models.length) notice("This server serves no chat models.", "error");
  showModelInfo();
}

function showModelInfo() {
  const m = modelEntry();
  const meta = m?.custom_metadata ?? {};
  const parts = [];
  if (meta.context_length) parts.push(`context ${meta.context_length}`);
  parts.push(hasVision(m) ? "vision" : "text only");
  if (meta.provider_id) parts.push(`provider ${meta.provider_id}`);
  $("model-info").textContent = m ? parts.join(" · ") : "";
}

function sampling() {
  const num = (id) => {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v : undefined;
  };
  return { temperature: num("temperature"), top_p: num("top-p"), max_tokens: num("max-tokens") };
}

function saveSettings() {
  store.set("settings", {
    system: $("system").value, temperature: $("temperature").value, topP: $("top-p").value,
    maxTokens: $("max-tokens").value, shieldOn: $("shield-on").checked, shield: $("shield").value,
  });
}

function restoreSettings() {
  const s = store.get("settings", {});
  if (s.system !== undefined) $("system").value = s.system;
  if (s.temperature) $("temperature").value = s.temperature;
  if (s.topP) $("top-p").value = s.topP;
  if (s.maxTokens) $("max-tokens").value = s.maxTokens;
  $("api-key").value = store.get("apiKey", "");
}

// ---------------------------------------------------------------------------------------------
// Shields

async function loadShields() {
  $("shield-status").textContent = "";
  try {
    const { data } = await api("/v1/shields");
    state.shields = data;
  } catch (e) {
    state.shields = [];
    $("shield-status").textContent = e.missingRoute ? "This server has no Safety API." : `Shields: ${e.message}`;
  }
  const select = $("shield");
  select.replaceChildren(...state.shields.map((s) => new Option(s.identifier, s.identifier)));
  const on = $("shield-on");
  if (!state.shields.length) {
    on.checked = false;
    on.disabled = true;
    select.disabled = true;
    if (!$("shield-status").textContent) {
      $("shield-status").textContent = "No shields on this server (serve a Llama Guard model to enable one).";
    }
    return;
  }
  const s = store.get("settings", {});
  if (s.shield && state.shields.some((x) => x.identifier === s.shield)) select.value = s.shield;
  on.disabled = false;
  on.checked = !!s.shieldOn;
  select.disabled = !on.checked;
}

// null when the text passes (or no shield is on), else why it was flagged.
async function shieldVerdict(text) {
  if (!$("shield-on").checked || !text.trim()) return null;
  const shield = $("shield").value;
  const { results } = await api("/v1/moderations", { method: "POST", body: { input: text, model: shield } });
  const r = results?.[0];
  if (!r?.flagged) return null;
  const categories = Object.entries(r.categories ?? {}).filter(([, v]) => v).map(([k]) => k);
  return `${shield} flagged this${categories.length ? ` (${categories.join(", ")})` : ""}`;
}

// ---------------------------------------------------------------------------------------------
// Conversations (the Conversations API has no list route: the page remembers the ids it created)

function savedConversations() {
  return store.get("conversations", []);
}

async function refreshConversations() {
  const list = $("conversations");
  const kept = [];
  for (const c of savedConversations()) {
    try {
      const conv = await api(`/v1/conversations/${encodeURIComponent(c.id)}`);
      kept.push({ ...c, title: conv.metadata?.title || c.title });
    } catch (e) {
      if (e.missingRoute) {
        state.features.conversations = false;
        $("conversations-status").textContent = "This server has no Conversations API: chats are not saved.";
        return;
      }
      if (e.status !== 404) kept.push(c); // gone (404): forget it; otherwise keep it for later
    }
  }
  store.set("conversations", kept);
  list.replaceChildren(...kept.map((c) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "conversation" + (c.id === state.conversationId ? " active" : "");
    button.dataset.id = c.id;
    button.textContent = c.title || c.id;
    button.title = new Date(c.updated * 1000).toLocaleString();
    button.addEventListener("click", () => resumeConversation(c.id));
    li.append(button);
    return li;
  }));
  $("conversations-status").textContent = kept.length ? "" : "No saved chats yet.";
}

async function ensureConversation(title) {
  if (state.conversationId || !state.features.conversations) return state.conversationId;
  try {
    const conv = await api("/v1/conversations", { method: "POST", body: { metadata: { title: title.slice(0, 60) } } });
    state.conversationId = conv.id;
    store.set("conversations", [{ id: conv.id, title: title.slice(0, 60), updated: conv.created_at },
      ...savedConversations()]);
    await refreshConversations();
  } catch (e) {
    if (e.missingRoute) state.features.conversations = false;
    $("conversations-status").textContent = `Chats are not saved: ${e.message}`;
  }
  return state.conversationId;
}

async function saveTurn(userContent, answer) {
  if (!state.conversationId) return;
  const items = [{ type: "message", role: "user", content: userContent },
    { type: "message", role: "assistant", content: [{ type: "output_text", text: answer }] }];
  try {
    await api(`/v1/conversations/${state.conversationId}/items`, { method: "POST", body: { items } });
    touchConversation();
  } catch (e) {
    $("conversations-status").textContent = `This turn was not saved: ${e.message}`;
  }
}

function touchConversation() {
  const list = savedConversations();
  const c = list.find((x) => x.id === state.conversationId);
  if (c) c.updated = Math.floor(Date.now() / 1000);
  store.set("conversations", list);
}

function itemText(content) {
  if (typeof content === "string") return content;
  return (content ?? []).filter((p) => /text/.test(p.type)).map((p) => p.text).join("");
}

async function resumeConversation(id) {
  if (state.controller) return;
  let items = [];
  try {
    for (let after = null, more = true; more;) {
      const q = new URLSearchParams({ order: "asc", limit: "100", ...(after ? { after } : {}) });
      const page = await api(`/v1/conversations/${encodeURIComponent(id)}/items?${q}`);
      items.push(...page.data);
      more = page.has_more && page.data.length > 0;
      after = page.last_id;
    }
  } catch (e) {
    notice(`Cannot open that conversation: ${e.message}`, "error");
    return;
  }
  newChat(false);
  state.conversationId = id;
  for (const item of items) showItem(item);
  await refreshConversations();
  notice("");
}

// One conversation item on the page (and in the history sent with the next message).
let lastAssistant = null;
function showItem(item) {
  if (item.type === "message") {
    const text = itemText(item.content);
    const images = (Array.isArray(item.content) ? item.content : [])
      .filter((p) => p.type === "input_image").map((p) => p.image_url);
    const role = item.role === "assistant" ? "assistant" : item.role === "user" ? "user" : null;
    if (!role) return;
    const msg = addMessage(role, text, images);
    if (role === "assistant") {
      lastAssistant = msg;
      addCitations(msg, (item.content ?? []).flatMap((p) => p.annotations ?? []));
    }
    state.history.push(role === "user" && images.length ? { role, content: userParts(text, images) } : { role, content: text });
  } else if (/_call$/.test(item.type) || item.type === "function_call_output") {
    const host = lastAssistant ?? addMessage("assistant", "");
    lastAssistant = host;
    const title = toolTitle(item);
    addToolBlock(host, title, item.arguments ?? (item.queries ?? []).join("\n"),
      item.output ?? formatResults(item.results));
  }
}

function toolTitle(item) {
  if (item.type === "function_call") return `Tool call: ${item.name}`;
  if (item.type === "function_call_output") return "Tool result";
  return `Tool call: ${item.type.replace(/_call$/, "")}`;
}

function formatResults(results) {
  if (!results) return "";
  return results.map((r) => `${r.filename ?? r.file_id} (score ${Number(r.score ?? 0).toFixed(2)}): ${(r.text ?? "").slice(0, 200)}`).join("\n");
}

// ---------------------------------------------------------------------------------------------
// Documents: upload -> a file -> the page's vector store -> indexed (polled until done)

async function ensureVectorStore() {
  if (state.vectorStoreId) return state.vectorStoreId;
  const vs = await api("/v1/vector_stores", { method: "POST", body: { name: "corral-ui documents" } });
  state.vectorStoreId = vs.id;
  store.set("vectorStore", vs.id);
  return vs.id;
}

async function uploadDocument(file) {
  const entry = { id: null, filename: file.name, status: "uploading" };
  state.documents.push(entry);
  renderDocuments();
  try {
    const form = new FormData();
    form.append("purpose", "assistants");
    form.append("file", file, file.name);
    const uploaded = await api("/v1/files", { method: "POST", form });
    entry.id = uploaded.id;
    entry.status = "indexing";
    renderDocuments();
    const vs = await ensureVectorStore();
    let vf = await api(`/v1/vector_stores/${vs}/files`, { method: "POST", body: { file_id: uploaded.id } });
    while (vf.status === "in_progress") {
      await new Promise((r) => setTimeout(r, 500));
      vf = await api(`/v1/vector_stores/${vs}/files/${uploaded.id}`);
    }
    entry.status = vf.status === "completed" ? "ready" : `failed: ${vf.last_error?.message ?? vf.status}`;
  } catch (e) {
    entry.status = `failed: ${e.message}`;
    if (e.missingRoute) documentsUnavailable(e);
  }
  renderDocuments();
}

function documentsUnavailable(err) {
  state.features.files = false;
  $("docs-status").textContent = `Documents are unavailable on this server: ${err.message}`;
  $("doc-input").disabled = true;
  $("doc-input").parentElement.classList.add("disabled");
}

async function loadDocuments() {
  if (!state.vectorStoreId) {
    try { // find out now, not at the first upload, whether this server has vector stores at all
      await api("/v1/vector_stores?limit=1");
    } catch (e) {
      if (e.missingRoute) documentsUnavailable(e);
    }
    return renderDocuments();
  }
  try {
    const { data } = await api(`/v1/vector_stores/${state.vectorStoreId}/files?limit=100`);
    state.documents = await Promise.all(data.map(async (vf) => {
      let filename = vf.id;
      try { filename = (await api(`/v1/files/${vf.id}`)).filename; } catch { /* keep the id */ }
      return { id: vf.id, filename, status: vf.status === "completed" ? "ready" : vf.status };
    }));
  } catch (e) {
    if (e.status === 404 && !e.missingRoute) { // the store is gone (another server, or deleted)
      state.vectorStoreId = null;
      store.set("vectorStore", null);
    } else if (e.missingRoute) {
      documentsUnavailable(e);
    }
  }
  renderDocuments();
}

function renderDocuments() {
  $("documents").replaceChildren(...state.documents.map((d) => {
    const li = document.createElement("li");
    li.className = "document";
    li.dataset.status = d.status.split(":")[0];
    li.textContent = `${d.filename} — ${d.status}`;
    return li;
  }));
  const ready = state.documents.some((d) => d.status === "ready");
  const box = $("use-docs");
  box.disabled = !ready;
  if (ready && !box.dataset.touched) box.checked = true;
  if (!ready) box.checked = false;
}

// ---------------------------------------------------------------------------------------------
// Sending a message

function userParts(text, images) {
  return [{ type: "text", text }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))];
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

async function send(event) {
  event?.preventDefault();
  const text = $("prompt").value.trim();
  const images = state.images.slice();
  if ((!text && !images.length) || state.controller) return;
  if (!currentModel()) return notice("No model to send to.", "error");
  notice("");
  $("prompt").value = "";
  clearAttachments();
  state.controller = new AbortController();
  setBusy(true);
  const user = addMessage("user", text, images);
  try {
    const blocked = await shieldVerdict(text);
    if (blocked) {
      user.el.classList.add("flagged");
      addMessage("assistant", `*Not sent: ${blocked}.*`).el.classList.add("refusal");
      return;
    }
    const useDocs = $("use-docs").checked && state.features.responses && state.vectorStoreId;
    if (useDocs) {
      await ensureConversation(text); // the response itself is stored into the conversation
      await replyFromDocuments(text);
    } else {
      await replyWithChat(text, images); // saved once answered: a failed reply leaves no empty conversation
    }
  } catch (e) {
    notice(e.message, "error");
  } finally {
    state.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

// /v1/chat/completions, streamed: content deltas render as Markdown, tool-call deltas as tool blocks.
async function replyWithChat(text, images) {
  const content = images.length ? userParts(text, images) : text;
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history,
    { role: "user", content }];
  const reply = addMessage("assistant");
  const calls = [];
  let answer = "", usage = null, finish = null;
  const started = performance.now();
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({ model: currentModel(), messages, stream: true, stream_options: { include_usage: true },
        ...sampling() }),
    });
    if (!res.ok) throw await errorOf(res);
    for await (const { data } of events(res)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      usage = chunk.usage ?? usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      finish = choice.finish_reason ?? finish;
      if (choice.delta?.content) reply.set(answer += choice.delta.content);
      for (const tc of choice.delta?.tool_calls ?? []) toolDelta(reply, calls, tc);
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      reply.el.remove();
      if (/does not accept images/.test(e.message)) {
        throw new Error(`${currentModel()} has no vision: ${e.message}`);
      }
      throw e;
    }
    reply.el.classList.add("stopped");
    finish = "stopped";
  }
  reply.set(answer);
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  addUsage(reply, usage, ` · ${seconds} s`);
  if (finish === "stopped") addStopped(reply);
  state.history.push({ role: "user", content });
  state.history.push(calls.length ? { role: "assistant", content: answer || null, tool_calls: calls.map((c) => c.call) }
    : { role: "assistant", content: answer });
  const saved = [{ type: "input_text", text }, ...images.map((url) => ({ type: "input_image", image_url: url }))];
  await ensureConversation(text || "image");
  await saveTurn(saved, answer);
}

function addStopped(reply) {
  const el = document.createElement("div");
  el.className = "stopped-note";
  el.textContent = "Stopped.";
  reply.el.append(el);
}

function toolDelta(reply, calls, tc) {
  const i = tc.index ?? 0;
  if (!calls[i]) {
    calls[i] = { call: { id: tc.id, type: "function", function: { name: tc.function?.name ?? "", arguments: "" } } };
    calls[i].block = addToolBlock(reply, `Tool call: ${calls[i].call.function.name}`, "");
    calls[i].block.setResult("(the page runs no tools: the call is shown, not executed)");
  }
  calls[i].call.function.arguments += tc.function?.arguments ?? "";
  calls[i].block.setArgs(calls[i].call.function.arguments);
}

// /v1/responses with the file_search tool over the page's vector store; the conversation stores the turn.
async function replyFromDocuments(text) {
  const reply = addMessage("assistant");
  const blocks = {};
  let answer = "", usage = null;
  const system = $("system").value.trim();
  const { temperature, top_p, max_tokens } = sampling();
  const body = {
    model: currentModel(), input: [{ role: "user", content: [{ type: "input_text", text }] }], stream: true,
    // "required": the first turn searches the documents (a small model may not choose to); later turns are free
    tools: [{ type: "file_search", vector_store_ids: [state.vectorStoreId] }], tool_choice: "required",
    include: ["file_search_call.results"], temperature, top_p, max_output_tokens: max_tokens,
    ...(system ? { instructions: system } : {}),
    ...(state.conversationId ? { conversation: state.conversationId } : {}),
  };
  try {
    const res = await fetch("/v1/responses", {
      method: "POST", headers: headers(), signal: state.controller.signal, body: JSON.stringify(body),
    });
    if (!res.ok) {
      const err = await errorOf(res);
      if (err.missingRoute) {
        state.features.responses = false;
        $("use-docs").checked = false;
        $("docs-status").textContent = "This server has no Responses API: answers cannot use documents.";
      }
      throw err;
    }
    for await (const { data } of events(res)) {
      const ev = JSON.parse(data);
      if (ev.type === "response.output_text.delta") reply.set(answer += ev.delta);
      else if (ev.type === "response.output_item.added" && ev.item.type !== "message") {
        blocks[ev.item.id] = addToolBlock(reply, toolTitle(ev.item), (ev.item.queries ?? []).join("\n") || "…");
      } else if (ev.type === "response.output_item.done") {
        const item = ev.item;
        if (item.type === "message") addCitations(reply, (item.content ?? []).flatMap((p) => p.annotations ?? []));
        else if (blocks[item.id]) {
          blocks[item.id].setArgs(item.arguments ?? (item.queries ?? []).join("\n"));
          blocks[item.id].setResult(formatResults(item.results) || item.output || item.status || "");
        }
      } else if (ev.type === "response.completed" || ev.type === "response.incomplete") {
        usage = ev.response?.usage;
      } else if (ev.type === "response.failed" || ev.type === "error") {
        throw new ApiError(500, ev.response?.error?.message ?? ev.message ?? "the response failed");
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      reply.el.remove();
      throw e;
    }
    addStopped(reply);
  }
  reply.set(answer);
  addUsage(reply, usage, " · from your documents");
  state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  touchConversation();
}

// ---------------------------------------------------------------------------------------------
// Images

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attachImage(file) {
  const entry = modelEntry();
  if (!hasVision(entry)) {
    notice(`${currentModel()} has no vision: it cannot read images. Pick a vision model ` +
      "(e.g. Llama-3.2-11B-Vision-Instruct) to send one. The image was not attached.", "warning");
    return;
  }
  state.images.push(await readDataUrl(file));
  renderAttachments();
}

function renderAttachments() {
  $("attachments").replaceChildren(...state.images.map((url, i) => {
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = `attachment ${i + 1}`;
    img.src = url;
    img.title = "click to remove";
    img.addEventListener("click", () => { state.images.splice(i, 1); renderAttachments(); });
    return img;
  }));
}

function clearAttachments() {
  state.images = [];
  renderAttachments();
}

// ---------------------------------------------------------------------------------------------
// Wiring

function newChat(clearNotice = true) {
  state.history = [];
  state.conversationId = null;
  lastAssistant = null;
  const empty = document.createElement("div");
  empty.id = "empty";
  empty.className = "empty";
  empty.textContent = "Ask anything. Answers stream from this server's own model.";
  $("messages").replaceChildren(empty);
  if (clearNotice) notice("");
  for (const b of document.querySelectorAll(".conversation")) b.classList.remove("active");
}

function wire() {
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", () => newChat());
  $("model").addEventListener("change", () => {
    store.set("model", currentModel());
    showModelInfo();
  });
  $("image-input").addEventListener("change", async (e) => {
    for (const f of e.target.files) await attachImage(f);
    e.target.value = "";
  });
  $("doc-input").addEventListener("change", async (e) => {
    const files = [...e.target.files];
    e.target.value = "";
    await Promise.all(files.map(uploadDocument));
  });
  $("use-docs").addEventListener("change", (e) => { e.target.dataset.touched = "1"; });
  $("shield-on").addEventListener("change", () => {
    $("shield").disabled = !$("shield-on").checked;
    saveSettings();
  });
  for (const id of ["system", "temperature", "top-p", "max-tokens", "shield"]) $(id).addEventListener("change", saveSettings);
  $("save-key").addEventListener("click", async () => {
    store.set("apiKey", $("api-key").value.trim());
    notice("API key saved in this browser.");
    await start();
  });
}

async function start() {
  await loadShields();
  await loadModels();
  await Promise.all([refreshConversations(), loadDocuments()]);
  document.body.dataset.ready = "1"; // for the browser tests: the page has loaded what it needs
}

restoreSettings();
wire();
start();

// Exposed for the console and the tests.
window.corral = { state, renderMarkdown, escapeHtml };
