// One job: its fields, its attempts, its log (followed as it is written:
// GET /v1/jobs/{id}/log?follow=true), cancel and retry; read again as its
// events come.

import {call, listen, query} from "/ui/api.js";
import {badge, fill, h, table, throttle, when} from "/ui/dom.js";
import {FINAL} from "/ui/jobs.js";

function row(name, ...value) {
  return h("tr", {}, h("th", {}, name), h("td", {}, ...value));
}

function details(job) {
  const what = job.task !== undefined
    ? [h("code", {}, job.task), " ", h("code", {}, JSON.stringify({args: job.args, kwargs: job.kwargs}))]
    : [h("code", {}, (job.command || []).join(" "))];
  return h("table", {class: "details"}, h("tbody", {},
    row("Id", h("span", {class: "mono", id: "job-id"}, job.id)),
    row("State", badge(job.state), job.wait_reason ? h("span", {class: "muted"}, ` ${job.wait_reason}`) : null),
    row("Name", job.name || ""),
    row(job.task !== undefined ? "Task" : "Command", ...what),
    row("Owner", job.owner || ""),
    row("Queue", job.queue, h("span", {class: "muted"}, ` priority ${job.priority}`)),
    row("Labels", Object.entries(job.labels || {}).map(([k, v]) => h("span", {class: "label"}, `${k}=${v}`))),
    row("Submitted", when(job.created_at)),
    row("Started", when(job.started_at)),
    row("Finished", when(job.finished_at)),
    row("Exit code", job.exit_code === null ? "" : String(job.exit_code)),
    row("Error", job.error || ""),
    row("Worker", job.worker || ""),
    row("Attempts", `${job.attempts.length} of at most ${job.max_attempts}`),
    row("Timeout", job.timeout === null ? "none" : `${job.timeout} s`),
    row("Depends on", job.depends_on.map((id) => h("a", {href: `#/jobs/${id}`, class: "mono"}, id, " "))),
    job.array_id ? row("Array", h("a", {href: `#/arrays/${job.array_id}`, class: "mono"}, job.array_id), ` [${job.array_index}]`) : null,
    job.batch_id ? row("Batch", h("a", {href: `#/batches/${job.batch_id}`, class: "mono"}, job.batch_id)) : null,
  ));
}

function attempts(job) {
  if (!job.attempts.length) return h("p", {class: "muted"}, "No attempt yet.");
  return table(["#", "Holder", "Started", "Finished", "Exit", "Error"],
    job.attempts.map((a) => h("tr", {},
      h("td", {}, String(a.number)), h("td", {}, a.holder), h("td", {}, when(a.started_at)),
      h("td", {}, when(a.finished_at)), h("td", {}, a.exit_code === null ? "" : String(a.exit_code)),
      h("td", {}, a.error || ""))),
    {class: "attempts"});
}

/**
 * A log read into `pre`: with follow, as it is written, until the attempt
 * ends; a follow cut short (the daemon restarted) goes on from the bytes
 * it had. Returns the way to stop it.
 */
