// The conversation on the page: its messages, a reply rendered as it streams, and the buttons
// each message carries (copy and like/dislike on a finished reply, copy alone on a reply cut
// off, edit on the last user message). A user's text is shown as typed (text, white space
// kept); a reply is rendered as markdown by markdown.js, which builds nodes and never parses HTML.
import { renderMarkdown } from "./markdown.js";

const COPIED_FOR_MS = 1500;

export function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined && text !== null) element.textContent = text;
  return element;
}

// Grows a text box with its text, up to `max` pixels.
export function fitHeight(box, max) {
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight, max) + "px";
}

function iconButton(className, label) {
  const button = node("button", "icon " + className);
  button.type = "button";
  button.title = label;
  button.setAttribute("aria-label", label);
  return button;
}

// Copies `text`. The Clipboard API exists only in a secure context (https or localhost); over
// plain http on a network address the old execCommand way still works.
async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = node("textarea", "clipboard-helper");
    area.value = text;
    area.readOnly = true;
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied;
  }
}

function showCopied(button, copied) {
  button.dataset.copied = copied ? "yes" : "no";
  setTimeout(() => delete button.dataset.copied, COPIED_FOR_MS);
}

function typingIndicator() {
  const dots = node("span", "typing");
  dots.setAttribute("role", "status");
  dots.setAttribute("aria-label", "Writing a reply");
  dots.append(node("span"), node("span"), node("span"));
  return dots;
}

