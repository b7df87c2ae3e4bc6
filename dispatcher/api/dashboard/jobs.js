// The jobs: GET /v1/jobs with its filters, newest or oldest first, a page
// at a time (its cursors); the page is read again as job events come.

import {call, listen, query} from "/ui/api.js";
import {badge, fill, h, shortId, table, throttle, when} from "/ui/dom.js";

export const STATES = ["pending", "queued", "staging", "running", "succeeded", "failed", "cancelled"];
export const FINAL = new Set(["succeeded", "failed", "cancelled"]);

// The text filters of GET /v1/jobs, each one value.
const TEXT_FILTERS = [
  ["name", "Name"], ["queue", "Queue"], ["owner", "Owner"],
  ["worker", "Worker"], ["array", "Array"], ["batch", "Batch"],
];

/** The table of some jobs (the jobs view's, a group's members'). */
export function jobsTable(jobs) {
  return table(
    ["Job", "Name", "State", "Queue", "Owner", "Labels", "Submitted", "Finished", "Exit", "Attempts", "Group"],
    jobs.map((job) => h("tr", {"data-job": job.id},
      h("td", {}, h("a", {href: `#/jobs/${job.id}`, title: job.id, class: "mono"}, shortId(job.id))),
      h("td", {}, job.name || ""),
      h("td", {class: "state-cell"}, badge(job.state)),
      h("td", {}, job.queue),
      h("td", {}, job.owner || ""),
      h("td", {}, Object.entries(job.labels || {}).map(([k, v]) => h("span", {class: "label"}, `${k}=${v}`))),
      h("td", {}, when(job.created_at)),
      h("td", {}, when(job.finished_at)),
      h("td", {}, job.exit_code === null || job.exit_code === undefined ? "" : String(job.exit_code)),
      h("td", {}, String((job.attempts || []).length)),
      h("td", {},
        job.array_id ? h("a", {href: `#/arrays/${job.array_id}`, title: job.array_id}, `array ${shortId(job.array_id)}[${job.array_index}]`) : null,
        job.batch_id ? h("a", {href: `#/batches/${job.batch_id}`, title: job.batch_id}, ` batch ${shortId(job.batch_id)}`) : null),
    )),
    {class: "jobs"});
}

/** The jobs view: params are the address's query (the filters, order, cursor). */
export function jobsView(main, params) {
  const states = new Set(params.getAll("state"));
  const order = params.get("order") || "newest";
  const limit = params.get("limit") || "50";
  const cursor = params.get("cursor");

  const checkboxes = STATES.map((state) => h("label", {class: "check"},
    h("input", {type: "checkbox", name: "state", value: state, checked: states.has(state)}), state));
  const texts = TEXT_FILTERS.map(([key, label]) => h("label", {},
    label, h("input", {type: "text", name: key, value: params.get(key) || ""})));
  const labelInput = h("input", {
    type: "text", name: "label", value: params.getAll("label").join(", "),
    placeholder: "key=value, key", title: "Labels, comma-separated: key=value or key (has it); all must match",
  });
  const orderSelect = h("select", {name: "order"},
    h("option", {value: "newest", selected: order === "newest"}, "newest first"),
    h("option", {value: "oldest", selected: order === "oldest"}, "oldest first"));
  const limitSelect = h("select", {name: "limit"},
    ["25", "50", "100", "250"].map((n) => h("option", {value: n, selected: n === limit}, n)));
  const form = h("form", {class: "filters", id: "filters"},
    h("fieldset", {}, h("legend", {}, "State"), checkboxes),
    h("div", {class: "fields"}, texts, h("label", {}, "Labels", labelInput),
      h("label", {}, "Order", orderSelect), h("label", {}, "Per page", limitSelect)),
    h("div", {class: "buttons"},
      h("button", {type: "submit"}, "Filter"),
      h("a", {href: "#/jobs", class: "button secondary"}, "Clear")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = {
      state: checkboxes.map((l) => l.firstChild).filter((c) => c.checked).map((c) => c.value),
      label: labelInput.value.split(",").map((s) => s.trim()).filter(Boolean),
      order: orderSelect.value,
      limit: limitSelect.value,
    };
    for (const [key] of TEXT_FILTERS) next[key] = form.elements[key].value.trim();
    location.hash = `#/jobs${query(next)}`;
  });

  const status = h("p", {class: "muted", id: "jobs-status"}, "Loading…");
  const body = h("div", {id: "jobs"});
  const pager = h("div", {class: "pager"});
  fill(main, h("h1", {}, "Jobs"), form, status, body, pager);

  const apiQuery = {
    state: [...states], label: params.getAll("label"), order, limit, cursor,
  };
  for (const [key] of TEXT_FILTERS) apiQuery[key] = params.get(key);

  let shown = new Set();
  const load = async () => {
    let page;
    try {
      page = await call("GET", `/v1/jobs${query(apiQuery)}`);
    } catch (e) {
      status.textContent = e.message;
      status.className = "error";
      return;
    }
    shown = new Set(page.jobs.map((j) => j.id));
    status.className = "muted";
    status.textContent = page.jobs.length
      ? `${page.jobs.length} job${page.jobs.length === 1 ? "" : "s"} on this page${page.next_cursor ? "; more on the next" : ""}.`
      : page.next_cursor ? "None on this page (the filters examined as many jobs as a page may): go on to the next." : "No jobs.";
    fill(body, page.jobs.length ? jobsTable(page.jobs) : null);
    const here = Object.fromEntries([...params.entries()].filter(([k]) => k !== "cursor" && k !== "state" && k !== "label"));
    const base = {...here, state: [...states], label: params.getAll("label")};
    fill(pager,
      cursor ? h("a", {href: `#/jobs${query(base)}`, class: "button secondary", id: "first-page"}, "« First page") : null,
      page.next_cursor ? h("a", {href: `#/jobs${query({...base, cursor: page.next_cursor})}`, class: "button", id: "next-page"}, "Next page »") : null);
  };
  const refresh = throttle(load, 300);
  refresh();
  const stop = listen((type, data) => {
    if (type === "worker") return;
    if (type === "job") {
      // At once for a job on the page; the page itself read again (a new
      // job, a job that leaves the filter) as often as the throttle lets.
      const row = body.querySelector(`tr[data-job="${CSS.escape(data.job_id)}"]`);
      if (row) fill(row.querySelector(".state-cell"), badge(data.state));
      if (!shown.has(data.job_id) && cursor) return;
    }
    refresh();
  });
  return () => { stop(); refresh.stop(); };
}
