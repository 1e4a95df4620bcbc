// The key dialogs: create, shown once, details (with the key's usage chart and activity), edit
// limits, rotate, revoke and delete.

import {
  $, ApiError, chips, clearError, close, dateFormat, h, localDate, open, parseTime,
  showError, showOnce, when,
} from "./dom.js";
import { SCOPE_RE, api, canWrite, covered, isMaster, session } from "./api.js";
import { describeCredits, describeRate, fillLimits, limitsError, normalLimits, readLimits } from "./limits.js";
import { atLimit, inSubtree, lastUsed, reload, replaceKey, state, statusBadge, statusOf } from "./keys.js";
import { loadKeyActivity } from "./activity.js";
import { showKeyUsage } from "./usage.js";

let current = null; // the key in the details dialog

export const currentKey = () => current;
export function forgetCurrent() {
  current = null;
}

/** "API key 2026-12-01 14:05:09 UTC": the name the API gives a key created without one. */
function defaultName(now) {
  const pad = (n) => String(n).padStart(2, "0");
  return `API key ${now.getUTCFullYear()}-${pad(now.getUTCMonth() + 1)}-${pad(now.getUTCDate())} ` +
    `${pad(now.getUTCHours())}:${pad(now.getUTCMinutes())}:${pad(now.getUTCSeconds())} UTC`;
}

// Create

export function openCreate() {
  if (!canWrite() || atLimit() || state.policy === null) return;
  const form = $("create-form");
  form.reset();
  clearError("create-error");
  $("create-owner").replaceChildren(document.createTextNode("For owner "), h("strong", { text: state.owner }));
  $("create-name").placeholder = defaultName(new Date());

  const declared = (session.config.scopes || []).filter((d) => covered(d.scope));
  const choice = $("create-scopes-choice");
  const text = $("create-scopes-text");
  if ((session.config.scopes || []).length > 0) {
    choice.hidden = false;
    text.hidden = true;
    const list = $("create-scope-list");
    list.replaceChildren(...declared.map((d, i) => {
      const id = `scope-${i}`;
      return h("label", { class: "scope-option", for: id },
        h("input", { type: "checkbox", id, value: d.scope }),
        h("span", { class: "scope-name", text: d.scope }),
        h("span", { class: "scope-desc", text: d.description }));
    }));
    if (declared.length === 0) {
      list.append(h("p", { class: "hint", text: "This key covers none of the scopes the service declares." }));
    }
  } else {
    choice.hidden = true;
    text.hidden = false;
  }

  const expires = $("create-expires");
  const never = $("create-never");
  const neverLabel = $("create-never-label");
  const today = new Date();
  expires.min = localDate(today);
  const latest = parseTime(state.policy.latest_expires_at);
  expires.max = latest ? localDate(latest) : "";
  const preset = parseTime(state.policy.default_expires_at);
  neverLabel.hidden = !state.policy.never_expires_allowed;
  never.checked = state.policy.never_expires_allowed && preset === null;
  expires.value = preset ? localDate(preset) : "";
  expires.disabled = never.checked;
  describeExpiry();
  $("create-limits").open = false;
  fillLimits("create", { rate_limit: null, credits: null });
  open("create-dialog");
  $("create-name").focus();
}

function describeExpiry() {
  const hint = $("create-expires-hint");
  const parts = [];
  if (state.policy.never_expires_allowed) parts.push("Choose a date, or Never.");
  else parts.push("Choose a date: keys must expire.");
  if (state.policy.max_lifetime_seconds) parts.push(`At most ${Math.floor(state.policy.max_lifetime_seconds / 86400)} days from today.`);
  if (!isMaster() && session.me.expires_at) parts.push(`No later than your own key (${dateFormat.format(new Date(session.me.expires_at))}).`);
  parts.push("The key stops working at the end of that day.");
  hint.textContent = parts.join(" ");
}

function chosenScopes() {
  if (!$("create-scopes-choice").hidden) {
    return [...document.querySelectorAll("#create-scope-list input:checked")].map((input) => input.value);
  }
  return $("create-scopes").value.split(/[\s,]+/).filter(Boolean);
}

