// Building the page's elements. Text always goes in as text (a text node,
// never markup): nothing a job carries (a name, a label, a log line) can
// become part of the page's HTML.

/**
 * An element: h("a", {href: "#/jobs", class: "x"}, "text", child, ...).
 * Attributes starting with "on" are event listeners; null and false ones
 * are left out; children are strings, numbers, elements or arrays of them.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A time the API gave (RFC 3339), as the browser's local time; "" for none. */
export function when(text) {
  if (!text) return "";
  const d = new Date(text);
  if (Number.isNaN(d.getTime())) return text;
  return d.toLocaleString();
}

/** A job's state as a badge. */
export function badge(state) {
  return h("span", {class: `state state-${state}`, "data-state": state}, state);
}

/** The first characters of an id, the whole in its title. */
export function shortId(id) {
  return id ? id.slice(-12) : "";
}

/** A table with a header row and body rows. */
export function table(headers, rows, attrs) {
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((name) => h("th", {}, name)))),
    h("tbody", {}, rows));
}

/**
 * A function that calls `run` at most once at a time and at most once
 * every `ms` milliseconds, once more after a call that came meanwhile:
 * a burst of events refreshes a view once or twice, not once for each.
 */
export function throttle(run, ms) {
  let busy = false;
  let again = false;
  let stopped = false;
  const go = async () => {
    if (stopped) return;
    if (busy) { again = true; return; }
    busy = true;
    again = false;
    try { await run(); } catch (e) { console.error(e); }
    setTimeout(() => { busy = false; if (again) go(); }, ms);
  };
  go.stop = () => { stopped = true; };
  return go;
}
