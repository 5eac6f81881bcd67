// The chat page's script: streams replies over SSE from POST chat_stream, and keeps the
// conversation in step with the server's session (get_history, clear_context, new_chat).
// Every text from the model or the user is inserted as text, never as markup (messages.js
// shows a user's text as typed and a reply as markdown built node by node).
import { createConversation, fitHeight } from "./messages.js";

const options = Object.assign(
  {
    title: "chatstream-asgi",
    placeholder: "Message",
    greeting: "",
    chat_path: "chat_stream",
    model: "",
    system_prompt: false, // whether the server takes a chat's system text (its allow_system_prompt)
  },
  JSON.parse(document.getElementById("chatstream-options").textContent || "{}")
);
const PARAM_FIELDS = ["temperature", "top_k", "top_p", "max_new_tokens"];
// A conversation another turn still holds (409 session_busy: that turn is running, or the
// replica that ran it stopped mid-turn and its lock frees within seconds) is waited for:
// Retry-After seconds at a time (1 if it names none, at most BUSY_WAIT_MAX_S), for BUSY_LIMIT_S
// at most from the first refusal; after that the refusal is shown as any other error.
const BUSY_WAIT_MAX_S = 10;
const BUSY_LIMIT_S = 30;
const BUSY_NOTE = "Waiting for the previous reply to finish\u2026";
// Per page path: two chat pages mounted on one host keep their own system prompts.
const SYSTEM_KEY = "chatstream-asgi.system:" + location.pathname;
const $ = (id) => document.getElementById(id);
const input = $("input");
const sendButton = $("send");
const stopButton = $("stop");
const regenerateButton = $("regenerate");
const clearButton = $("clear");
const newChatButton = $("new-chat");
const statusLine = $("status");
const settingsForm = $("settings");
const settingsToggle = $("settings-toggle");
const confirmDialog = $("confirm");

const conversation = createConversation($("log"), $("empty"), {
  feedback: (messageId, isLike) => request("set_feedback", { message_id: messageId, is_like: isLike }),
  edit: (text) => converse(text, "edit"),
});

let busy = false;
let ready = false; // until the history has loaded, a sent message could be wiped by it
let controller = null; // aborts the running chat request (Stop), or a wait to clear
// The last turn, if its reply was cut off: {mode, text, messageId}. The server kept that turn
// only if it went on after the connection broke (a proxy cut it: it then keeps the reply as far
// as it got, as after Stop); a server that stopped or failed kept nothing of it.
let cutTurn = null;

function showStatus(text, kind) {
  statusLine.textContent = text;
  statusLine.className = "status" + (kind ? " " + kind : "");
  statusLine.hidden = !text;
}

function updateButtons() {
  sendButton.hidden = busy;
  sendButton.disabled = !ready;
  stopButton.hidden = !busy;
  const last = conversation.lastMessage();
  regenerateButton.disabled = busy || !last || !last.classList.contains("assistant");
  clearButton.disabled = busy;
  newChatButton.disabled = busy;
  conversation.allowEdit(ready && !busy);
}

function setBusy(value) {
  busy = value;
  updateButtons();
  if (!busy) input.focus();
}

// Asks `question` in the page's own dialog; resolves to true only for the confirming button.
function confirmAction(question, confirmLabel) {
  $("confirm-text").textContent = question;
  $("confirm-ok").textContent = confirmLabel;
  confirmDialog.returnValue = "";
  confirmDialog.showModal();
  $("confirm-cancel").focus(); // the harmless answer is the one Enter gives
  return new Promise((resolve) => {
    confirmDialog.addEventListener("close", () => resolve(confirmDialog.returnValue === "ok"), { once: true });
  });
}

// -- the system prompt (kept in this browser) ---------------------------------------------------

// The system prompt the user set, or null if never set (or storage is off in this browser).
function storedSystem() {
  try {
    return localStorage.getItem(SYSTEM_KEY);
  } catch {
    return null;
  }
}

