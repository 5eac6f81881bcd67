// Markdown to DOM for the chat page's replies, built node by node: the blocks here, the inline
// part (emphasis, code spans, links) in markdown-inline.js.
//
// Safe by construction: every text goes in as a text node or through textContent, never as
// markup, so HTML in a reply shows as the characters it is. A link is made only for an
// absolute http(s) or mailto URL; a markdown image becomes a link to its URL, never an <img>
// (a reply must not make the browser fetch anything). The subset is what chat models write:
// headings, paragraphs, emphasis, code spans and fenced code, nested lists, block quotes,
// tables, rules and links. Deliberate differences from CommonMark: raw HTML is text, indented
// code blocks and reference links are not recognised, a single newline is a line break (as
// chat UIs show it), and any list marker may start a list right under a paragraph line (a
// streamed list shows as a list from its first token, not as a heading for a moment).
//
// Robust by construction too: quotes and lists nest at most MAX_NESTING deep (a deeper marker
// is text), a table gets no more empty cells than its source has characters, no pattern here
// can backtrack more than linearly, and should rendering fail all the same, the reply shows as
// plain text rather than not at all.

import { MAX_NESTING, element, inlineNodes } from "./markdown-inline.js";

const FENCE = /^( {0,3})(`{3,}|~{3,})(.*)$/;
const FENCE_CLOSE = /^ {0,3}(`{3,}|~{3,})[ \t]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*))?$/;
const SETEXT = /^ {0,3}(=+|-{2,})[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^( {0,3})([-+*]|\d{1,9}[.)])([ \t]+|$)(.*)$/;
const TABLE_DELIMITER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

// -- blocks -----------------------------------------------------------------------------------

const isBlank = (line) => /^[ \t]*$/.test(line);

// Where `text` ends less its trailing spaces and tabs. A loop: /[ \t]+$/ would try again from
// every space of a long run, in quadratic time.
function trimmedEnd(text) {
  let end = text.length;
  while (end > 0 && (text[end - 1] === " " || text[end - 1] === "\t")) end -= 1;
  return end;
}

function indentOf(line) {
  let column = 0;
  for (const char of line) {
    if (char === " ") column += 1;
    else if (char === "\t") column += 4 - (column % 4);
    else break;
  }
  return column;
}

// `line` less `columns` columns of indentation (a tab that straddles the cut leaves spaces).
function dedent(line, columns) {
  let column = 0;
  let index = 0;
  while (index < line.length && column < columns && (line[index] === " " || line[index] === "\t")) {
    column += line[index] === " " ? 1 : 4 - (column % 4);
    index += 1;
  }
  return " ".repeat(Math.max(0, column - columns)) + line.slice(index);
}

function fenceOpening(line) {
  const match = FENCE.exec(line);
  // A backtick fence's info string may not hold a backtick (it would be a code span).
  if (!match || (match[2][0] === "`" && match[3].includes("`"))) return null;
  return { indent: match[1].length, fence: match[2], lang: match[3].trim().split(/\s+/)[0] };
}

function listMarker(line) {
  const match = LIST_ITEM.exec(line);
  if (!match || RULE.test(line)) return null;
  const [, indent, marker, spaces, rest] = match;
  const ordered = /^\d/.test(marker);
  // Content starts after the marker and its spaces; five or more spaces mean code in CommonMark,
  // text here, so the content starts one space after the marker.
  const gap = rest === "" || spaces.length > 4 ? 1 : spaces.length;
  return {
    ordered,
    kind: marker.slice(-1),
    start: ordered ? parseInt(marker, 10) : 1,
    contentIndent: indent.length + marker.length + gap,
    first: " ".repeat(Math.max(0, spaces.length - gap)) + rest,
  };
}

// A quote or a list starts at `line` only while blocks may nest deeper; past that it is text.
function startsQuote(line, depth) {
  return depth < MAX_NESTING && QUOTE.test(line);
}

function startsList(line, depth) {
  return depth < MAX_NESTING ? listMarker(line) : null;
}

