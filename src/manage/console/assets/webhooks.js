// The Webhooks panel: an owner's endpoints (register, list, rotate the signing secret, delete) and
// their deliveries. A service without the webhook routes (404) hides the panel.

import { $, ApiError, announce, clearError, close, h, open, plural, showError, showOnce, when } from "./dom.js";
import { api, canWrite, session } from "./api.js";

export const WEBHOOK_EVENTS = [
  ["key.created", "Created"],
  ["key.rotated", "Rotated"],
  ["key.updated", "Updated"],
  ["key.revoked", "Revoked"],
  ["key.deleted", "Deleted"],
  ["key.leaked", "Leaked"],
  ["key.expiring", "Expiring soon"],
  ["key.idle", "Idle"],
];

const hooks = { owner: null, available: null, list: [], pending: null };

/** Whether the service has the webhook routes (null: not asked yet). */
export const webhooksAvailable = () => hooks.available;

export function resetWebhooks() {
  hooks.owner = null;
  hooks.available = null;
  hooks.list = [];
  hooks.pending = null;
  $("webhooks-body").replaceChildren();
}

export function fillEventChoices() {
  const list = $("webhook-events-list");
  if (list.children.length > 0) return;
  list.append(...WEBHOOK_EVENTS.map(([value, text], i) => h("label", { class: "check", for: `webhook-event-${i}` },
    h("input", { type: "checkbox", id: `webhook-event-${i}`, value, checked: ["key.revoked", "key.leaked"].includes(value) }),
    h("span", { text }), h("code", { class: "muted", "aria-hidden": "true", text: value }))));
}

/** Asks for the owner's endpoints; a 404 means the service has no webhooks: the tab goes. */
export async function loadWebhooks(owner) {
  const view = session.generation;
  hooks.owner = owner;
  clearError("webhooks-error");
  try {
    const { data } = await api("GET", "api-keys/webhooks", { query: { owner } });
    if (view !== session.generation || hooks.owner !== owner) return hooks.available;
    hooks.available = true;
    hooks.list = Array.isArray(data.webhooks) ? data.webhooks : [];
    render();
  } catch (error) {
    if (view !== session.generation) return hooks.available;
    if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
      hooks.available = false;
    } else {
      hooks.available = true;
      showError("webhooks-error", error);
    }
  }
  $("webhooks-form").hidden = !canWrite();
  return hooks.available;
}

function render() {
  const rows = hooks.list.map((hook) => h("tr", { "data-webhook-id": hook.id },
    h("td", { class: "url", "data-label": "URL" }, h("code", { text: hook.url, title: hook.url })),
    h("td", { "data-label": "Events" }, h("span", { class: "chips" }, ...(hook.events || []).map((e) => h("span", { class: "chip", text: e })))),
    h("td", { class: "when", "data-label": "Created" }, when(hook.created_at)),
    h("td", { class: "row-actions", "data-label": "Actions" },
      h("button", { type: "button", class: "small", "data-hook-action": "deliveries", "data-hook": hook.id, "aria-label": `Deliveries of ${hook.url}`, text: "Deliveries" }),
      canWrite() ? h("button", { type: "button", class: "small", "data-hook-action": "rotate", "data-hook": hook.id, "aria-label": `Rotate the secret of ${hook.url}`, text: "Rotate secret" }) : null,
      canWrite() ? h("button", { type: "button", class: "small danger-outline", "data-hook-action": "delete", "data-hook": hook.id, "aria-label": `Delete ${hook.url}`, text: "Delete" }) : null)));
  $("webhooks-body").replaceChildren(...rows);
  $("webhooks-table").hidden = rows.length === 0;
  $("webhooks-empty").hidden = rows.length !== 0;
  $("webhooks-caption").textContent = `Webhook endpoints of ${hooks.owner}`;
}

export async function registerWebhook(event) {
  event.preventDefault();
  clearError("webhooks-error");
  const url = $("webhook-url").value.trim();
  const events = [...document.querySelectorAll("#webhook-events-list input:checked")].map((input) => input.value);
  if (!/^https?:\/\/./i.test(url)) {
    showError("webhooks-error", new ApiError(0, "", "Give the endpoint's URL, starting with https://."));
    $("webhook-url").focus();
    return;
  }
  if (events.length === 0) {
    showError("webhooks-error", new ApiError(0, "", "Choose at least one event to send."));
    return;
  }
  const button = $("webhook-submit");
  button.disabled = true;
  try {
    const { data } = await api("POST", "api-keys/webhooks", { body: { owner: hooks.owner, url, events } });
    $("webhook-url").value = "";
    hooks.list = hooks.list.concat([{ id: data.id, owner: data.owner, url: data.url, events: data.events, created_at: data.created_at }]);
    render();
    showOnce("Your webhook signing secret", [
      document.createTextNode("For "), h("strong", { text: data.url }),
      document.createTextNode(". Configure it where the endpoint verifies signatures."),
    ], data.secret);
  } catch (error) {
    if (session.secret !== null) showError("webhooks-error", error);
  } finally {
    button.disabled = false;
  }
}