function storeSystem(text) {
  try {
    localStorage.setItem(SYSTEM_KEY, text);
    return true;
  } catch {
    return false;
  }
}

// -- talking to the server ----------------------------------------------------------------------

// Resolves to true after `seconds`, or to false as soon as `signal` aborts (Stop).
function pause(seconds, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) {
      resolve(false);
      return;
    }
    const stop = () => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", stop);
      resolve(true);
    }, seconds * 1000);
    signal.addEventListener("abort", stop, { once: true });
  });
}

// The waits of one request on a busy conversation: the returned function takes each response
// (and its JSON) and gives the seconds to wait before trying again, or null: any other
// response, or a 409 session_busy once BUSY_LIMIT_S have passed since the first.
function busyRetry() {
  let giveUpAt = null;
  return (response, data) => {
    if (response.status !== 409 || data.error !== "session_busy") return null;
    const now = performance.now();
    giveUpAt ??= now + BUSY_LIMIT_S * 1000;
    const left = (giveUpAt - now) / 1000;
    if (left <= 0) return null;
    const asked = parseInt(response.headers.get("Retry-After") || data.retry_after, 10);
    return Math.min(asked > 0 ? asked : 1, BUSY_WAIT_MAX_S, left);
  };
}

// A JSON request to one of the conversation APIs: {ok, status, data, message, stopped}; never
// throws. A busy conversation is waited for (`onWait()` says so each time) unless `signal`
// aborts, which ends only a wait: a request that may have reached the server is answered.
async function request(path, body, { signal = new AbortController().signal, onWait = () => {} } = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const retry = busyRetry();
  for (;;) {
    let response, data;
    try {
      response = await fetch(path, init);
      data = await response.json().catch(() => ({}));
    } catch {
      return { ok: false, status: 0, data: {}, message: "Cannot reach the server. Check that it is running." };
    }
    const seconds = retry(response, data);
    if (seconds !== null) {
      onWait();
      if (await pause(seconds, signal)) continue;
      return { ok: false, stopped: true, status: 0, data: {}, message: "" };
    }
    const ok = response.ok && data.success !== false;
    return { ok, status: response.status, data, message: ok ? "" : errorText(response.status, data) };
  }
}

function errorText(status, data) {
  if (data && typeof data.detail === "string" && data.detail) return data.detail;
  if (data && typeof data.message === "string" && data.message) return data.message;
  return "The server answered " + status + ".";
}

async function readError(response) {
  const data = await response.json().catch(() => ({}));
  return { code: data.error || "", text: errorText(response.status, data), data };
}

// Waits `seconds`, counting down in the status line; false if Stop was pressed meanwhile.
function countdown(seconds, signal) {
  return new Promise((resolve) => {
    let left = seconds;
    const tick = () => {
      if (signal.aborted) {
        clearInterval(timer);
        resolve(false);
        return;
      }
      if (left <= 0) {
        clearInterval(timer);
        resolve(true);
        return;
      }
      showStatus("Server busy, retrying in " + left + " s\u2026", "wait");
      left -= 1;
    };
    const timer = setInterval(tick, 1000);
    signal.addEventListener("abort", tick, { once: true });
    tick();
  });
}

// The server's estimate is null until it has timed a generation: then the page says only
// where the chat stands (Number(null) is 0, which would read "about 1 s").
function showQueue(data) {
  const ahead = Math.max(0, (Number(data.position) || 1) - 1);
  const eta = typeof data.eta_s === "number" ? data.eta_s : NaN;
  const about = Number.isFinite(eta) ? ", about " + Math.max(1, Math.round(eta)) + " s" : "";
  showStatus((ahead === 0 ? "You are next" : ahead + " ahead of you") + about, "wait");
}

