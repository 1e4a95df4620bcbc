// The management API client and the signed-in session. The key lives in `session.secret` only (no
// cookie, no storage, never in a URL) and is forgotten on Sign out, on a 401, and when the page
// goes away.

import { ApiError } from "./dom.js";

// The console's own files live beside this module (`/console/api.js`); the API's address in
// config.json is relative to them.
export const HERE = new URL(".", import.meta.url);

export const session = {
  config: { title: "API keys", api_base: "../", key_header: "x-api-key", scopes: [] },
  secret: null, // the signed-in key: memory only
  me: null, // GET /api-keys/self
  generation: 0, // bumped on sign-in/out and owner change: late answers are dropped
  onUnauthorized: () => {}, // set by console.js: a 401 signs out
};

function describeStatus(status) {
  switch (status) {
    case 400: return "The request was not accepted.";
    case 401: return "The key was not accepted.";
    case 403: return "This key is not allowed to do that.";
    case 404: return "The key was not found.";
    case 409: return "The request conflicts with the current state.";
    case 413: return "The request is too large.";
    case 429: return "Too many requests: wait a moment and retry.";
    default: return `The service answered with HTTP ${status}.`;
  }
}

export async function api(method, path, { query, body } = {}) {
  if (session.secret === null) throw new ApiError(401, "SIGNED_OUT", "You are signed out.");
  const started = session.generation;
  const { config } = session;
  const url = new URL(path, new URL(config.api_base, HERE));
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json" };
  headers[config.key_header] = config.key_header === "authorization" ? `Bearer ${session.secret}` : session.secret;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
      referrerPolicy: "no-referrer",
    });
  } catch {
    throw new ApiError(0, "NETWORK_ERROR", "The service could not be reached. Check the connection and retry.");
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!response.ok) {
    const detail = data && typeof data === "object" ? data.error_detail || {} : {};
    const code = typeof detail.code === "string" ? detail.code : `HTTP_${response.status}`;
    let message = typeof detail.message === "string" && detail.message
      ? detail.message
      : data && typeof data.error === "string" ? data.error : describeStatus(response.status);
    if (response.status === 503) {
      message = `The key store is unavailable right now. Wait a moment and retry. (${message})`;
    }
    const error = new ApiError(response.status, code, message);
    if (response.status === 401 && started === session.generation) session.onUnauthorized(error);
    throw error;
  }
  if (started !== session.generation) throw new ApiError(0, "STALE", "superseded");
  return { data, headers: response.headers };
}

// ---- Scopes (the grammar and delegation, as the API applies them) ----------------------------

export const SCOPE_RE = /^(\*|(\*|[a-z0-9_-]+):(\*|[a-z0-9_-]+))$/;

function parts(scope) {
  if (scope === "*") return ["*", "*"];
  const colon = scope.indexOf(":");
  return [scope.slice(0, colon), scope.slice(colon + 1)];
}

function grants(held, wanted) {
  const [hr, ha] = parts(held);
  const [wr, wa] = parts(wanted);
  return (hr === "*" || hr === wr) && (ha === "*" || ha === wa);
}

export const isMaster = () => session.me !== null && session.me.kind === "master";
export const covered = (scope) => session.me !== null && session.me.scopes.some((held) => grants(held, scope));
export const canWrite = () => session.me !== null && (isMaster() || covered("api-keys:write"));
export const canRead = () => canWrite() || covered("api-keys:read");
