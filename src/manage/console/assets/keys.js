// An owner's keys: the table (search, sort, requests over the last 7 days), paging, and the
// active-key count against the policy's limit.

import { $, clearError, count, h, parseTime, plural, showError, when, chips, dateTimeFormat } from "./dom.js";
import { api, canWrite, isMaster, session } from "./api.js";
import { describeCredits, describeRate, limitsCell } from "./limits.js";

const PAGE_SIZE = 25;

export const state = {
  owner: null, // whose keys are shown
  policy: null, // GET /api-keys/policy
  keys: [], // loaded pages, newest first
  cursor: null, // x-next-cursor of the last page
  loadFailed: false, // the last reload failed (the banner says why)
  requests: null, // key id -> GET /api-keys/usage entry (last 7 days); null: unknown
};

export function resetKeys() {
  state.owner = null;
  state.policy = null;
  state.keys = [];
  state.cursor = null;
  state.requests = null;
  $("keys-body").replaceChildren();
  $("key-search").value = "";
  // A revoke's receipt belongs to the owner it was shown for.
  $("revoke-receipt").hidden = true;
}

export function statusOf(key) {
  if (key.is_revoked) return "Revoked";
  const expires = parseTime(key.expires_at);
  if (expires !== null && expires.getTime() <= Date.now()) return "Expired";
  return "Active";
}

export function statusBadge(key) {
  const status = statusOf(key);
  return h("span", { class: `status ${status.toLowerCase()}`, text: status });
}

export function lastUsed(key) {
  const time = parseTime(key.last_used_at);
  if (time === null) return h("span", { text: "Never used" });
  return h("span", {}, when(key.last_used_at, { relativeTime: true }), ` (${dateTimeFormat.format(time)})`);
}

export function atLimit() {
  const { policy } = state;
  return policy !== null && policy.max_active_per_owner !== null && policy.active_keys >= policy.max_active_per_owner;
}

/** Replaces a key everywhere it is shown, after the API answered with its new state. */
export function replaceKey(data) {
  state.keys = state.keys.map((key) => (key.api_key_id === data.api_key_id ? data : key));
  render();
}

export async function reload() {
  const view = session.generation;
  const { owner } = state;
  $("refresh").disabled = true;
  // Requests per key (GET /api-keys/usage): a column, not the page; a service without it shows dashes.
  const requests = api("GET", "api-keys/usage", { query: { owner } }).then(
    ({ data }) => new Map((data.keys || []).map((entry) => [entry.key_id, entry])),
    () => null,
  );
  try {
    const [policyAnswer, page] = await Promise.all([
      api("GET", "api-keys/policy", { query: { owner } }),
      api("GET", "api-keys", { query: { owner, limit: PAGE_SIZE } }),
    ]);
    if (view !== session.generation) return;
    state.policy = policyAnswer.data;
    state.keys = page.data;
    state.cursor = page.headers.get("x-next-cursor");
    state.loadFailed = false;
    clearError("banner");
  } catch (error) {
    if (view === session.generation && session.secret !== null) {
      state.loadFailed = true;
      showError("banner", error);
    }
  } finally {
    $("refresh").disabled = false;
  }
  if (view !== session.generation) return;
  render();
  const answered = await requests;
  if (view !== session.generation) return;
  state.requests = answered;
  render();
}

export async function loadMore() {
  const view = session.generation;
  const button = $("load-more");
  button.disabled = true;
  try {
    const page = await api("GET", "api-keys", { query: { owner: state.owner, limit: PAGE_SIZE, before: state.cursor } });
    if (view !== session.generation) return;
    const seen = new Set(state.keys.map((key) => key.api_key_id));
    state.keys = state.keys.concat(page.data.filter((key) => !seen.has(key.api_key_id)));
    state.cursor = page.headers.get("x-next-cursor");
    render();
  } catch (error) {
    if (view === session.generation && session.secret !== null) showError("banner", error);
  } finally {
    button.disabled = false;
  }
}