// ---- Row actions --------------------------------------------------------------------------------

export function rowAction(event) {
  const button = event.target instanceof Element ? event.target.closest("[data-hook-action]") : null;
  if (!button) return;
  const hook = hooks.list.find((item) => item.id === button.getAttribute("data-hook"));
  if (!hook) return;
  const action = button.getAttribute("data-hook-action");
  if (action === "deliveries") openDeliveries(hook);
  else confirmAction(action, hook);
}

function confirmAction(action, hook) {
  hooks.pending = { action, hook };
  clearError("hook-confirm-error");
  const rotate = action === "rotate";
  $("hook-confirm-title").textContent = rotate ? "Rotate signing secret" : "Delete webhook endpoint";
  $("hook-confirm-text").textContent = rotate
    ? "A new signing secret replaces the current one at once; it is shown once. Deliveries signed with the old secret stop verifying."
    : "No more events are sent to this endpoint. Its delivery log goes with it.";
  $("hook-confirm-url").textContent = hook.url;
  const submit = $("hook-confirm-submit");
  submit.textContent = rotate ? "Rotate secret" : "Delete endpoint";
  submit.className = rotate ? "primary" : "danger";
  open("hook-confirm-dialog");
  submit.focus();
}

export async function confirmed(event) {
  event.preventDefault();
  const pending = hooks.pending;
  if (!pending) return;
  const { action, hook } = pending;
  const button = $("hook-confirm-submit");
  button.disabled = true;
  try {
    const path = `api-keys/webhooks/${encodeURIComponent(hook.id)}`;
    if (action === "rotate") {
      const { data } = await api("POST", `${path}/rotate`, { query: { owner: hooks.owner } });
      close("hook-confirm-dialog");
      showOnce("Your new webhook signing secret", [
        document.createTextNode("For "), h("strong", { text: hook.url }), document.createTextNode("."),
      ], data.secret);
    } else {
      await api("DELETE", path, { query: { owner: hooks.owner } });
      close("hook-confirm-dialog");
      hooks.list = hooks.list.filter((item) => item.id !== hook.id);
      render();
      announce(`Webhook endpoint ${hook.url} deleted.`);
      $("webhook-url").focus();
    }
  } catch (error) {
    if (session.secret !== null) showError("hook-confirm-error", error);
  } finally {
    button.disabled = false;
    hooks.pending = null;
  }
}

// ---- Deliveries ---------------------------------------------------------------------------------

async function openDeliveries(hook) {
  $("deliveries-url").textContent = hook.url;
  $("deliveries-body").replaceChildren();
  $("deliveries-status").textContent = "Loading…";
  clearError("deliveries-error");
  open("deliveries-dialog");
  try {
    const { data } = await api("GET", `api-keys/webhooks/${encodeURIComponent(hook.id)}/deliveries`, { query: { owner: hooks.owner } });
    const deliveries = Array.isArray(data.deliveries) ? data.deliveries : [];
    $("deliveries-body").replaceChildren(...deliveries.map((d) => h("tr", {},
      h("td", { "data-label": "Event" }, h("code", { text: d.event_type })),
      h("td", { "data-label": "Status" }, h("span", { class: `status ${d.status === "delivered" ? "active" : d.status === "failed" ? "revoked" : "expired"}`, text: d.status })),
      h("td", { class: "num", "data-label": "Attempts", text: String(d.attempts) }),
      h("td", { "data-label": "Last answer", text: d.last_error || (d.last_status ? `HTTP ${d.last_status}` : "—") }),
      h("td", { class: "when", "data-label": "Last attempt" }, when(d.last_attempt_at, { never: "Not yet", withTime: true })),
      h("td", { class: "when", "data-label": "Created" }, when(d.created_at, { withTime: true })))));
    $("deliveries-table").hidden = deliveries.length === 0;
    $("deliveries-status").textContent = deliveries.length === 0 ? "Nothing sent to this endpoint yet." : `${plural(deliveries.length, "delivery", "deliveries")}, newest first.`;
  } catch (error) {
    $("deliveries-status").textContent = "";
    if (session.secret !== null) showError("deliveries-error", error);
  }
}