// Reads an SSE body, calling `onEvent(name, data)` per event; returns when the body ends.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder(); // streaming decode: a character split across chunks stays whole
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// The body of a turn (see converse). The system prompt goes with every chat once the user has
// set it ("" included), and only where the server takes a chat's system text at all.
function chatBody(text, mode) {
  const body = mode === "edit" ? { edit: text } : { user_input: text, regenerate: mode === "regenerate" };
  const system = options.system_prompt ? storedSystem() : null;
  if (system !== null) body.system = system;
  return body;
}

// One chat turn: POST, retry while the server or the conversation is busy, stream into `reply`.
// Resolves to "success" (`event: done` came), "stopped" (by the user), "failed" (refused or
// unreachable, the reason shown), "cut" (the stream ended or broke without `event: done`: the
// server stopped, or a proxy cut it) or "error" (`event: error` ended it, shown).
async function chat(body, reply) {
  controller = new AbortController();
  const signal = controller.signal;
  const url = options.chat_path + (options.chat_path.includes("?") ? "&" : "?") + "format=sse";
  const retryBusy = busyRetry();
  for (;;) {
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
        signal,
      });
    } catch {
      if (signal.aborted) return "stopped";
      showStatus("Cannot reach the server. Check that it is running, then try again.", "error");
      return "failed";
    }
    const json = (response.headers.get("Content-Type") || "").startsWith("application/json");
    if (response.status === 429 || (response.ok && json)) {
      const problem = await readError(response);
      if (response.status !== 429 && problem.code !== "too_many_requests") {
        showStatus(problem.text, "error");
        return "failed";
      }
      const seconds = parseInt(response.headers.get("Retry-After") || problem.data.retry_after, 10) || 1;
      if (!(await countdown(seconds, signal))) return "stopped";
      continue;
    }
    if (!response.ok) {
      const problem = await readError(response);
      const seconds = retryBusy(response, problem.data);
      if (seconds === null) {
        showStatus(problem.text, "error");
        return "failed";
      }
      reply.note(BUSY_NOTE, "wait"); // not an error: the conversation frees within seconds
      if (!(await pause(seconds, signal))) return "stopped";
      continue;
    }
    const messageId = response.headers.get("X-ChatStream-Last-Generated-Message-Id");
    if (messageId) reply.message.dataset.messageId = messageId;
    reply.note("");
    showStatus("");
    let outcome = "cut"; // until `event: done` says otherwise: a body that just ends is cut off
    try {
      await readEvents(response, (name, data) => {
        if (name === "message" && typeof data.delta === "string") {
          if (statusLine.classList.contains("wait")) showStatus(""); // out of the queue
          reply.append(data.delta);
        } else if (name === "queue") {
          showQueue(data);
        } else if (name === "done") {
          outcome = "success";
        } else if (name === "error") {
          outcome = "error";
          showStatus("The reply failed: " + errorText(500, data), "error");
        }
      });
    } catch {
      if (signal.aborted) return "stopped";
      // The connection broke mid-body (a server that died, a proxy): as cut as a body that ends.
    }
    return outcome;
  }
}

// Puts the text of a turn the server did not keep back where it was written, to send again:
// an edit in the last message's editor, a message in the message box (unless it holds a new one).
function giveBack(text, mode) {
  if (mode === "edit" && conversation.reopenEditor(text)) return;
  if (!input.value) {
    input.value = text;
    fitHeight(input, 200);
  }
}

const CUT_NOTES = {
  cut: "Reply cut off \u2014 the server stopped before it ended; send it again or regenerate.",
  error: "Reply cut off \u2014 the server failed; send it again or regenerate.",
};

