// The dashboard's calls to the API: the session cookie authenticates them
// (the browser sends it; no script can read it), and every write sends the
// session's CSRF token as X-CSRF-Token.

let csrfToken = null;
let unauthorized = () => {};

/** An answer that was not 2xx: its status and the API's error object. */
export class ApiFailure extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.field = error.field || null;
  }
}

/** What to do when a call is answered 401 (the session ended). */
export function onUnauthorized(callback) {
  unauthorized = callback;
}

/**
 * Call the API: method, path (with its query), and a body to send as JSON.
 * Resolves to the answer's JSON (null for none); rejects with ApiFailure.
 */
export async function call(method, path, body, {quiet = false} = {}) {
  const headers = {};
  if (method !== "GET" && method !== "HEAD") {
    headers["Content-Type"] = "application/json";
    if (csrfToken) headers["X-CSRF-Token"] = csrfToken;
  }
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (e) { data = text; }
  }
  if (!response.ok) {
    if (response.status === 401 && !quiet) unauthorized();
    throw new ApiFailure(response.status, data);
  }
  return data;
}

/** Who the caller is (GET /ui/session), or null when not logged in. */
export async function currentSession() {
  try {
    const session = await call("GET", "/ui/session", undefined, {quiet: true});
    csrfToken = session.csrf_token;
    return session;
  } catch (e) {
    if (e.status === 401) return null;
    throw e;
  }
}

/** Log in with a token: the answer sets the cookie, and gives the CSRF token. */
export async function logIn(token) {
  const session = await call("POST", "/ui/session", {token}, {quiet: true});
  csrfToken = session.csrf_token;
  return session;
}

/** End the session (the cookie is cleared by the answer). */
export async function logOut() {
  try {
    await call("DELETE", "/ui/session", undefined, {quiet: true});
  } finally {
    csrfToken = null;
  }
}

/** A query string from an object: arrays repeat the key; empty values are left out. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (Array.isArray(value)) value.forEach((v) => q.append(key, v));
    else if (value !== null && value !== undefined && value !== "") q.append(key, value);
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

// The events stream: one EventSource for the whole page, whose events go
// to every view listening. The browser resumes it after a cut by itself
// (Last-Event-ID); one the daemon refused (a 401, a 503) is opened again
// here, after the last id seen.

const listeners = new Set();
let source = null;
let lastId = null;
let retry = null;
let statusCallback = () => {};

/** Listen to the events: callback(type, data); returns the way to stop. */
export function listen(callback) {
  listeners.add(callback);
  return () => listeners.delete(callback);
}

function tell(type, data) {
  for (const callback of Array.from(listeners)) {
    try { callback(type, data); } catch (e) { console.error(e); }
  }
}

/** Open the events stream; status(true|false) says whether it is connected. */
export function startEvents(status) {
  statusCallback = status || statusCallback;
  if (source) return;
  const url = lastId === null ? "/v1/events" : `/v1/events?after=${encodeURIComponent(lastId)}`;
  source = new EventSource(url);
  source.addEventListener("open", () => statusCallback(true));
  source.addEventListener("error", () => {
    statusCallback(false);
    if (source && source.readyState === EventSource.CLOSED) {
      source = null;
      clearTimeout(retry);
      retry = setTimeout(async () => {
        const session = await currentSession().catch(() => undefined);
        if (session === null) unauthorized();
        else startEvents();
      }, 2000);
    }
  });
  for (const type of ["job", "worker"]) {
    source.addEventListener(type, (message) => {
      if (message.lastEventId) lastId = message.lastEventId;
      tell(type, JSON.parse(message.data));
    });
  }
  // Events were missed (the stream was behind, or resumed past what is
  // kept): every view reads its data again.
  for (const type of ["dropped", "reset"]) {
    source.addEventListener(type, () => tell(type, null));
  }
}

/** Close the events stream. */
export function stopEvents() {
  clearTimeout(retry);
  if (source) source.close();
  source = null;
  lastId = null;
  statusCallback(false);
}
