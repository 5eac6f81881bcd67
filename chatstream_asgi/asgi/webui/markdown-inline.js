// Markdown's inline part for markdown.js: emphasis, code spans, links, images and line breaks,
// as DOM nodes. Every text becomes a text node, never markup. A link is made only for an
// absolute http(s) or mailto URL, checked after the browser's own URL parser has normalised it
// (so "JavaScript:" or "java\tscript:" cannot slip through); an image becomes a link to it,
// never an <img>, so a reply cannot make the browser fetch anything.
//
// A reply is untrusted input that the page renders again on every frame while it streams, so
// each text is read in about linear time, whatever it holds: a code span's closing run is
// looked up in an index of the text's backtick runs, brackets are matched once per text, an
// emphasis that found no closer is not looked for again further on, and every pattern is a
// sticky regex tried at one place (no copy of the rest of the text per character) that cannot
// backtrack more than linearly.

// How deep blocks (quotes, lists) and emphasis may nest; deeper markers are left as text, so a
// reply cannot exhaust the stack.
export const MAX_NESTING = 16;
// How deep parentheses may nest in a link's URL (as in cmark): a URL's scan stays short.
const MAX_URL_PARENS = 32;

const ESCAPABLE = /[!-/:-@[-`{-~]/;
const WORD = /[\p{L}\p{N}]/u;
const SPACE = /\s/;
const LINK_SCHEMES = new Set(["http:", "https:", "mailto:"]);
// Each domain label excludes the dot, so the split into labels is never guessed at.
const AUTOLINK = /<([A-Za-z][A-Za-z0-9+.-]{1,31}:[^<>\s]*|[^<>\s@]+@[^<>\s@.]+(?:\.[^<>\s@.]+)+)>/y;
const BARE_URL = /https?:\/\/[^\s<>]+/iy;
// What ends a sentence after a bare URL rather than belonging to it (GitHub's rule).
const URL_TRAILERS = new Set("?!.,:;*_~'\"");

// A `tag` element holding `children` (nodes, or strings as text).
export function element(tag, className, children) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  // One at a time: append(...children) would pass every child as an argument, and a long reply
  // (many rows, many line breaks) has more than a call's arguments may be.
  for (const child of children || []) made.append(child);
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

// `pattern` (sticky) matched exactly at `index` of `text`, or null.
function matchAt(pattern, text, index) {
  pattern.lastIndex = index;
  return pattern.exec(text);
}

// -- one text's scan, and what it learns on the way -------------------------------------------

function newScan(text, inLink, depth) {
  return {
    text,
    inLink, // inside a link's label: no links within links
    depth, // how many emphases and labels enclose this text
    backtickRuns: null, // run length → the starts of the text's backtick runs that long, in order
    bracketCloser: null, // "[" index → its "]" index, for the brackets that close
    noCloserFrom: new Map(), // emphasis (char + size) → the earliest point past which it has no closer
    nextOf: new Map(), // char → the last answer of nextIndexOf for it
  };
}

function backtickRuns(scan) {
  if (!scan.backtickRuns) {
    scan.backtickRuns = new Map();
    for (const run of scan.text.matchAll(/`+/g)) {
      const starts = scan.backtickRuns.get(run[0].length) || [];
      starts.push(run.index);
      scan.backtickRuns.set(run[0].length, starts);
    }
  }
  return scan.backtickRuns;
}

// The first of the ascending `values` at or after `from`; undefined if none.
function firstFrom(values, from) {
  let low = 0;
  let high = values.length;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (values[middle] < from) low = middle + 1;
    else high = middle;
  }
  return values[low];
}

// The code span opened by the backtick run at `index`: {size, close} (close: where the closing
// run of the same length starts; undefined if none). Backslashes do not escape in code.
function codeSpanAt(scan, index) {
  const size = runLength(scan.text, index, "`");
  const close = firstFrom(backtickRuns(scan).get(size) || [], index + size);
  return { size, close };
}

// The first `char` at or after `from`, or -1. The scan asks at increasing points, so an answer
// still ahead of the next question is the answer to that one too.
function nextIndexOf(scan, char, from) {
  const known = scan.nextOf.get(char);
  if (known && from >= known.from && (known.at < 0 || known.at >= from)) return known.at;
  const at = scan.text.indexOf(char, from);
  scan.nextOf.set(char, { from, at });
  return at;
}