// Before the turn after one whose reply was cut off: shows the conversation the server has and
// resolves to the turn to send for `mode` and `text` (null when the server cannot say, shown).
// Where the server did not keep the cut turn, regenerating it is sending it again, and an edit
// of its message is sent as what that turn was (a new message, or an edit of the one before).
async function afterCutTurn(mode, text) {
  const cut = cutTurn;
  const history = await request("get_history");
  if (!history.ok) {
    showStatus(history.message, "error");
    return null;
  }
  const messages = history.data.messages || [];
  showHistory(messages);
  if (mode !== "send" && input.value === cut.text) {
    input.value = ""; // given back after the cut: the user redoes that turn instead
    fitHeight(input, 200);
  }
  if (messages.some((message) => message.id === cut.messageId)) return { mode, text }; // kept: as any turn
  if (mode === "regenerate") return { mode: cut.mode, text: cut.text };
  if (mode === "edit" && cut.mode === "send") return { mode: "send", text };
  return { mode, text };
}

// One turn: "send" a new message, "regenerate" the last reply ("" as text), or "edit" the last
// user message to `text` and reply to it again.
async function converse(text, mode) {
  if (busy) return;
  setBusy(true);
  showStatus("");
  if (cutTurn) {
    const turn = await afterCutTurn(mode, text);
    if (!turn) {
      setBusy(false);
      return;
    }
    ({ mode, text } = turn);
  }
  if (mode === "send") {
    conversation.addUser(text);
    if (input.value === text) {
      input.value = "";
      fitHeight(input, 200);
    }
  } else {
    conversation.removeLastReply();
    if (mode === "edit") conversation.replaceLastUserText(text);
  }
  const reply = conversation.startReply();
  const outcome = await chat(chatBody(text, mode), reply);
  controller = null;
  const cut = outcome === "cut" || outcome === "error";
  const kept = outcome === "success" || ((outcome === "stopped" || cut) && reply.text());
  if (kept) {
    // A cut reply stays as far as it came, marked so that nobody takes it for a whole one.
    if (cut) reply.note(CUT_NOTES[outcome], "cut");
    reply.finish(cut ? "cut" : outcome === "success" ? "done" : "stopped");
    if (outcome === "stopped") showStatus("Stopped.");
    if (cut) cutTurn = { mode, text, messageId: reply.message.dataset.messageId };
  } else {
    // The server keeps no turn that failed or showed nothing: show what it keeps.
    if (outcome === "stopped") showStatus("Stopped before the reply began.");
    if (outcome === "cut") showStatus("The server stopped before the reply began.", "error");
    conversation.removeLastReply(); // its dots, even if the history cannot be loaded now
    await loadHistory();
  }
  setBusy(false);
  // Once the conversation is editable again: to send again as it is, or changed.
  if ((!kept || cut) && mode !== "regenerate") giveBack(text, mode);
}

function showHistory(messages) {
  cutTurn = null;
  conversation.clear();
  for (const message of messages) {
    if (message.role === "user") conversation.addUser(message.content);
    else conversation.addReply(message.content, message.id);
  }
  updateButtons();
}

async function loadHistory() {
  const result = await request("get_history");
  if (result.ok) showHistory(result.data.messages || []);
  else showStatus(result.message, "error");
}

// Empties the page after the server has started over (`path`): clear_context or new_chat. The
// page is busy meanwhile, so that Stop can end a wait for a busy conversation.
async function startOver(path) {
  setBusy(true);
  controller = new AbortController();
  const onWait = () => showStatus(BUSY_NOTE, "wait");
  const result = await request(path, {}, { signal: controller.signal, onWait });
  controller = null;
  setBusy(false);
  if (result.stopped) {
    showStatus("Stopped while waiting: nothing changed.");
    return;
  }
  if (!result.ok) {
    showStatus(result.message, "error");
    return;
  }
  cutTurn = null;
  conversation.clear();
  showStatus("");
  updateButtons();
  input.focus();
}

// No question asked: the old conversation stays on the server, only this page leaves it.
async function newChat() {
  if (!busy) await startOver("new_chat");
}

async function clearConversation() {
  if (busy) return;
  const question = "Clear this conversation? It is deleted from the server. (New chat starts afresh and keeps it.)";
  if (await confirmAction(question, "Clear")) await startOver("clear_context");
}