/** A key id typed in the search box that is not loaded yet: asked for by id. */
export async function findById(id) {
  if (!/^key_[A-Za-z0-9_-]{4,}$/.test(id) || state.keys.some((key) => key.api_key_id === id)) return;
  const view = session.generation;
  try {
    const { data } = await api("GET", `api-keys/${encodeURIComponent(id)}`, { query: { owner: state.owner } });
    if (view !== session.generation || state.keys.some((key) => key.api_key_id === data.api_key_id)) return;
    state.keys = state.keys.concat([data]);
    render();
  } catch {
    // Not found (or not this owner's): the table says no key matches.
  }
}

/** The shared pools every key of the owner (or of the caller's account) counts against. */
function renderPools() {
  const text = $("pool-text");
  const { policy } = state;
  const pools = policy === null ? [] : [
    ["Owner pool", policy.owner_pool],
    ["Account pool", policy.account_pool],
  ].filter(([, pool]) => pool && (pool.rate_limit || pool.credits));
  text.hidden = pools.length === 0;
  text.textContent = pools
    .map(([label, pool]) => {
      const parts = [];
      if (pool.rate_limit) parts.push(describeRate(pool.rate_limit));
      if (pool.credits) parts.push(`${describeCredits(pool.credits)} credits`);
      return `${label}: ${parts.join(", ")}`;
    })
    .join(" · ");
}

function renderUsage() {
  const text = $("usage-text");
  const meter = $("usage-meter");
  const fill = $("usage-fill");
  const { policy } = state;
  if (policy === null) {
    text.textContent = state.loadFailed ? "Keys could not be loaded" : "Loading…";
    meter.hidden = true;
  } else if (policy.max_active_per_owner === null) {
    const n = policy.active_keys;
    text.textContent = `${n} active ${n === 1 ? "key" : "keys"}`;
    meter.hidden = true;
  } else {
    const n = policy.active_keys;
    const max = policy.max_active_per_owner;
    text.textContent = `${n} of ${max} active keys`;
    meter.hidden = false;
    fill.style.width = `${Math.min(100, Math.round((100 * n) / Math.max(1, max)))}%`;
    meter.classList.toggle("full", n >= max);
  }
  renderPools();
  const create = $("create-open");
  const reason = $("create-reason");
  if (!canWrite()) {
    create.disabled = true;
    reason.textContent = "This key can read keys but not create them: that needs api-keys:write.";
    reason.hidden = false;
  } else if (atLimit()) {
    create.disabled = true;
    reason.textContent = `The limit of ${policy.max_active_per_owner} active keys is reached. Revoke a key to create another.`;
    reason.hidden = false;
  } else {
    create.disabled = policy === null;
    reason.hidden = true;
    reason.textContent = "";
  }
}

/**
 * Whether the signed-in key may read this key's usage and activity: the master key reads every
 * key's; a scoped key its own and those it created, transitively (as far as the loaded keys say).
 */
export function inSubtree(key) {
  if (isMaster()) return true;
  const mine = session.me.api_key_id;
  const byId = new Map(state.keys.map((k) => [k.api_key_id, k]));
  let at = key;
  for (let depth = 0; at && depth < 32; depth += 1) {
    if (at.api_key_id === mine) return true;
    at = at.created_by ? byId.get(at.created_by) : null;
  }
  return false;
}

// ---- Search and sort --------------------------------------------------------------------------

function requestsOf(key) {
  const entry = state.requests === null ? null : state.requests.get(key.api_key_id);
  return entry ? entry.requests : 0;
}

const time = (value) => {
  const parsed = parseTime(value);
  return parsed === null ? null : parsed.getTime();
};

/** Compares with missing values last, whatever the direction. */
function byValue(get, descending) {
  return (a, b) => {
    const x = get(a);
    const y = get(b);
    if (x === null && y === null) return 0;
    if (x === null) return 1;
    if (y === null) return -1;
    const order = typeof x === "string" ? x.localeCompare(y, undefined, { sensitivity: "base", numeric: true }) : x - y;
    return descending ? -order : order;
  };
}

/** Sort choices: [value, label, column, compare]. */
export const SORTS = [
  ["created-desc", "Newest first", "Created", byValue((k) => time(k.created_at), true)],
  ["created-asc", "Oldest first", "Created", byValue((k) => time(k.created_at), false)],
  ["name-asc", "Name, A to Z", "Name", byValue((k) => k.name, false)],
  ["name-desc", "Name, Z to A", "Name", byValue((k) => k.name, true)],
  ["expires-asc", "Expires soonest", "Expires", byValue((k) => time(k.expires_at), false)],
  ["last-used-desc", "Recently used", "Last used", byValue((k) => time(k.last_used_at), true)],
  ["requests-desc", "Most requests (7 d)", "Requests (7 d)", byValue(requestsOf, true)],
];

