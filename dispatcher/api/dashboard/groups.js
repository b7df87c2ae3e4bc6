// Arrays and batches: their progress (GET /v1/arrays/{id},
// /v1/batches/{id}), their members, cancel and retry of all at once.
// The API lists no groups: the list is of those the newest jobs belong to.

import {call, listen, query} from "/ui/api.js";
import {fill, h, shortId, table, throttle, when} from "/ui/dom.js";
import {STATES, jobsTable} from "/ui/jobs.js";

// How many of the newest jobs the list of groups looks through.
const SCAN = 200;

const PLURAL = {array: "arrays", batch: "batches"};

function progress(group) {
  return h("span", {class: "progress"},
    h("progress", {value: String(group.finished), max: String(group.size)}),
    h("span", {class: "progress-text"}, `${group.finished}/${group.size}`));
}

function counts(group) {
  return STATES.filter((s) => group.counts[s]).map((s) =>
    h("span", {class: `count state-${s}`}, `${s} ${group.counts[s]}`));
}

/** The arrays and batches of the newest jobs, with their progress. */
export function groupsView(main) {
  const status = h("p", {class: "muted"}, "Loading…");
  const body = h("div", {id: "groups"});
  fill(main, h("h1", {}, "Arrays & batches"),
    h("p", {class: "muted"}, `Those of the newest ${SCAN} jobs.`), status, body);
  const groups = new Map();

  const render = () => {
    const rows = [...groups.values()].filter((g) => g.view).map(({kind, view}) =>
      h("tr", {"data-group": view.id},
        h("td", {}, kind),
        h("td", {}, h("a", {href: `#/${PLURAL[kind]}/${view.id}`, class: "mono", title: view.id}, shortId(view.id))),
        h("td", {}, view.owner || ""),
        h("td", {}, when(view.created_at)),
        h("td", {}, progress(view)),
        h("td", {}, counts(view)),
        h("td", {}, view.final ? (view.succeeded ? "all succeeded" : "final") : "")));
    status.textContent = rows.length ? "" : "No arrays or batches among the newest jobs.";
    fill(body, rows.length ? table(["Kind", "Id", "Owner", "Submitted", "Progress", "States", ""], rows, {class: "groups"}) : null);
  };
  const readGroup = async (key) => {
    const group = groups.get(key);
    try {
      group.view = await call("GET", `/v1/${PLURAL[group.kind]}/${encodeURIComponent(group.id)}`);
    } catch (e) {
      if (e.status === 404) groups.delete(key);
    }
  };
  const load = async () => {
    const page = await call("GET", `/v1/jobs${query({order: "newest", limit: SCAN})}`);
    for (const job of page.jobs) {
      for (const kind of ["array", "batch"]) {
        const id = job[`${kind}_id`];
        if (id && !groups.has(`${kind}:${id}`)) groups.set(`${kind}:${id}`, {kind, id, view: null});
      }
    }
    await Promise.all([...groups.keys()].map(readGroup));
    render();
  };
  const refresh = throttle(load, 500);
  refresh();
  const stop = listen((type, data) => {
    if (type === "worker") return;
    if (type !== "job" || data.array_id || data.batch_id) refresh();
  });
  return () => { stop(); refresh.stop(); };
}

/** One array or batch: kind "array" or "batch", and its id. */
export function groupView(main, kind, id) {
  const message = h("p", {class: "error", id: "group-message", role: "alert"});
  const summary = h("div", {id: "group"}, h("p", {class: "muted"}, "Loading…"));
  const cancelButton = h("button", {type: "button", id: "cancel-group", class: "danger"}, "Cancel all");
  const retryButton = h("button", {type: "button", id: "retry-group"}, "Retry failed and cancelled");
  const members = h("div", {id: "members"});
  const more = h("p", {});
  fill(main, h("h1", {}, `${kind[0].toUpperCase()}${kind.slice(1)} `, h("span", {class: "mono"}, id)),
    h("div", {class: "buttons"}, cancelButton, retryButton), message, summary,
    h("h2", {}, "Members"), members, more);
  const path = `/v1/${PLURAL[kind]}/${encodeURIComponent(id)}`;

  const show = (group) => {
    fill(summary, h("table", {class: "details"}, h("tbody", {},
      h("tr", {}, h("th", {}, "Progress"), h("td", {}, progress(group))),
      h("tr", {}, h("th", {}, "States"), h("td", {}, counts(group))),
      h("tr", {}, h("th", {}, "Owner"), h("td", {}, group.owner || "")),
      h("tr", {}, h("th", {}, "Submitted"), h("td", {}, when(group.created_at))),
      h("tr", {}, h("th", {}, "Final"), h("td", {id: "group-final"}, group.final ? (group.succeeded ? "yes: every member succeeded" : "yes") : "no")))));
    cancelButton.disabled = group.final;
    retryButton.disabled = !(group.counts.failed || group.counts.cancelled);
  };
  const load = async () => {
    try {
      const [group, page] = await Promise.all([
        call("GET", path),
        call("GET", `/v1/jobs${query({[kind]: id, limit: 100})}`),
      ]);
      show(group);
      fill(members, jobsTable(page.jobs));
      fill(more, page.next_cursor
        ? h("a", {href: `#/jobs${query({[kind]: id, order: "oldest", limit: 100})}`}, "All the members, a page at a time »")
        : null);
    } catch (e) {
      message.textContent = e.message;
    }
  };
  const act = async (what) => {
    message.textContent = "";
    try {
      show(await call("POST", `${path}/${what}`));
    } catch (e) {
      message.textContent = e.message;
    }
    refresh();
  };
  cancelButton.addEventListener("click", () => act("cancel"));
  retryButton.addEventListener("click", () => act("retry"));
  const refresh = throttle(load, 300);
  refresh();
  const stop = listen((type, data) => {
    if (type === "worker") return;
    if (type !== "job" || data[`${kind}_id`] === id) refresh();
  });
  return () => { stop(); refresh.stop(); };
}