// -- settings -------------------------------------------------------------------------------------

function fieldError(field, text) {
  const target = $(field + "-error");
  if (target) target.textContent = text;
  const box = $(field);
  if (box) box.setAttribute("aria-invalid", text ? "true" : "false");
}

async function openSettings() {
  const opening = settingsForm.hidden;
  settingsForm.hidden = !opening;
  settingsToggle.setAttribute("aria-expanded", String(opening));
  if (!opening) return;
  $("settings-status").textContent = "";
  PARAM_FIELDS.forEach((field) => fieldError(field, ""));
  if (options.system_prompt) {
    $("system").value = storedSystem() || "";
    fitHeight($("system"), 240);
    $("system").focus();
  } else {
    $("temperature").focus();
  }
  const result = await request("get_generation_params");
  if (!result.ok) {
    $("settings-status").textContent = result.message;
    return;
  }
  const params = result.data.generation_params || {};
  $("temperature").value = params.temperature;
  $("top_k").value = params.top_k_value;
  $("top_p").value = params.top_p_value;
  $("max_new_tokens").value = params.max_new_tokens;
}

// Keeps the system prompt if the user changed it (an untouched empty field stays unset).
function saveSystem() {
  const text = $("system").value;
  return text === (storedSystem() ?? "") || storeSystem(text);
}

async function saveSettings(event) {
  event.preventDefault();
  PARAM_FIELDS.forEach((field) => fieldError(field, ""));
  $("settings-status").textContent = "";
  if (options.system_prompt && !saveSystem()) {
    $("settings-status").textContent = "This browser does not let the page keep the system prompt.";
    return;
  }
  const update = {};
  for (const field of PARAM_FIELDS) {
    const raw = $(field).value.trim();
    // Sent as typed: the server checks every value and says which one is wrong.
    if (raw !== "") update[field] = Number.isNaN(Number(raw)) ? raw : Number(raw);
  }
  const onWait = () => {
    $("settings-status").textContent = BUSY_NOTE;
  };
  const result = await request("set_generation_params", update, { onWait });
  if (result.ok) {
    $("settings-status").textContent = "Saved";
    return;
  }
  const field = result.data.field;
  if (field && PARAM_FIELDS.includes(field)) fieldError(field, result.message);
  else $("settings-status").textContent = result.message;
}

// -- wiring ---------------------------------------------------------------------------------------

function submit() {
  const text = input.value;
  if (busy || !ready || !text.trim()) return;
  converse(text, "send");
}

document.title = options.title;
$("title").textContent = options.title;
$("model").textContent = options.model ? "model: " + options.model : "";
input.placeholder = options.placeholder;
if (options.greeting) $("greeting").textContent = options.greeting;
// The system prompt is offered only where the server takes one (its allow_system_prompt): else
// a chat carrying it would be refused.
$("system-field").hidden = !options.system_prompt;
if (!options.system_prompt) settingsToggle.title = "Generation settings";

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault(); // Enter sends; Shift+Enter (and an IME's Enter) writes a new line
    submit();
  } else if (event.key === "Escape" && controller) {
    controller.abort();
  }
});
input.addEventListener("input", () => fitHeight(input, 200));
stopButton.addEventListener("click", () => controller && controller.abort());
regenerateButton.addEventListener("click", () => converse("", "regenerate"));
clearButton.addEventListener("click", clearConversation);
newChatButton.addEventListener("click", newChat);
settingsToggle.addEventListener("click", openSettings);
settingsForm.addEventListener("submit", saveSettings);
$("system").addEventListener("input", () => fitHeight($("system"), 240));
$("confirm-ok").addEventListener("click", () => confirmDialog.close("ok"));
$("confirm-cancel").addEventListener("click", () => confirmDialog.close("cancel"));

updateButtons();
loadHistory().then(() => {
  ready = true;
  updateButtons();
  input.focus();
});
