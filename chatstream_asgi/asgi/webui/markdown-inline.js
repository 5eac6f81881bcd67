// Markdown's inline part for markdown.js: emphasis, code spans, links, images and line breaks,
// as DOM nodes. Every text becomes a text node, never markup. A link is made only for an
// absolute http(s) or mailto URL, checked after the browser's own URL parser has normalised it
// (so "JavaScript:" or "java\tscript:" cannot slip through); an image becomes a link to it,
// never an <img>, so a reply cannot make the browser fetch anything.

const ESCAPABLE = /[!-/:-@[-`{-~]/;
const WORD = /[\p{L}\p{N}]/u;
const SPACE = /\s/;
const LINK_SCHEMES = new Set(["http:", "https:", "mailto:"]);

// A `tag` element holding `children` (nodes, or strings as text).
export function element(tag, className, children) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (children) made.append(...children);
  return made;
}

// An absolute http(s) or mailto URL, normalised by the browser's own parser; null for anything
// else (javascript:, data:, relative paths), so such a link stays text.
function safeHref(url) {
  let parsed;
  try {
    parsed = new URL(url.trim());
  } catch {
    return null;
  }
  return LINK_SCHEMES.has(parsed.protocol) ? parsed.href : null;
}

function link(href, children, className) {
  const anchor = element("a", className, children);
  anchor.href = href;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer nofollow";
  return anchor;
}

function runLength(text, index, char) {
  let end = index;
  while (text[end] === char) end += 1;
  return end - index;
}

function codeSpan(text, index) {
  const size = runLength(text, index, "`");
  for (let close = text.indexOf("`", index + size); close >= 0; ) {
    const run = runLength(text, close, "`");
    if (run === size) {
      let code = text.slice(index + size, close).replace(/\n/g, " ");
      if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ") && code.trim()) code = code.slice(1, -1);
      return { nodes: [element("code", null, [code])], end: close + size };
    }
    close = text.indexOf("`", close + run);
  }
  // No closing run of the same length: the whole run is text (not a shorter span inside it).
  return { nodes: ["`".repeat(size)], end: index + size };
}

// Where emphasis opened at `from` with `size` characters `char` closes; -1 if it never does.
function findCloser(text, from, char, size) {
  let index = from;
  while (index < text.length) {
    if (text[index] === "\\") {
      index += 2;
    } else if (text[index] === "`") {
      index = codeSpan(text, index).end; // code binds tighter than emphasis
    } else if (text[index] !== char) {
      index += 1;
    } else {
      const run = runLength(text, index, char);
      const after = text[index + run] || " ";
      const closes = index > from && !SPACE.test(text[index - 1]) && (char !== "_" || !WORD.test(after));
      // A run of three or more may close an inner and an outer emphasis at once ("*a **b***").
      if (closes && (run === size || run >= 3)) return index + run - size;
      index += run;
    }
  }
  return -1;
}

function emphasisNode(char, size, children) {
  if (char === "~") return element("del", null, children);
  if (size === 1) return element("em", null, children);
  const strong = element("strong", null, children);
  return size === 2 ? strong : element("em", null, [strong]);
}

function emphasis(text, index, inLink) {
  const char = text[index];
  const run = runLength(text, index, char);
  const literal = { nodes: [char.repeat(run)], end: index + run };
  const after = text[index + run] || " ";
  const before = text[index - 1] || " ";
  if (SPACE.test(after) || (char === "_" && WORD.test(before))) return literal; // "2 * 3", snake_case
  const sizes = char === "~" ? (run === 2 ? [2] : []) : [3, 2, 1].filter((size) => size <= run);
  for (const size of sizes) {
    const close = findCloser(text, index + run, char, size);
    if (close >= 0) {
      const inner = inlineNodes(text.slice(index + run, close), inLink);
      return { nodes: [char.repeat(run - size), emphasisNode(char, size, inner)], end: close + size };
    }
  }
  return literal;
}

function closingBracket(text, index) {
  let depth = 0;
  for (let at = index; at < text.length; at += 1) {
    if (text[at] === "\\") at += 1;
    else if (text[at] === "`") at = codeSpan(text, at).end - 1;
    else if (text[at] === "[") depth += 1;
    else if (text[at] === "]" && --depth === 0) return at;
  }
  return -1;
}

function skipSpace(text, index) {
  while (index < text.length && SPACE.test(text[index])) index += 1;
  return index;
}

// `(url "title")` from `index` (at the "("): {url, title, end} or null.
function destination(text, index) {
  let at = skipSpace(text, index + 1);
  let url;
  if (text[at] === "<") {
    const close = text.indexOf(">", at);
    if (close < 0 || text.slice(at, close).includes("\n")) return null;
    url = text.slice(at + 1, close);
    at = close + 1;
  } else {
    const start = at;
    for (let depth = 0; at < text.length && !SPACE.test(text[at]); at += 1) {
      if (text[at] === "\\") at += 1;
      else if (text[at] === "(") depth += 1;
      else if (text[at] === ")" && depth-- === 0) break;
    }
    url = text.slice(start, at);
  }
  at = skipSpace(text, at);
  let title = "";
  if (text[at] === '"' || text[at] === "'" || text[at] === "(") {
    const close = text.indexOf(text[at] === "(" ? ")" : text[at], at + 1);
    if (close < 0) return null;
    title = text.slice(at + 1, close);
    at = skipSpace(text, close + 1);
  }
  if (text[at] !== ")") return null;
  return { url: url.replace(/\\([!-/:-@[-`{-~])/g, "$1"), title, end: at + 1 };
}

// `[label](url)`, or with `image` `![alt](url)`: a link to a safe URL, else the label as text.
function bracketLink(text, index, inLink, image) {
  const open = image ? index + 1 : index;
  const close = closingBracket(text, open);
  if (close < 0 || text[close + 1] !== "(") return null;
  const target = destination(text, close + 1);
  if (!target) return null;
  const label = text.slice(open + 1, close);
  const href = safeHref(target.url);
  // Never an <img>: the image becomes a link to it, so nothing loads unless the reader asks.
  const children = image ? [label || target.url] : inlineNodes(label, true);
  if (!href || inLink) return { nodes: children, end: target.end };
  const anchor = link(href, children, image ? "image-link" : null);
  if (target.title) anchor.title = target.title;
  return { nodes: [anchor], end: target.end };
}

function autolink(text, index, inLink) {
  const match = /^<([A-Za-z][A-Za-z0-9+.-]{1,31}:[^<>\s]*|[^<>\s@]+@[^<>\s@]+\.[^<>\s@]+)>/.exec(text.slice(index));
  if (!match) return null;
  const url = match[1].includes(":") ? match[1] : "mailto:" + match[1];
  const href = safeHref(url);
  const nodes = href && !inLink ? [link(href, [match[1]])] : [match[0]];
  return { nodes, end: index + match[0].length };
}

// A bare http(s) URL in the text (GitHub's extension), less the punctuation that ends a sentence.
function bareUrl(text, index, inLink) {
  if (inLink || WORD.test(text[index - 1] || "")) return null;
  const match = /^https?:\/\/[^\s<>]+/i.exec(text.slice(index));
  if (!match) return null;
  let url = match[0].replace(/[?!.,:;*_~'"]+$/, "");
  while (url.endsWith(")") && url.split("(").length < url.split(")").length) url = url.slice(0, -1);
  const href = safeHref(url);
  if (!href) return null;
  return { nodes: [link(href, [url])], end: index + url.length };
}

function backslash(text, index) {
  const next = text[index + 1];
  if (next === "\n") return { nodes: [document.createElement("br")], end: index + 2 };
  if (next !== undefined && ESCAPABLE.test(next)) return { nodes: [next], end: index + 2 };
  return null;
}

const INLINE_RULES = {
  "\\": backslash,
  "`": codeSpan,
  "*": emphasis,
  _: emphasis,
  "~": emphasis,
  "[": (text, index, inLink) => (inLink ? null : bracketLink(text, index, inLink, false)),
  "!": (text, index, inLink) => (text[index + 1] === "[" ? bracketLink(text, index, inLink, true) : null),
  "<": autolink,
  h: bareUrl,
  H: bareUrl,
};

// The nodes of inline `text`; `inLink` when inside a link's label (no links within links).
export function inlineNodes(text, inLink) {
  const nodes = [];
  let plain = "";
  let index = 0;
  while (index < text.length) {
    const rule = INLINE_RULES[text[index]];
    const found = rule ? rule(text, index, inLink) : null;
    if (!found) {
      plain += text[index];
      index += 1;
      continue;
    }
    for (const item of found.nodes) {
      if (typeof item === "string") {
        plain += item;
      } else {
        if (plain) nodes.push(plain);
        plain = "";
        nodes.push(item);
      }
    }
    index = found.end;
  }
  if (plain) nodes.push(plain);
  return nodes;
}