export async function create(event) {
  event.preventDefault();
  clearError("create-error");
  const name = $("create-name").value.trim();
  const scopes = chosenScopes();
  if (scopes.length === 0) {
    showError("create-error", new ApiError(0, "", "Choose at least one scope."));
    return;
  }
  const malformed = scopes.filter((scope) => !SCOPE_RE.test(scope));
  if (malformed.length > 0) {
    showError("create-error", new ApiError(0, "", `Not a scope: ${malformed.join(", ")}. Use resource:action, e.g. ledgers:read.`));
    $("create-scopes").focus();
    return;
  }
  const wider = scopes.filter((scope) => !covered(scope));
  if (wider.length > 0) {
    showError("create-error", new ApiError(0, "", `Your key cannot grant ${wider.join(", ")}: it can only delegate scopes it holds.`));
    return;
  }
  let limits;
  try {
    limits = readLimits("create");
  } catch (error) {
    $("create-limits").open = true;
    if (limitsError("create-error", error)) return;
    throw error;
  }
  const body = { scopes };
  if (name) body.name = name;
  if (limits.rate_limit) body.rate_limit = limits.rate_limit;
  if (limits.credits) body.credits = limits.credits;
  if (isMaster()) body.owner = state.owner;
  if (!$("create-never").checked || !state.policy.never_expires_allowed) {
    const value = $("create-expires").value;
    if (!value) {
      showError("create-error", new ApiError(0, "", "Choose an expiry date."));
      $("create-expires").focus();
      return;
    }
    const [y, m, d] = value.split("-").map(Number);
    let at = new Date(y, m - 1, d, 23, 59, 59);
    const latest = parseTime(state.policy.latest_expires_at);
    if (latest !== null && at > latest) at = latest;
    if (at.getTime() <= Date.now()) {
      showError("create-error", new ApiError(0, "", "The expiry date must be in the future."));
      $("create-expires").focus();
      return;
    }
    body.expires_at = at.toISOString().replace(/\.\d{3}Z$/, "Z");
  }
  const button = $("create-submit");
  button.disabled = true;
  try {
    const { data } = await api("POST", "api-keys", { body });
    close("create-dialog");
    showSecret("Your new key", data);
    reload();
  } catch (error) {
    if (session.secret !== null) showError("create-error", error);
  } finally {
    button.disabled = false;
  }
}

// Shown once

function showSecret(title, created) {
  showOnce(title, [
    document.createTextNode("For "), h("strong", { text: created.name }),
    document.createTextNode(` (${created.masked_key}), owner ${created.owner_id}.`),
  ], created.key);
}

// Details

function detailRows(key) {
  const rows = [
    ["Name", key.name],
    ["Key id", h("code", { text: key.api_key_id })],
    ["Key", h("code", { text: key.masked_key })],
    ["Owner", key.owner_id],
    ["Account", key.account_id],
    ["Scopes", chips(key.scopes)],
    ["Status", statusOf(key)],
    ["Created", when(key.created_at, { withTime: true })],
    ["Created by", key.created_by ? h("code", { text: key.created_by }) : "The master key"],
    ["Expires", when(key.expires_at, { never: "Never", withTime: true })],
    ["Last used", lastUsed(key)],
    ["Rate limit", describeRate(key.rate_limit)],
    ["Credits", describeCredits(key.credits)],
    ["Rotated", when(key.rotated_at, { never: "Never rotated", withTime: true })],
    ["Revoked", when(key.revoked_at, { never: "Not revoked", withTime: true })],
  ];
  return rows.flatMap(([term, value]) => [
    h("dt", { text: term }),
    h("dd", {}, typeof value === "string" ? document.createTextNode(value) : value),
  ]);
}

function fillDetails(key) {
  current = key;
  $("details-title").textContent = key.name;
  $("details-status").replaceWith(Object.assign(statusBadge(key), { id: "details-status" }));
  $("details-list").replaceChildren(...detailRows(key));
  const live = statusOf(key) === "Active";
  $("details-limits").hidden = key.is_revoked || !canWrite();
  $("details-rotate").hidden = !live || !canWrite();
  $("details-revoke").hidden = key.is_revoked || !canWrite();
  $("details-delete").hidden = !isMaster();
}

export async function openDetails(id) {
  const known = state.keys.find((key) => key.api_key_id === id);
  if (!known) return;
  clearError("details-error");
  fillDetails(known);
  open("details-dialog");
  if (inSubtree(known)) {
    loadKeyActivity(id);
    showKeyUsage(id);
  } else {
    outsideSubtree();
  }
  try {
    const { data } = await api("GET", `api-keys/${encodeURIComponent(id)}`);
    if (current && current.api_key_id === id) fillDetails(data);
    replaceKey(data);
  } catch (error) {
    if (session.secret !== null) showError("details-error", error);
  }
}

/** A scoped key sees the usage and activity of its own subtree only: say so instead of asking. */
function outsideSubtree() {
  const note = "Only your key and the keys it created show their usage and activity here.";
  for (const id of ["key-activity", "key-usage-chart", "key-usage-table"]) $(id).replaceChildren();
  for (const id of ["key-activity-error", "key-usage-error"]) clearError(id);
  $("key-usage-summary").textContent = note;
  $("key-activity-status").textContent = note;
  $("key-activity-more").hidden = true;
}

function summary(target, key) {
  $(target).replaceChildren(
    h("dt", { text: "Name" }), h("dd", { text: key.name }),
    h("dt", { text: "Key" }), h("dd", {}, h("code", { text: key.masked_key })),
    h("dt", { text: "Last used" }), h("dd", {}, lastUsed(key)),
  );
}

// Edit limits

export function openLimits() {
  if (!current || !canWrite()) return;
  clearError("limits-error");
  $("limits-name").textContent = current.name;
  fillLimits("limits", normalLimits(current));
  open("limits-dialog");
  $("limits-rate").focus();
}

