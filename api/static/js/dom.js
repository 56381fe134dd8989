// Building the page: every text goes in through textContent (never HTML), so a file name, a model or an
// event message shows as typed, whatever it holds.

/** h("a", {href: "#/jobs", class: "x", onclick: fn}, "text", child, ...) -> the element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function badge(status) {
  return h("span", { class: `badge badge-${status}` }, status);
}

export function errorBox(err) {
  return h("div", { class: "alert", role: "alert" }, err?.message || String(err));
}

/** A table: columns [{title, cell: row -> node|text, class?}], rows. */
export function table(columns, rows, { empty = "Nothing here yet.", rowAttrs } = {}) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.class }, c.title))));
  const body = h("tbody", {}, rows.length
    ? rows.map((r) => h("tr", rowAttrs ? rowAttrs(r) : {}, columns.map((c) => h("td", { class: c.class }, c.cell(r)))))
    : h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty)));
  return h("table", { class: "table" }, head, body);
}

export function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...children);
}

let notice = null;

/** A message for the next view to show once (a job's deletion, shown on the jobs list it returns to). */
export function leaveNotice(text) { notice = text; }

/** The message left for this view, as a notice element, or null; it is shown once. */
export function takeNotice() {
  const text = notice;
  notice = null;
  return text ? h("div", { class: "notice", role: "status", id: "notice" }, text) : null;
}