// Where the code span at `index` ends; an unclosed run of backticks ends where it does.
function codeSpanEnd(scan, index) {
  const { size, close } = codeSpanAt(scan, index);
  return (close ?? index) + size;
}

// Every bracket pair of the text, matched once, left to right, skipping escapes and code spans
// as the scan itself does.
function bracketCloser(scan) {
  if (!scan.bracketCloser) {
    const { text } = scan;
    const closers = new Map();
    const open = [];
    for (let at = 0; at < text.length; at += 1) {
      if (text[at] === "\\") {
        at += 1;
      } else if (text[at] === "`") {
        at = codeSpanEnd(scan, at) - 1;
      } else if (text[at] === "[") {
        open.push(at);
      } else if (text[at] === "]" && open.length) {
        closers.set(open.pop(), at);
      }
    }
    scan.bracketCloser = closers;
  }
  return scan.bracketCloser;
}

// -- the inline rules: each reads what starts at `index`, or returns null -------------------

function codeSpan(scan, index) {
  const { size, close } = codeSpanAt(scan, index);
  // No closing run of the same length: the whole run is text (not a shorter span inside it).
  if (close === undefined) return { nodes: ["`".repeat(size)], end: index + size };
  let code = scan.text.slice(index + size, close).replace(/\n/g, " ");
  if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ") && code.trim()) code = code.slice(1, -1);
  return { nodes: [element("code", null, [code])], end: close + size };
}

