// The chat page's script: streams replies over SSE from POST chat_stream, and keeps the
// conversation in step with the server's session (get_history, clear_context).
// Every text from the model or the user is inserted with textContent, never as markup.
"use strict";

(function () {
  const options = Object.assign(
    { title: "Chat", placeholder: "Message", greeting: "", chat_path: "chat_stream", model: "" },
    JSON.parse(document.getElementById("chatstream-options").textContent || "{}")
  );
  const PARAM_FIELDS = ["temperature", "top_k", "top_p", "max_new_tokens"];
  const $ = (id) => document.getElementById(id);
  const log = $("log");
  const input = $("input");
  const sendButton = $("send");
  const stopButton = $("stop");
  const regenerateButton = $("regenerate");
  const clearButton = $("clear");
  const statusLine = $("status");
  const settingsForm = $("settings");
  const settingsToggle = $("settings-toggle");

  let busy = false;
  let ready = false; // until the history has loaded, a sent message could be wiped by it
  let controller = null; // aborts the running chat request (Stop)

  // -- small DOM helpers (text only) -------------------------------------------------------

  function node(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined && text !== null) element.textContent = text;
    return element;
  }

  function showStatus(text, kind) {
    statusLine.textContent = text;
    statusLine.className = "status" + (kind ? " " + kind : "");
    statusLine.hidden = !text;
  }

  function scrollToEnd() {
    log.scrollTop = log.scrollHeight;
  }

  function updateEmpty() {
    $("empty").hidden = log.querySelector(".msg") !== null;
  }

  function lastMessage() {
    const all = log.querySelectorAll(".msg");
    return all.length ? all[all.length - 1] : null;
  }

  function updateButtons() {
    sendButton.hidden = busy;
    sendButton.disabled = !ready;
    stopButton.hidden = !busy;
    const last = lastMessage();
    regenerateButton.disabled = busy || !last || !last.classList.contains("assistant");
    clearButton.disabled = busy;
  }

  function setBusy(value) {
    busy = value;
    updateButtons();
    if (!busy) input.focus();
  }

  // -- messages ----------------------------------------------------------------------------

  function addMessage(role, content, id) {
    const article = node("article", "msg " + role);
    article.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
    const avatar = node("div", "avatar", role === "user" ? "You" : "AI");
    avatar.setAttribute("aria-hidden", "true");
    const column = node("div", "column");
    const bubble = node("div", "bubble", content);
    column.appendChild(bubble);
    if (role === "assistant") column.appendChild(feedbackBar(article));
    article.append(avatar, column);
    log.appendChild(article);
    if (id) article.dataset.messageId = id;
    updateEmpty();
    updateButtons();
    scrollToEnd();
    return article;
  }

  function bubbleOf(article) {
    return article.querySelector(".bubble");
  }

  function feedbackBar(article) {
    const bar = node("div", "feedback");
    const like = node("button", "icon up");
    const dislike = node("button", "icon down");
    like.type = dislike.type = "button";
    like.setAttribute("aria-label", "Good reply");
    dislike.setAttribute("aria-label", "Bad reply");
    like.title = "Good reply";
    dislike.title = "Bad reply";
    like.setAttribute("aria-pressed", "false");
    dislike.setAttribute("aria-pressed", "false");
    const note = node("span", "feedback-note");
    like.addEventListener("click", () => sendFeedback(article, true, like, dislike, note));
    dislike.addEventListener("click", () => sendFeedback(article, false, dislike, like, note));
    bar.append(like, dislike, note);
    return bar;
  }

  async function sendFeedback(article, isLike, pressed, other, note) {
    const messageId = article.dataset.messageId;
    if (!messageId) return;
    note.textContent = "";
    const response = await request("set_feedback", { message_id: messageId, is_like: isLike });
    if (response.ok) {
      pressed.setAttribute("aria-pressed", "true");
      other.setAttribute("aria-pressed", "false");
      note.textContent = "Thanks!";
    } else {
      note.textContent = response.message;
    }
  }

  // -- talking to the server ---------------------------------------------------------------

  // A JSON request to one of the conversation APIs: {ok, status, data, message}; never throws.
  async function request(path, body) {
    const init = { credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    try {
      const response = await fetch(path, init);
      const data = await response.json().catch(() => ({}));
      const ok = response.ok && data.success !== false;
      return { ok, status: response.status, data, message: ok ? "" : errorText(response.status, data) };
    } catch (error) {
      return { ok: false, status: 0, data: {}, message: "Cannot reach the server. Check that it is running." };
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

  function showQueue(data) {
    const ahead = Math.max(0, (Number(data.position) || 1) - 1);
    const eta = Number(data.eta_s);
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

  // One chat turn: POST, retry while busy, stream into `reply`. Resolves to "success",
  // "stopped" or "failed" (with the reason shown).
  async function chat(body, reply) {
    controller = new AbortController();
    const signal = controller.signal;
    const url = options.chat_path + (options.chat_path.includes("?") ? "&" : "?") + "format=sse";
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
      } catch (error) {
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
        showStatus((await readError(response)).text, "error");
        return "failed";
      }
      const messageId = response.headers.get("X-ChatStream-Last-Generated-Message-Id");
      if (messageId) reply.dataset.messageId = messageId;
      showStatus("");
      let outcome = "failed";
      let text = "";
      try {
        await readEvents(response, (name, data) => {
          if (name === "message" && typeof data.delta === "string") {
            text += data.delta;
            bubbleOf(reply).textContent = text;
            reply.classList.remove("pending");
            scrollToEnd();
          } else if (name === "queue") {
            showQueue(data);
          } else if (name === "done") {
            outcome = "success";
          } else if (name === "error") {
            showStatus("The reply failed: " + errorText(500, data), "error");
          }
        });
      } catch (error) {
        if (signal.aborted) return "stopped";
        showStatus("The connection broke before the reply ended.", "error");
        return "failed";
      }
      if (outcome !== "success" && statusLine.hidden) showStatus("The reply ended early.", "error");
      return outcome;
    }
  }

  async function converse(userText, regenerate) {
    if (busy) return;
    setBusy(true);
    showStatus("");
    let userMessage = null;
    if (regenerate) {
      const last = lastMessage();
      if (last && last.classList.contains("assistant")) last.remove();
    } else {
      userMessage = addMessage("user", userText);
      input.value = "";
      autosize();
    }
    const reply = addMessage("assistant", "");
    reply.classList.add("pending");
    const outcome = await chat({ user_input: userText, regenerate }, reply);
    controller = null;
    reply.classList.remove("pending");
    if (outcome === "stopped" && bubbleOf(reply).textContent) {
      reply.classList.add("stopped");
      showStatus("Stopped.");
    } else if (outcome !== "success") {
      // The server keeps no turn that failed or showed nothing: show what it keeps, and give the
      // text back so it can be sent again.
      if (userMessage && !input.value) {
        input.value = userText;
        autosize();
      }
      if (outcome === "stopped") showStatus("Stopped before the reply began.");
      await loadHistory();
    }
    setBusy(false);
  }

  async function loadHistory() {
    const result = await request("get_history");
    if (!result.ok) {
      showStatus(result.message, "error");
      return;
    }
    for (const old of log.querySelectorAll(".msg")) old.remove();
    for (const message of result.data.messages || []) {
      addMessage(message.role === "user" ? "user" : "assistant", message.content, message.id);
    }
    updateEmpty();
    updateButtons();
  }

  async function clearConversation() {
    if (busy) return;
    const result = await request("clear_context", {});
    if (!result.ok) {
      showStatus(result.message, "error");
      return;
    }
    for (const old of log.querySelectorAll(".msg")) old.remove();
    showStatus("");
    updateEmpty();
    updateButtons();
    input.focus();
  }

  // -- settings ----------------------------------------------------------------------------

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
    $("temperature").focus();
  }

  async function saveSettings(event) {
    event.preventDefault();
    PARAM_FIELDS.forEach((field) => fieldError(field, ""));
    $("settings-status").textContent = "";
    const update = {};
    for (const field of PARAM_FIELDS) {
      const raw = $(field).value.trim();
      // Sent as typed: the server checks every value and says which one is wrong.
      if (raw !== "") update[field] = Number.isNaN(Number(raw)) ? raw : Number(raw);
    }
    const result = await request("set_generation_params", update);
    if (result.ok) {
      $("settings-status").textContent = "Saved";
      return;
    }
    const field = result.data.field;
    if (field && PARAM_FIELDS.includes(field)) fieldError(field, result.message);
    else $("settings-status").textContent = result.message;
  }

  // -- wiring ------------------------------------------------------------------------------

  function autosize() {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight, 200) + "px";
  }

  function submit() {
    const text = input.value;
    if (busy || !ready || !text.trim()) return;
    converse(text, false);
  }

  document.title = options.title;
  $("title").textContent = options.title;
  $("model").textContent = options.model ? "model: " + options.model : "";
  input.placeholder = options.placeholder;
  if (options.greeting) $("greeting").textContent = options.greeting;

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
  input.addEventListener("input", autosize);
  stopButton.addEventListener("click", () => controller && controller.abort());
  regenerateButton.addEventListener("click", () => converse("", true));
  clearButton.addEventListener("click", clearConversation);
  settingsToggle.addEventListener("click", openSettings);
  settingsForm.addEventListener("submit", saveSettings);

  updateButtons();
  loadHistory().then(() => {
    ready = true;
    updateButtons();
    input.focus();
  });
})();