function shownKeys() {
  const hideRevoked = $("hide-revoked").checked;
  const needle = $("key-search").value.trim().toLowerCase();
  const [, , , compare] = SORTS.find(([value]) => value === $("key-sort").value) || SORTS[0];
  return state.keys
    .filter((key) => !(hideRevoked && key.is_revoked))
    .filter((key) => !needle || key.name.toLowerCase().includes(needle) || key.api_key_id.toLowerCase().includes(needle))
    .sort(compare);
}

function requestsCell(key) {
  if (state.requests === null) return h("span", { class: "muted", title: "Not known", text: "—" });
  if (!inSubtree(key)) return h("span", { class: "muted", title: "Only for your key and the keys it created", text: "—" });
  const entry = state.requests.get(key.api_key_id);
  if (!entry) return h("span", { class: "muted", text: "0" });
  const refused = entry.requests - entry.admitted;
  return h("span", { title: `${count.format(entry.admitted)} admitted, ${count.format(refused)} refused` },
    count.format(entry.requests),
    refused > 0 ? h("span", { class: "refused-count", text: ` (${count.format(refused)} refused)` }) : null);
}

/** The column headers say how the table is sorted (aria-sort). */
function markSortedColumn() {
  const [value, , column] = SORTS.find(([v]) => v === $("key-sort").value) || SORTS[0];
  for (const th of document.querySelectorAll("#keys-table thead th")) {
    if (th.textContent === column) th.setAttribute("aria-sort", value.endsWith("desc") ? "descending" : "ascending");
    else th.removeAttribute("aria-sort");
  }
}

export function render() {
  renderUsage();
  markSortedColumn();
  const shown = shownKeys();
  const rows = shown.map((key) => {
    const status = statusOf(key);
    return h("tr", { class: status === "Active" ? null : status.toLowerCase(), "data-key-id": key.api_key_id },
      h("td", { class: "name", "data-label": "Name" },
        h("button", { type: "button", class: "link", "data-open": key.api_key_id, title: key.name, text: key.name })),
      h("td", { class: "key", "data-label": "Key" }, h("code", { text: key.masked_key })),
      h("td", { class: "scopes", "data-label": "Scopes" }, chips(key.scopes)),
      h("td", { class: "when", "data-label": "Created" }, when(key.created_at)),
      h("td", { class: "when", "data-label": "Expires" }, when(key.expires_at, { never: "Never" })),
      h("td", { class: "when", "data-label": "Last used" }, when(key.last_used_at, { never: "Never used", relativeTime: true })),
      h("td", { class: "requests", "data-label": "Requests (7 d)" }, requestsCell(key)),
      h("td", { class: "limits-cell", "data-label": "Limits" }, limitsCell(key)),
      h("td", { class: "status-cell", "data-label": "Status" }, statusBadge(key)),
    );
  });
  $("keys-body").replaceChildren(...rows);
  const empty = $("keys-empty");
  const searching = $("key-search").value.trim() !== "";
  if (state.policy !== null && shown.length === 0) {
    if (state.keys.length === 0) empty.textContent = `${state.owner} has no keys yet. Create one to get started.`;
    else if (searching) empty.textContent = "No loaded key matches the search. Try another name or key id, or load more keys.";
    else empty.textContent = "Every loaded key is revoked. Clear Hide revoked to see them.";
    empty.hidden = false;
  } else {
    empty.hidden = true;
  }
  $("keys-table").hidden = shown.length === 0;
  $("load-more").hidden = state.cursor === null;
  const revoked = state.keys.filter((key) => key.is_revoked).length;
  $("keys-count").textContent = state.keys.length === 0 ? "" :
    `Showing ${shown.length} of ${state.keys.length} loaded${state.cursor === null ? "" : " (more to load)"}` +
    (revoked ? `, ${revoked} revoked` : "") + (searching ? `, ${plural(shown.length, "match", "matches")}` : "");
}
