// The queues (GET /v1/queues) and the workers (GET /v1/workers), read
// again as events come.

import {call, listen} from "/ui/api.js";
import {fill, h, table, throttle, when} from "/ui/dom.js";
import {STATES} from "/ui/jobs.js";

/** The queues: jobs by state, and running against the limit. */
export function queuesView(main) {
  const message = h("p", {class: "error", role: "alert"});
  const body = h("div", {id: "queues"}, h("p", {class: "muted"}, "Loading…"));
  fill(main, h("h1", {}, "Queues"), message, body);
  const load = async () => {
    try {
      const answer = await call("GET", "/v1/queues");
      const names = Object.keys(answer.queues).sort();
      fill(body, table(["Queue", ...STATES, "Running / limit"],
        names.map((name) => {
          const q = answer.queues[name];
          return h("tr", {"data-queue": name},
            h("td", {}, h("a", {href: `#/jobs?queue=${encodeURIComponent(name)}`}, name)),
            STATES.map((s) => h("td", {class: "number", "data-state": s}, String(q.counts[s] || 0))),
            h("td", {class: "number"}, `${q.running} / ${q.max_running === null ? "∞" : q.max_running}`));
        }), {class: "queues"}));
      message.textContent = "";
    } catch (e) {
      message.textContent = e.message;
    }
  };
  const refresh = throttle(load, 500);
  refresh();
  const stop = listen((type) => { if (type !== "worker") refresh(); });
  return () => { stop(); refresh.stop(); };
}

// The workers' last contacts change without an event: read again this
// often (ms) besides.
const WORKERS_POLL = 10000;

/** The workers heard from: their slots, what they hold, their last contact. */
export function workersView(main) {
  const message = h("p", {class: "error", role: "alert"});
  const body = h("div", {id: "workers"}, h("p", {class: "muted"}, "Loading…"));
  fill(main, h("h1", {}, "Workers"), message, body);
  const load = async () => {
    try {
      const answer = await call("GET", "/v1/workers");
      fill(body,
        h("p", {class: "muted"}, `Leases last ${answer.lease_seconds} s; workers call every ${answer.heartbeat_seconds} s.`),
        answer.workers.length ? table(["Worker", "Slots", "Free", "Resources", "Labels", "Tasks", "Running", "Waiting", "Last contact"],
          answer.workers.map((w) => h("tr", {"data-worker": w.name},
            h("td", {}, w.name, w.name_shared ? h("span", {class: "muted"}, " (shared)") : null),
            h("td", {class: "number"}, String(w.slots)),
            h("td", {class: "number"}, String(w.free.slots)),
            h("td", {}, `${w.resources.cpus} cpu, ${w.resources.memory_mb} MB, ${w.resources.gpus} gpu`),
            h("td", {}, Object.entries(w.labels).map(([k, v]) => h("span", {class: "label"}, `${k}=${v}`))),
            h("td", {}, w.tasks.join(", ")),
            h("td", {}, w.running.map((id) => h("a", {href: `#/jobs/${id}`, class: "mono", title: id}, id.slice(-12), " "))),
            h("td", {}, w.waiting_for_work ? "yes" : ""),
            h("td", {}, when(w.last_contact)))), {class: "workers"})
          : h("p", {class: "muted"}, "No worker has called within a lease's life."));
      message.textContent = "";
    } catch (e) {
      message.textContent = e.message;
    }
  };
  const refresh = throttle(load, 500);
  refresh();
  const timer = setInterval(refresh, WORKERS_POLL);
  const stop = listen(() => refresh());
  return () => { stop(); refresh.stop(); clearInterval(timer); };
}