function sameList(a, b) {
  return a.ordered === b.ordered && a.kind === b.kind;
}

function splitRow(line) {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  const cells = [""];
  for (let index = 0; index < text.length; index += 1) {
    if (text[index] === "\\" && text[index + 1] === "|") {
      cells[cells.length - 1] += "|";
      index += 1;
    } else if (text[index] === "|") {
      cells.push("");
    } else {
      cells[cells.length - 1] += text[index];
    }
  }
  return cells.map((cell) => cell.trim());
}

function startsTable(lines, index) {
  const head = lines[index];
  const delimiter = lines[index + 1];
  return (
    head.includes("|") &&
    delimiter !== undefined &&
    delimiter.includes("|") &&
    TABLE_DELIMITER.test(delimiter) &&
    splitRow(head).length === splitRow(delimiter).length
  );
}

// Whether lines[index] starts a block that ends a paragraph above it, `depth` blocks deep.
function interruptsParagraph(lines, index, depth) {
  const line = lines[index];
  if (fenceOpening(line) || HEADING.test(line) || RULE.test(line) || startsQuote(line, depth)) return true;
  const marker = startsList(line, depth);
  // An ordered list interrupts only from 1, so that "2024. A good year" in a sentence stays text.
  if (marker && (!marker.ordered || marker.start === 1)) return true;
  return startsTable(lines, index);
}

// A paragraph's lines as inline text: indentation dropped, two trailing spaces a hard break.
function joinLines(lines) {
  return lines
    .map((line, index) => {
      const text = line.replace(/^[ \t]+/, "");
      const hardBreak = index < lines.length - 1 && text.endsWith("  ");
      return text.slice(0, trimmedEnd(text)) + (hardBreak ? "\\" : "");
    })
    .join("\n");
}

function readFence(lines, index, opening) {
  const body = [];
  let next = index + 1;
  while (next < lines.length) {
    const close = FENCE_CLOSE.exec(lines[next]);
    next += 1;
    if (close && close[1][0] === opening.fence[0] && close[1].length >= opening.fence.length) break;
    body.push(dedent(lines[next - 1], opening.indent));
  }
  // An unclosed fence (a reply still streaming) runs to the end, as CommonMark says.
  return [{ type: "code", lang: opening.lang, text: body.join("\n") }, next];
}

// A heading's text less its closing #s ("## Title ##"), which close it only after a space.
function headingText(text) {
  let end = trimmedEnd(text);
  let hashes = end;
  while (hashes > 0 && text[hashes - 1] === "#") hashes -= 1;
  if (hashes < end && (hashes === 0 || text[hashes - 1] === " " || text[hashes - 1] === "\t")) end = hashes;
  return text.slice(0, end).trim();
}

function readHeading(lines, index, match) {
  return [{ type: "heading", level: match[1].length, text: headingText(match[2] || "") }, index + 1];
}

function readQuote(lines, index, depth) {
  const inner = [];
  let next = index;
  while (next < lines.length) {
    const match = QUOTE.exec(lines[next]);
    const lazy = !match && !isBlank(lines[next]) && inner.length > 0 && !isBlank(inner[inner.length - 1]);
    if (match) inner.push(match[1]);
    else if (lazy && !interruptsParagraph(lines, next, depth)) inner.push(lines[next]);
    else break;
    next += 1;
  }
  return [{ type: "quote", children: parseBlocks(inner, depth + 1) }, next];
}

// Whether lines[index], not indented enough for the item, still goes on the item's paragraph.
function lazyLine(itemLines, lines, index, depth) {
  const paragraphOpen = !isBlank(itemLines[itemLines.length - 1]);
  return paragraphOpen && !listMarker(lines[index]) && !interruptsParagraph(lines, index, depth);
}

