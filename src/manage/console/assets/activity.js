// Activity: the audit events of one key (in its details) and of a whole owner (the Activity
// page), newest first, with who acted and from where.

import { $, clearError, h, plural, showError, when } from "./dom.js";
import { api, session } from "./api.js";

/** The event types the API writes, with how the page names them. */
export const EVENT_TYPES = [
  ["key.created", "Created"],
  ["key.rotated", "Rotated"],
  ["key.updated", "Updated"],
  ["key.revoked", "Revoked"],
  ["key.deleted", "Deleted"],
  ["key.refused", "Refused"],
  ["key.leaked", "Leaked"],
  ["key.expiring", "Expiring"],
  ["key.idle", "Idle"],
  ["pool.set", "Pool set"],
];

export function typeName(type) {
  const known = EVENT_TYPES.find(([name]) => name === type);
  return known ? known[1] : type;
}

/** Who acted: the master key, or a key's name (its id in the title). */
export function actor(event) {
  const a = event.actor || {};
  if (a.kind === "master") return h("span", { class: "actor master", text: "Master key" });
  return h("span", { class: "actor", title: a.key_id || "" }, a.name || a.key_id || "A key");
}

/** The details worth a line, in words. */
export function describe(event) {
  const d = event.details || {};
  const parts = [];
  switch (event.type) {
    case "key.created":
      if (Array.isArray(d.scopes)) parts.push(`Scopes ${d.scopes.join(", ")}`);
      break;
    case "key.rotated":
      parts.push(d.grace_until ? `Old secret valid until ${new Date(d.grace_until).toLocaleString()}` : "Old secret ended at once");
      if (d.revoke_descendants) parts.push("keys it created revoked");
      break;
    case "key.revoked":
      if (d.reason) parts.push(`Reason: ${d.reason}`);
      if (d.descendants_revoked) parts.push(`${plural(d.descendants_revoked, "key", "keys")} it created revoked too`);
      break;
    case "key.updated":
      if (d.changes && typeof d.changes === "object") parts.push(`Changed ${Object.keys(d.changes).join(", ")}`);
      break;
    case "key.refused":
      if (d.operation) parts.push(`Tried to ${d.operation} a key`);
      if (d.code) parts.push(d.code);
      break;
    default:
      break;
  }
  return parts.join("; ");
}

function address(event) {
  return event.ip ? h("code", { class: "ip", text: event.ip }) : h("span", { class: "muted", text: "unknown address" });
}

// ---- One key's activity (in its details) ------------------------------------------------------

let keyCursor = null;
let keyId = null;

function eventItem(event) {
  const detail = describe(event);
  return h("li", { class: `event type-${event.type.replace(/[^a-z]/g, "-")}` },
    h("span", { class: "event-dot", "aria-hidden": "true" }),
    h("div", { class: "event-body" },
      h("p", { class: "event-line" },
        h("strong", { text: typeName(event.type) }), " by ", actor(event), " from ", address(event)),
      detail ? h("p", { class: "event-detail", text: detail }) : null),
    when(event.at, { withTime: true }));
}

export async function loadKeyActivity(id, { more = false } = {}) {
  const list = $("key-activity");
  const view = session.generation;
  if (!more) {
    keyId = id;
    keyCursor = null;
    list.replaceChildren();
    $("key-activity-status").textContent = "Loading activity…";
  }
  clearError("key-activity-error");
  try {
    const { data } = await api("GET", `api-keys/${encodeURIComponent(id)}/events`, { query: { limit: 20, cursor: more ? keyCursor : null } });
    if (view !== session.generation || keyId !== id) return;
    list.append(...data.events.map(eventItem));
    keyCursor = data.next_cursor || null;
    const n = list.children.length;
    $("key-activity-status").textContent = n === 0 ? "No activity recorded yet." : `${plural(n, "event", "events")}, newest first.`;
  } catch (error) {
    if (view === session.generation && keyId === id) {
      $("key-activity-status").textContent = "";
      showError("key-activity-error", error);
    }
  }
  $("key-activity-more").hidden = keyCursor === null;
}

export function moreKeyActivity() {
  if (keyId !== null) loadKeyActivity(keyId, { more: true });
}

// ---- An owner's activity (the Activity page) --------------------------------------------------

let ownerCursor = null;
let ownerRows = 0;

function keyRef(event, nameOf) {
  if (!event.key_id) return h("span", { class: "muted", text: "—" });
  const name = nameOf(event.key_id);
  return h("span", {}, name ? h("span", { class: "key-name", text: name }) : null, h("code", { text: event.key_id }));
}

function eventRow(event, nameOf) {
  return h("tr", { "data-event-id": event.id },
    h("td", { class: "when", "data-label": "When" }, when(event.at, { withTime: true })),
    h("td", { "data-label": "Event" }, h("span", { class: `event-type type-${event.type.replace(/[^a-z]/g, "-")}`, text: typeName(event.type) })),
    h("td", { class: "key-ref", "data-label": "Key" }, keyRef(event, nameOf)),
    h("td", { "data-label": "By" }, actor(event)),
    h("td", { "data-label": "From" }, address(event)),
    h("td", { class: "event-detail", "data-label": "Details", text: describe(event) || "—" }));
}

export function fillTypeFilter() {
  const select = $("activity-type");
  if (select.options.length > 1) return;
  select.append(...EVENT_TYPES.map(([value, text]) => h("option", { value, text })));
}

/** `nameOf(keyId)`: a key's name where the page knows it. */
export async function loadOwnerActivity(owner, nameOf, { more = false } = {}) {
  const view = session.generation;
  const body = $("activity-body");
  const type = $("activity-type").value || null;
  if (!more) {
    ownerCursor = null;
    ownerRows = 0;
    body.replaceChildren();
    $("activity-count").textContent = "Loading…";
  }
  clearError("activity-error");
  try {
    const { data } = await api("GET", "api-keys/events", { query: { owner, type, limit: 50, cursor: more ? ownerCursor : null } });
    if (view !== session.generation) return;
    body.append(...data.events.map((event) => eventRow(event, nameOf)));
    ownerRows += data.events.length;
    ownerCursor = data.next_cursor || null;
    const kind = type ? ` of type ${typeName(type)}` : "";
    $("activity-count").textContent = ownerRows === 0 ? `No events${kind} yet.` : `${plural(ownerRows, "event", "events")}${kind}${ownerCursor ? " (more to load)" : ""}.`;
    $("activity-table").hidden = ownerRows === 0;
  } catch (error) {
    if (view === session.generation) {
      $("activity-count").textContent = "";
      showError("activity-error", error);
    }
  }
  $("activity-more").hidden = ownerCursor === null;
}

export function moreOwnerActivity(owner, nameOf) {
  loadOwnerActivity(owner, nameOf, { more: true });
}

/** Master key: checks the owner's hash chain and says whether it is intact. */
export async function verifyChain(owner) {
  const status = $("activity-verify-status");
  status.textContent = "Checking…";
  status.className = "verify-status";
  try {
    const { data } = await api("GET", "api-keys/events/verify", { query: { owner } });
    if (data.valid) {
      status.textContent = `Chain intact: ${plural(data.checked, "event", "events")} checked.`;
      status.classList.add("ok");
    } else {
      status.textContent = `Chain broken at event ${data.first_invalid || "(missing at the end)"} (${data.reason}).`;
      status.classList.add("bad");
    }
  } catch (error) {
    status.textContent = error.message;
    status.classList.add("bad");
  }
}
