// The dashboard: its login, its navigation (the part of the address after
// #, so that no view reloads the page), and the views.

import {currentSession, logIn, logOut, onUnauthorized, startEvents, stopEvents} from "/ui/api.js";
import {fill, h} from "/ui/dom.js";
import {jobsView} from "/ui/jobs.js";
import {jobView} from "/ui/job.js";
import {groupsView, groupView} from "/ui/groups.js";
import {queuesView, workersView} from "/ui/queues.js";

const main = document.getElementById("main");
const top = document.getElementById("top");
const who = document.getElementById("who");
const live = document.getElementById("live");
const logoutButton = document.getElementById("logout");

let session = null;
let cleanup = null;

// The views, by the first part of the address: #/jobs, #/jobs/ID,
// #/groups, #/arrays/ID, #/batches/ID, #/queues, #/workers.
const ROUTES = {
  jobs: (rest, params) => (rest ? jobView(main, rest) : jobsView(main, params)),
  groups: () => groupsView(main),
  arrays: (rest) => groupView(main, "array", rest),
  batches: (rest) => groupView(main, "batch", rest),
  queues: () => queuesView(main),
  workers: () => workersView(main),
};

function setLive(connected) {
  live.textContent = connected ? "live" : "offline";
  live.className = connected ? "live on" : "live off";
}

function route() {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  if (!session) {
    showLogin();
    return;
  }
  const [path, search] = location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...rest] = path.split("/");
  const view = ROUTES[name];
  if (!view) {
    location.replace("#/jobs");
    return;
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("current", link.dataset.nav === name ||
      (link.dataset.nav === "groups" && (name === "arrays" || name === "batches")));
  }
  document.title = `${name} · dispatcher`;
  cleanup = view(rest.map(decodeURIComponent).join("/"), new URLSearchParams(search || "")) || null;
}

function loggedIn(answer) {
  session = answer;
  top.hidden = false;
  who.textContent = `${answer.name} (${answer.role})`;
  // With authentication off there is no session to end.
  logoutButton.hidden = !answer.csrf_token;
  startEvents(setLive);
  if (!location.hash || location.hash === "#/login") location.replace("#/jobs");
  route();
}

function showLogin(message) {
  session = null;
  stopEvents();
  top.hidden = true;
  document.title = "Log in · dispatcher";
  const error = h("p", {class: "error", id: "login-error", role: "alert"}, message || "");
  const input = h("input", {
    id: "token", name: "token", type: "password", autocomplete: "off",
    required: true, spellcheck: "false", placeholder: "dsp_…",
  });
  const form = h("form", {id: "login", class: "login"},
    h("h1", {}, "dispatcher"),
    h("label", {for: "token"}, "Token"),
    input,
    h("p", {class: "muted"},
      "A credential's token: the admin token the daemon's first start wrote ",
      "(admin.token in its data directory), or one from ",
      h("code", {}, "dispatcher token create NAME"), "."),
    h("button", {type: "submit"}, "Log in"),
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      const answer = await logIn(input.value.trim());
      input.value = "";
      loggedIn(answer);
    } catch (e) {
      error.textContent = e.message;
    }
  });
  fill(main, form);
  input.focus();
}

logoutButton.addEventListener("click", async () => {
  if (cleanup) { cleanup(); cleanup = null; }
  await logOut().catch(() => {});
  showLogin("Logged out.");
});

onUnauthorized(() => {
  if (session) {
    if (cleanup) { cleanup(); cleanup = null; }
    showLogin("The session ended (it expired, was logged out, the credential was revoked, or the daemon restarted): log in again.");
  }
});

window.addEventListener("hashchange", route);

currentSession().then(
  (answer) => (answer ? loggedIn(answer) : showLogin()),
  (e) => showLogin(`The dispatcher did not answer: ${e.message}`),
);