// One list item's lines, less its indentation: indented lines, blank lines followed by one,
// and unindented lines that go on its paragraph.
function readItem(lines, index, marker, depth) {
  const itemLines = [marker.first];
  let next = index + 1;
  while (next < lines.length) {
    const line = lines[next];
    if (isBlank(line)) {
      let after = next;
      while (after < lines.length && isBlank(lines[after])) after += 1;
      if (after === lines.length || indentOf(lines[after]) < marker.contentIndent) break;
      while (next < after) {
        itemLines.push("");
        next += 1;
      }
      continue;
    }
    if (indentOf(line) >= marker.contentIndent) itemLines.push(dedent(line, marker.contentIndent));
    else if (lazyLine(itemLines, lines, next, depth)) itemLines.push(line);
    else break;
    next += 1;
  }
  return [itemLines, next];
}

function readList(lines, index, first, depth) {
  const items = [];
  let loose = false;
  let next = index;
  for (;;) {
    const marker = listMarker(lines[next]);
    const [itemLines, end] = readItem(lines, next, marker, depth);
    const children = parseBlocks(itemLines, depth + 1);
    items.push(children);
    loose = loose || children.some((child, position) => position > 0 && child.gapBefore);
    next = end;
    let after = next;
    while (after < lines.length && isBlank(lines[after])) after += 1;
    const following = after < lines.length ? listMarker(lines[after]) : null;
    if (!following || !sameList(following, first)) break;
    // Items apart by a blank line make a loose list (paragraphs); a trailing blank ends the list.
    loose = loose || after > next;
    next = after;
  }
  return [{ type: "list", ordered: first.ordered, start: first.start, loose, items }, next];
}

// A table's rows end at a blank line or another block, and once they would need more empty
// cells (rows shorter than the header) than the table's source has characters: as in cmark-gfm,
// a wide header over many one-character rows must not make millions of cells.
function readTable(lines, index, depth) {
  const head = splitRow(lines[index]);
  const aligns = splitRow(lines[index + 1]).map((cell) => {
    if (cell.startsWith(":") && cell.endsWith(":")) return "center";
    if (cell.endsWith(":")) return "right";
    return cell.startsWith(":") ? "left" : "";
  });
  const rows = [];
  let size = lines[index].length + lines[index + 1].length;
  let emptyCells = 0;
  let next = index + 2;
  while (next < lines.length && !isBlank(lines[next]) && !interruptsParagraph(lines, next, depth)) {
    const row = splitRow(lines[next]);
    size += lines[next].length + 1;
    emptyCells += Math.max(0, head.length - row.length);
    if (emptyCells > size) break;
    rows.push(row);
    next += 1;
  }
  return [{ type: "table", head, aligns, rows }, next];
}

function readParagraph(lines, index, depth) {
  const text = [lines[index]];
  let next = index + 1;
  while (next < lines.length && !isBlank(lines[next])) {
    const underline = SETEXT.exec(lines[next]);
    if (underline) {
      return [{ type: "heading", level: underline[1][0] === "=" ? 1 : 2, text: joinLines(text) }, next + 1];
    }
    if (interruptsParagraph(lines, next, depth)) break;
    text.push(lines[next]);
    next += 1;
  }
  return [{ type: "paragraph", text: joinLines(text) }, next];
}

function readBlock(lines, index, depth) {
  const line = lines[index];
  const opening = fenceOpening(line);
  if (opening) return readFence(lines, index, opening);
  const heading = HEADING.exec(line);
  if (heading) return readHeading(lines, index, heading);
  if (RULE.test(line)) return [{ type: "rule" }, index + 1];
  if (startsQuote(line, depth)) return readQuote(lines, index, depth);
  const marker = startsList(line, depth);
  if (marker) return readList(lines, index, marker, depth);
  if (startsTable(lines, index)) return readTable(lines, index, depth);
  return readParagraph(lines, index, depth);
}

// The blocks of `lines`, `depth` quotes and lists deep, each with its source (`raw`) and whether
// a blank line came before it.
function parseBlocks(lines, depth) {
  const blocks = [];
  let gapBefore = false;
  let index = 0;
  while (index < lines.length) {
    if (isBlank(lines[index])) {
      gapBefore = blocks.length > 0;
      index += 1;
      continue;
    }
    const [block, next] = readBlock(lines, index, depth);
    block.raw = lines.slice(index, next).join("\n");
    block.gapBefore = gapBefore;
    blocks.push(block);
    gapBefore = false;
    index = next;
  }
  return blocks;
}