function readLog(jobId, stream, attempt, follow, pre, status) {
  const controller = new AbortController();
  const decoder = new TextDecoder();
  let offset = 0;
  let stopped = false;
  fill(pre);
  const run = async () => {
    while (!stopped) {
      const url = `/v1/jobs/${encodeURIComponent(jobId)}/log${query({
        stream, attempt, offset: offset || null, follow: follow ? "true" : null})}`;
      status.textContent = follow ? "following…" : "reading…";
      try {
        const response = await fetch(url, {credentials: "same-origin", signal: controller.signal, cache: "no-store"});
        if (!response.ok) {
          const body = await response.json().catch(() => ({}));
          status.textContent = (body.error && body.error.message) || `HTTP ${response.status}`;
          return;
        }
        const reader = response.body.getReader();
        for (;;) {
          const {done, value} = await reader.read();
          if (done) break;
          offset += value.length;
          pre.appendChild(document.createTextNode(decoder.decode(value, {stream: true})));
          pre.scrollTop = pre.scrollHeight;
        }
        status.textContent = follow ? "the attempt has ended" : `${offset} bytes`;
        pre.dataset.done = "true";
        return;
      } catch (e) {
        if (stopped || e.name === "AbortError") return;
        // Cut short: go on where it stopped, after a pause.
        status.textContent = "cut short; resuming…";
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    }
  };
  run();
  return () => { stopped = true; controller.abort(); };
}

/** The job view, of the job `id`. */
export function jobView(main, id) {
  const heading = h("h1", {}, "Job ", h("span", {class: "mono"}, id));
  const message = h("p", {class: "error", id: "job-message", role: "alert"});
  const cancelButton = h("button", {type: "button", id: "cancel", class: "danger"}, "Cancel");
  const retryButton = h("button", {type: "button", id: "retry"}, "Retry");
  const actions = h("div", {class: "buttons"}, cancelButton, retryButton);
  const info = h("div", {id: "job"}, h("p", {class: "muted"}, "Loading…"));
  const attemptsBox = h("div", {id: "attempts"});
  const streamSelect = h("select", {id: "log-stream"},
    h("option", {value: "stdout"}, "stdout"), h("option", {value: "stderr"}, "stderr"));
  const attemptSelect = h("select", {id: "log-attempt"}, h("option", {value: ""}, "latest"));
  const followBox = h("input", {type: "checkbox", id: "log-follow", checked: true});
  const logStatus = h("span", {class: "muted", id: "log-status"});
  const pre = h("pre", {id: "log", class: "log"});
  fill(main, heading, actions, message, info,
    h("h2", {}, "Attempts"), attemptsBox,
    h("h2", {}, "Log"),
    h("div", {class: "log-controls"},
      h("label", {}, "Stream ", streamSelect), h("label", {}, "Attempt ", attemptSelect),
      h("label", {class: "check"}, followBox, "follow"), logStatus),
    pre);

  let job = null;
  let stopLog = null;
  let loggedAttempt = undefined;
  let attemptsSeen = -1;

  const startLog = () => {
    if (stopLog) stopLog();
    delete pre.dataset.done;
    const attempt = attemptSelect.value || null;
    loggedAttempt = attempt === null && job && job.attempts.length ? job.attempts[job.attempts.length - 1].number : attempt;
    stopLog = readLog(id, streamSelect.value, attempt, followBox.checked, pre, logStatus);
  };
  streamSelect.addEventListener("change", startLog);
  attemptSelect.addEventListener("change", startLog);
  followBox.addEventListener("change", startLog);

  const show = (found) => {
    job = found;
    fill(info, details(job));
    fill(attemptsBox, attempts(job));
    cancelButton.disabled = FINAL.has(job.state);
    retryButton.disabled = !(job.state === "failed" || job.state === "cancelled");
    if (job.attempts.length !== attemptsSeen) {
      attemptsSeen = job.attempts.length;
      const chosen = attemptSelect.value;
      fill(attemptSelect, h("option", {value: ""}, "latest"),
        job.attempts.map((a) => h("option", {value: String(a.number), selected: String(a.number) === chosen}, `#${a.number}`)));
      // A new attempt (a retry): the latest log is its.
      const latest = job.attempts.length ? job.attempts[job.attempts.length - 1].number : undefined;
      if (!chosen && latest !== undefined && latest !== loggedAttempt && pre.dataset.done) {
        startLog();
      }
    }
  };
  const load = async () => {
    try {
      show(await call("GET", `/v1/jobs/${encodeURIComponent(id)}`));
      message.textContent = "";
    } catch (e) {
      message.textContent = e.message;
    }
  };
  const act = async (what) => {
    message.textContent = "";
    try {
      show(await call("POST", `/v1/jobs/${encodeURIComponent(id)}/${what}`));
      if (what === "retry") startLog();
    } catch (e) {
      message.textContent = e.message;
    }
  };
  cancelButton.addEventListener("click", () => act("cancel"));
  retryButton.addEventListener("click", () => act("retry"));

  const refresh = throttle(load, 250);
  load().then(startLog);
  const stop = listen((type, data) => {
    if (type === "worker") return;
    if (type !== "job" || data.job_id === id) refresh();
  });
  return () => { stop(); refresh.stop(); if (stopLog) stopLog(); };
}