export async function saveLimits(event) {
  event.preventDefault();
  if (!current) return;
  clearError("limits-error");
  let wanted;
  try {
    wanted = readLimits("limits");
  } catch (error) {
    if (limitsError("limits-error", error)) return;
    throw error;
  }
  // Only what changed: re-sending unchanged credits would reset the count to a stale figure.
  const before = normalLimits(current);
  const body = {};
  if (JSON.stringify(wanted.rate_limit) !== JSON.stringify(before.rate_limit)) body.rate_limit = wanted.rate_limit;
  if (JSON.stringify(wanted.credits) !== JSON.stringify(before.credits)) body.credits = wanted.credits;
  if (Object.keys(body).length === 0) {
    close("limits-dialog");
    return;
  }
  const id = current.api_key_id;
  const button = $("limits-submit");
  button.disabled = true;
  try {
    const { data } = await api("PATCH", `api-keys/${encodeURIComponent(id)}`, { body });
    close("limits-dialog");
    if (current && current.api_key_id === id) fillDetails(data);
    replaceKey(data);
  } catch (error) {
    if (session.secret !== null) showError("limits-error", error);
  } finally {
    button.disabled = false;
  }
}

// Rotate

export function openRotate() {
  if (!current) return;
  $("rotate-form").reset();
  clearError("rotate-error");
  $("rotate-name").textContent = current.name;
  open("rotate-dialog");
  $("rotate-grace").focus();
}

export async function rotate(event) {
  event.preventDefault();
  if (!current) return;
  clearError("rotate-error");
  const grace = Number($("rotate-grace").value);
  const body = {};
  if (grace > 0) body.grace_period_seconds = grace;
  if ($("rotate-descendants").checked) body.revoke_descendants = true;
  const button = $("rotate-submit");
  button.disabled = true;
  try {
    const { data } = await api("POST", `api-keys/${encodeURIComponent(current.api_key_id)}/rotate`, { body });
    close("rotate-dialog");
    close("details-dialog");
    showSecret("Your rotated key", data);
    reload();
  } catch (error) {
    if (session.secret !== null) showError("rotate-error", error);
  } finally {
    button.disabled = false;
  }
}

// Revoke

/**
 * Shows what a revoke or delete answered: on how many of the fleet's live instances the key was
 * dropped before the answer (the `Revocation-*` headers), or just that it ended where the service
 * runs alone; and how many requests in flight under it were ended.
 */
function showReceipt(key, verb, headers) {
  const node = $("revoke-receipt");
  const acknowledged = Number.parseInt(headers.get("revocation-acknowledged") ?? "", 10);
  const instances = Number.parseInt(headers.get("revocation-instances") ?? "", 10);
  const elapsed = Number.parseInt(headers.get("revocation-elapsed-ms") ?? "", 10);
  let message = `${key.name || key.api_key_id} ${verb}.`;
  node.classList.remove("warning");
  if (Number.isFinite(acknowledged) && Number.isFinite(instances) && instances > 0) {
    const took = Number.isFinite(elapsed) ? ` in ${elapsed} ms` : "";
    message = `${key.name || key.api_key_id} ${verb} on ${acknowledged} of ${instances} instances${took}.`;
    if (acknowledged < instances) {
      node.classList.add("warning");
      message += " The others did not answer in time: they stop trusting their caches within the fleet's bound.";
    }
  }
  const ended = Number.parseInt(headers.get("revocation-requests-ended") ?? "", 10);
  if (Number.isFinite(ended) && ended > 0) {
    message += ended === 1
      ? " 1 request in flight under it was ended."
      : ` ${ended} requests in flight under it were ended.`;
  }
  node.textContent = message;
  node.hidden = false;
}

export function openRevoke() {
  if (!current) return;
  clearError("revoke-error");
  summary("revoke-summary", current);
  open("revoke-dialog");
  $("revoke-submit").focus();
}

export async function revoke(event) {
  event.preventDefault();
  if (!current) return;
  clearError("revoke-error");
  const button = $("revoke-submit");
  button.disabled = true;
  try {
    const revoked = current;
    const { headers } = await api("DELETE", `api-keys/${encodeURIComponent(current.api_key_id)}`);
    close("revoke-dialog");
    close("details-dialog");
    showReceipt(revoked, "revoked", headers);
    await reload();
  } catch (error) {
    if (session.secret !== null) showError("revoke-error", error);
  } finally {
    button.disabled = false;
  }
}

// Delete (master key only)

export function openDelete() {
  if (!current || !isMaster()) return;
  clearError("delete-error");
  summary("delete-summary", current);
  $("delete-confirm").value = "";
  $("delete-submit").disabled = true;
  open("delete-dialog");
  $("delete-confirm").focus();
}

export async function remove(event) {
  event.preventDefault();
  if (!current || $("delete-confirm").value !== current.name) return;
  clearError("delete-error");
  const button = $("delete-submit");
  button.disabled = true;
  try {
    const deleted = current;
    const { headers } = await api("DELETE", `api-keys/${encodeURIComponent(current.api_key_id)}`, { query: { permanent: "true" } });
    close("delete-dialog");
    close("details-dialog");
    showReceipt(deleted, "deleted", headers);
    await reload();
  } catch (error) {
    if (session.secret !== null) showError("delete-error", error);
    button.disabled = false;
  }
}