// -- rendering --------------------------------------------------------------------------------

function codeBlock(block) {
  const code = element("code", null, [block.text]);
  const head = element("div", "code-head");
  // The language and the button's label come from CSS (attr() and content), so the reply's
  // text (select all, textContent) holds only the code.
  if (/^[\w+#.-]{1,40}$/.test(block.lang)) head.dataset.lang = block.lang;
  const copy = element("button", "code-copy");
  copy.type = "button";
  copy.setAttribute("aria-label", "Copy code");
  copy.title = "Copy code";
  head.append(copy);
  return element("div", "code-block", [head, element("pre", null, [code])]);
}

function table(block) {
  const row = (cells, tag) =>
    element(
      "tr",
      null,
      block.head.map((_, column) => {
        const cell = element(tag, null, inlineNodes(cells[column] || ""));
        if (block.aligns[column]) cell.className = "align-" + block.aligns[column];
        return cell;
      })
    );
  const head = element("thead", null, [row(block.head, "th")]);
  const body = element("tbody", null, block.rows.map((cells) => row(cells, "td")));
  return element("div", "table-wrap", [element("table", null, [head, body])]);
}

function list(block) {
  const made = element(block.ordered ? "ol" : "ul");
  if (block.ordered && block.start !== 1) made.start = block.start;
  for (const children of block.items) {
    // A tight list's paragraphs are its items' bare text, as in CommonMark.
    const parts = children.map((child) =>
      block.loose || child.type !== "paragraph" ? [renderBlock(child)] : inlineNodes(child.text)
    );
    made.append(element("li", null, parts.flat()));
  }
  return made;
}

function renderBlock(block) {
  switch (block.type) {
    case "heading":
      return element("h" + block.level, null, inlineNodes(block.text));
    case "code":
      return codeBlock(block);
    case "quote":
      return element("blockquote", null, block.children.map(renderBlock));
    case "list":
      return list(block);
    case "table":
      return table(block);
    case "rule":
      return element("hr");
    default:
      return element("p", null, inlineNodes(block.text));
  }
}

// The source and node of each top-level block rendered into a container, in order.
const renderedBlocks = new WeakMap();
// Containers whose markdown failed to render: they show their text as it is from then on.
const plainText = new WeakSet();

// Renders markdown `source` into `container`, again as the source grows: a top-level block
// whose source is unchanged keeps its node, so only the blocks that changed are rebuilt.
function renderBlocks(container, source) {
  const blocks = parseBlocks(source.split(/\r?\n/), 0);
  let before = renderedBlocks.get(container);
  if (!before) {
    container.replaceChildren(); // the plain text of a render that failed, if any
    before = [];
  }
  const after = blocks.map((block, index) => {
    const old = before[index];
    if (old && old.raw === block.raw) return old;
    const fresh = { raw: block.raw, node: renderBlock(block) };
    if (old) old.node.replaceWith(fresh.node);
    else container.append(fresh.node);
    return fresh;
  });
  for (const old of before.slice(blocks.length)) old.node.remove();
  renderedBlocks.set(container, after);
}

// Renders markdown `source` into `container` (see renderBlocks). Should the renderer ever fail,
// the reply shows as its plain text instead: never lost, nor the page left busy or its history
// unloaded, over its formatting.
export function renderMarkdown(container, source) {
  if (plainText.has(container)) {
    container.textContent = source; // once failed, the rest of the stream stays plain: no retry each frame
    return;
  }
  try {
    renderBlocks(container, source);
  } catch (error) {
    renderedBlocks.delete(container);
    plainText.add(container);
    container.textContent = source;
    console.error("The reply is shown as plain text: its markdown could not be rendered.", error);
  }
}
