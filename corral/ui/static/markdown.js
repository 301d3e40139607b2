// A small, safe Markdown renderer for model output.
//
// Safety comes first and from one place: the whole source is HTML-escaped before any Markdown is
// recognised, so model text can never become markup; the renderer then only adds its own tags.
// Links are kept only for http(s) URLs. It handles what chat models write: fenced code blocks
// (also an unclosed one, while a reply is still streaming), inline code, headings, bullet and
// numbered lists, block quotes, bold, italics and paragraphs.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Inline markup on already-escaped text; code spans are cut out first so nothing inside them changes.
function inline(text) {
  return text
    .split(/(`[^`\n]+`)/g)
    .map((part, i) => (i % 2 ? `<code>${part.slice(1, -1)}</code>` : emphasis(part)))
    .join("");
}

function emphasis(text) {
  return text
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
}

const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
const QUOTE = /^&gt;\s?(.*)$/;

export function renderMarkdown(source) {
  const lines = escapeHtml(source).split("\n");
  const out = [];
  let i = 0;
  const starts = (line) => FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line) || QUOTE.test(line);
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      const code = [];
      for (i++; i < lines.length && !FENCE.test(lines[i]); i++) code.push(lines[i]);
      i++; // the closing fence (or the end of a reply still streaming)
      const lang = m[1] ? ` class="language-${m[1]}" data-lang="${m[1]}"` : "";
      out.push(`<pre><code${lang}>${code.join("\n")}</code></pre>`);
    } else if ((m = line.match(HEADING))) {
      const level = Math.min(m[1].length + 2, 6); // # in a reply is a section, not the page title
      out.push(`<h${level}>${inline(m[2])}</h${level}>`);
      i++;
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const pattern = BULLET.test(line) ? BULLET : NUMBERED;
      const items = [];
      for (; i < lines.length && pattern.test(lines[i]); i++) items.push(`<li>${inline(lines[i].match(pattern)[1])}</li>`);
      const tag = pattern === BULLET ? "ul" : "ol";
      out.push(`<${tag}>${items.join("")}</${tag}>`);
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(inline(lines[i].match(QUOTE)[1]));
      out.push(`<blockquote>${quoted.join("<br>")}</blockquote>`);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !starts(lines[i]); i++) para.push(inline(lines[i]));
      out.push(`<p>${para.join("<br>")}</p>`);
    }
  }
  return out.join("");
}
