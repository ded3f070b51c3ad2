// Building the page without HTML strings: every value becomes a text node
// (textContent), never markup, so a patient name or config value that looks
// like HTML is shown as the characters it is.
const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function h(tag, attrs, ...children) { return build(document.createElement(tag), attrs, children); }
export function s(tag, attrs, ...children) { return build(document.createElementNS(SVG_NS, tag), attrs, children); }
export function clear(el, ...children) { el.replaceChildren(); append(el, children); return el; }

export function table(columns, rows, rowAttrs = () => ({})) {
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map(c => h("th", {}, c.title)))),
    h("tbody", {}, rows.length ? rows.map(r => h("tr", rowAttrs(r), columns.map(c => h("td", { class: c.cls }, c.cell(r)))))
      : h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, "nothing here"))));
}

export function when(epochSeconds) {
  if (epochSeconds === null || epochSeconds === undefined) return "";
  return new Date(epochSeconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

export function ms(seconds) {
  return seconds === null || seconds === undefined ? "–" : `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`;
}

export function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, err && err.message ? err.message : String(err));
}

// A confirmation in a modal dialog; with `typed`, the operator must type it (purges).
export function confirmAction(text, typed) {
  const dlg = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  const label = document.getElementById("confirm-typed-label");
  const input = document.getElementById("confirm-typed");
  label.hidden = !typed;
  input.value = "";
  document.getElementById("confirm-expected").textContent = typed || "";
  return new Promise(resolve => {
    dlg.addEventListener("close", () => {
      resolve(dlg.returnValue === "ok" && (!typed || input.value === typed));
    }, { once: true });
    dlg.showModal();
  });
}