// Where emphasis opened at `from` with `size` characters `char` closes; -1 if it never does.
function findCloser(scan, from, char, size) {
  const { text } = scan;
  const key = char + size;
  // Openers come left to right: one that found no closer means none further on will either.
  if (from >= (scan.noCloserFrom.get(key) ?? Infinity)) return -1;
  let index = from;
  while (index < text.length) {
    if (text[index] === "\\") {
      index += 2;
    } else if (text[index] === "`") {
      index = codeSpanEnd(scan, index); // code binds tighter than emphasis
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
  scan.noCloserFrom.set(key, from);
  return -1;
}

function emphasisNode(char, size, children) {
  if (char === "~") return element("del", null, children);
  if (size === 1) return element("em", null, children);
  const strong = element("strong", null, children);
  return size === 2 ? strong : element("em", null, [strong]);
}

function emphasis(scan, index) {
  const { text } = scan;
  const char = text[index];
  const run = runLength(text, index, char);
  const literal = { nodes: [char.repeat(run)], end: index + run };
  const after = text[index + run] || " ";
  const before = text[index - 1] || " ";
  if (SPACE.test(after) || (char === "_" && WORD.test(before))) return literal; // "2 * 3", snake_case
  if (scan.depth >= MAX_NESTING) return literal;
  const sizes = char === "~" ? (run === 2 ? [2] : []) : [3, 2, 1].filter((size) => size <= run);
  for (const size of sizes) {
    const close = findCloser(scan, index + run, char, size);
    if (close >= 0) {
      const inner = nodesOf(text.slice(index + run, close), scan.inLink, scan.depth + 1);
      return { nodes: [char.repeat(run - size), emphasisNode(char, size, inner)], end: close + size };
    }
  }
  return literal;
}

function skipSpace(text, index) {
  while (index < text.length && SPACE.test(text[index])) index += 1;
  return index;
}

// A link's URL from `index`: <bracketed>, or up to white space or an unbalanced ")".
// {url, end}, or null.
function linkUrl(scan, index) {
  const { text } = scan;
  if (text[index] === "<") {
    const close = nextIndexOf(scan, ">", index);
    const newline = nextIndexOf(scan, "\n", index);
    if (close < 0 || (newline >= 0 && newline < close)) return null;
    return { url: text.slice(index + 1, close), end: close + 1 };
  }
  let at = index;
  for (let depth = 0; at < text.length && !SPACE.test(text[at]); at += 1) {
    if (text[at] === "\\") at += 1;
    else if (text[at] === "(" && ++depth > MAX_URL_PARENS) return null;
    else if (text[at] === ")" && depth-- === 0) break;
  }
  return { url: text.slice(index, at), end: at };
}

// `(url "title")` from `index` (at the "("): {url, title, end} or null.
function destination(scan, index) {
  const { text } = scan;
  const found = linkUrl(scan, skipSpace(text, index + 1));
  if (!found) return null;
  let at = skipSpace(text, found.end);
  let title = "";
  if (text[at] === '"' || text[at] === "'" || text[at] === "(") {
    const close = nextIndexOf(scan, text[at] === "(" ? ")" : text[at], at + 1);
    if (close < 0) return null;
    title = text.slice(at + 1, close);
    at = skipSpace(text, close + 1);
  }
  if (text[at] !== ")") return null;
  return { url: found.url.replace(/\\([!-/:-@[-`{-~])/g, "$1"), title, end: at + 1 };
}

// `[label](url)`, or with `image` `![alt](url)`: a link to a safe URL, else the label as text.
function bracketLink(scan, index, image) {
  const { text } = scan;
  const open = image ? index + 1 : index;
  const close = bracketCloser(scan).get(open);
  if (close === undefined || text[close + 1] !== "(") return null;
  const target = destination(scan, close + 1);
  if (!target) return null;
  const label = text.slice(open + 1, close);
  const href = safeHref(target.url);
  // Never an <img>: the image becomes a link to it, so nothing loads unless the reader asks.
  const children = image ? [label || target.url] : nodesOf(label, true, scan.depth + 1);
  if (!href || scan.inLink) return { nodes: children, end: target.end };
  const anchor = link(href, children, image ? "image-link" : null);
  if (target.title) anchor.title = target.title;
  return { nodes: [anchor], end: target.end };
}

function autolink(scan, index) {
  const match = matchAt(AUTOLINK, scan.text, index);
  if (!match) return null;
  const url = match[1].includes(":") ? match[1] : "mailto:" + match[1];
  const href = safeHref(url);
  const nodes = href && !scan.inLink ? [link(href, [match[1]])] : [match[0]];
  return { nodes, end: index + match[0].length };
}

// `url` less the punctuation that ends a sentence, then less the closing parentheses it never
// opened (counted once: a URL may end in thousands of them).
function trimUrl(url) {
  let end = url.length;
  while (end > 0 && URL_TRAILERS.has(url[end - 1])) end -= 1;
  const kept = url.slice(0, end);
  let unopened = kept.split(")").length - kept.split("(").length;
  while (kept[end - 1] === ")" && unopened > 0) {
    end -= 1;
    unopened -= 1;
  }
  return kept.slice(0, end);
}

// A bare http(s) URL in the text (GitHub's extension).
function bareUrl(scan, index) {
  const { text } = scan;
  if (scan.inLink || WORD.test(text[index - 1] || "")) return null;
  const match = matchAt(BARE_URL, text, index);
  if (!match) return null;
  const url = trimUrl(match[0]);
  const href = safeHref(url);
  // One the browser cannot parse stays text, read once (not again from each character of it).
  return { nodes: [href ? link(href, [url]) : url], end: index + url.length };
}

function backslash(scan, index) {
  const next = scan.text[index + 1];
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
  "[": (scan, index) => (scan.inLink ? null : bracketLink(scan, index, false)),
  "!": (scan, index) => (scan.text[index + 1] === "[" ? bracketLink(scan, index, true) : null),
  "<": autolink,
  h: bareUrl,
  H: bareUrl,
};

// The nodes of inline `text`, `depth` emphases or labels deep.
function nodesOf(text, inLink, depth) {
  const scan = newScan(text, inLink, depth);
  const nodes = [];
  let plain = ""; // text read so far that has not become a node yet
  let from = 0; // where the characters no rule took begin
  let index = 0;
  while (index < text.length) {
    const rule = INLINE_RULES[text[index]];
    const found = rule ? rule(scan, index) : null;
    if (!found) {
      index += 1;
      continue;
    }
    plain += text.slice(from, index);
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
    from = index;
  }
  plain += text.slice(from);
  if (plain) nodes.push(plain);
  return nodes;
}

// The nodes of a block's inline `text` (a paragraph, a heading, a table cell).
export function inlineNodes(text) {
  return nodesOf(text, false, 0);
}