// The conversation in `log` (`empty` shows while it has no message). `handlers.feedback(id,
// isLike)` sends a like and resolves to {ok, message}; `handlers.edit(text)` resends the last
// user message as edited.
export function createConversation(log, empty, handlers) {
  const sources = new WeakMap(); // reply → its markdown source, which "Copy reply" copies
  let editing = null; // {message, form} while the last user message is being edited

  const bubbleOf = (message) => message.querySelector(".bubble");
  const columnOf = (message) => message.querySelector(".column");
  const atEnd = () => log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  const scrollToEnd = () => {
    log.scrollTop = log.scrollHeight;
  };

  function lastMessage() {
    const all = log.querySelectorAll(".msg");
    return all.length ? all[all.length - 1] : null;
  }

  function addMessage(role, id) {
    const message = node("article", "msg " + role);
    message.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
    if (id) message.dataset.messageId = id;
    const avatar = node("div", "avatar", role === "user" ? "You" : "AI");
    avatar.setAttribute("aria-hidden", "true");
    const column = node("div", "column");
    column.append(node("div", role === "user" ? "bubble" : "bubble markdown"));
    message.append(avatar, column);
    log.append(message);
    empty.hidden = true;
    return message;
  }

  // -- a reply's buttons ---------------------------------------------------------------------

  async function rate(message, isLike, pressed, other, note) {
    const messageId = message.dataset.messageId;
    if (!messageId) return;
    note.textContent = "";
    const result = await handlers.feedback(messageId, isLike);
    if (result.ok) {
      pressed.setAttribute("aria-pressed", "true");
      other.setAttribute("aria-pressed", "false");
      note.textContent = "Thanks!";
    } else {
      note.textContent = result.message;
    }
  }

  // A cut-off reply gets copy alone: the server may not have kept it, so there is nothing to rate.
  function replyActions(message, rated = true) {
    const copy = iconButton("copy", "Copy reply");
    copy.addEventListener("click", async () => showCopied(copy, await copyText(sources.get(message))));
    if (!rated) {
      const bar = node("div", "actions");
      bar.append(copy);
      return bar;
    }
    const like = iconButton("up", "Good reply");
    const dislike = iconButton("down", "Bad reply");
    like.setAttribute("aria-pressed", "false");
    dislike.setAttribute("aria-pressed", "false");
    const note = node("span", "actions-note");
    like.addEventListener("click", () => rate(message, true, like, dislike, note));
    dislike.addEventListener("click", () => rate(message, false, dislike, like, note));
    const bar = node("div", "actions");
    bar.append(copy, like, dislike, note);
    return bar;
  }

  // -- editing the last user message ---------------------------------------------------------

  function closeEditor() {
    if (!editing) return;
    editing.form.remove();
    editing.message.classList.remove("editing");
    editing = null;
  }

  // Opens `message` for editing, its text in the box (or `text`: an edit to try again).
  function openEditor(message, text) {
    closeEditor();
    const box = node("textarea");
    box.value = text ?? bubbleOf(message).textContent;
    box.rows = 1;
    box.setAttribute("aria-label", "Edit your message");
    const cancel = node("button", "ghost small", "Cancel");
    cancel.type = "button";
    const resend = node("button", "primary small", "Send");
    resend.type = "submit";
    const buttons = node("div", "editor-actions");
    buttons.append(cancel, resend);
    const form = node("form", "editor");
    form.append(box, buttons);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (box.value.trim()) handlers.edit(box.value);
    });
    cancel.addEventListener("click", closeEditor);
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault(); // as in the message box: Enter sends, Shift+Enter is a new line
        form.requestSubmit();
      } else if (event.key === "Escape") {
        closeEditor();
      }
    });
    box.addEventListener("input", () => fitHeight(box, 320));
    message.classList.add("editing");
    columnOf(message).append(form);
    editing = { message, form };
    fitHeight(box, 320);
    box.focus();
    box.setSelectionRange(box.value.length, box.value.length);
  }

  function userActions(message) {
    const edit = iconButton("edit", "Edit message");
    edit.addEventListener("click", () => openEditor(message));
    const bar = node("div", "actions");
    bar.append(edit);
    return bar;
  }

  // -- the conversation ----------------------------------------------------------------------

  log.addEventListener("click", async (event) => {
    // One listener for every code block's button: a block still streaming is rebuilt as it grows.
    const button = event.target.closest(".code-copy");
    if (!button) return;
    const code = button.closest(".code-block").querySelector("code");
    showCopied(button, await copyText(code.textContent));
  });

  return {
    lastMessage,
    closeEditor,

    addUser(text) {
      const message = addMessage("user");
      bubbleOf(message).textContent = text;
      columnOf(message).append(userActions(message));
      scrollToEnd();
      return message;
    },

    // A finished reply, as the history gives it.
    addReply(text, id) {
      const message = addMessage("assistant", id);
      sources.set(message, text);
      renderMarkdown(bubbleOf(message), text);
      columnOf(message).append(replyActions(message));
      scrollToEnd();
      return message;
    },

    // A reply about to stream in: dots until its first text, then its markdown rendered at most
    // once a frame (tokens come faster than the screen redraws); its buttons come once it ends.
    // `note(text, kind)` shows a quiet line under it (why it waits, that it was cut off).
    startReply() {
      const message = addMessage("assistant");
      message.classList.add("pending");
      bubbleOf(message).append(typingIndicator());
      sources.set(message, "");
      scrollToEnd();
      let frame = 0;
      const render = () => {
        frame = 0;
        const follow = atEnd(); // a reader who scrolled up to read stays where they are
        bubbleOf(message).querySelector(".typing")?.remove();
        renderMarkdown(bubbleOf(message), sources.get(message));
        if (follow) scrollToEnd();
      };
      return {
        message,
        text: () => sources.get(message),
        append(text) {
          sources.set(message, sources.get(message) + text);
          if (!frame) frame = requestAnimationFrame(render);
        },
        note(text, kind) {
          let line = columnOf(message).querySelector(".reply-note");
          if (!text) {
            line?.remove();
            return;
          }
          if (!line) {
            line = node("p");
            line.setAttribute("role", "status");
            bubbleOf(message).after(line);
          }
          line.className = "reply-note" + (kind ? " " + kind : "");
          line.textContent = text;
        },
        // Ends the reply as "done", "stopped" (by the user) or "cut" (it broke off: no end came).
        finish(ending) {
          cancelAnimationFrame(frame);
          const follow = atEnd();
          if (sources.get(message)) render();
          else bubbleOf(message).querySelector(".typing")?.remove();
          message.classList.remove("pending");
          message.classList.toggle("stopped", ending === "stopped");
          message.classList.toggle("cut", ending === "cut");
          columnOf(message).append(replyActions(message, ending !== "cut"));
          if (follow) scrollToEnd(); // the buttons too, not just the text
        },
      };
    },

    removeLastReply() {
      const last = lastMessage();
      if (last && last.classList.contains("assistant")) last.remove();
    },

    // The last user message now says `text`, as edited (reloaded from the server if it refuses).
    replaceLastUserText(text) {
      closeEditor();
      const users = log.querySelectorAll(".msg.user");
      if (users.length) bubbleOf(users[users.length - 1]).textContent = text;
    },

    // Opens the last user message's editor again with `text`, an edit the server did not take;
    // false if that message cannot be edited now (allowEdit has not offered it).
    reopenEditor(text) {
      const user = log.querySelector(".msg.user.editable");
      if (!user) return false;
      openEditor(user, text);
      return true;
    },

    // Offers the edit on the last user message when `allowed` and a reply follows it: the
    // server edits only the last turn (that message and its reply).
    allowEdit(allowed) {
      for (const message of log.querySelectorAll(".msg.user.editable")) message.classList.remove("editable");
      const last = lastMessage();
      const user = last ? last.previousElementSibling : null;
      const editable = allowed && last?.classList.contains("assistant") && user?.classList.contains("user");
      if (editable) user.classList.add("editable");
      else closeEditor();
    },

    clear() {
      closeEditor();
      for (const message of log.querySelectorAll(".msg")) message.remove();
      empty.hidden = false;
    },
  };
}
