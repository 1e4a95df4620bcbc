// The key console's entry point: sign in and out, the owner (picked from a list with the master
// key), the sections of an owner (Keys, Activity, Webhooks), and the page's wiring. The modules it
// imports do the rest; none imports this one.

import { $, ApiError, clearError, clearSecret, close, copySecret, dateTimeFormat, h, plural, showError } from "./dom.js";
import { HERE, api, canRead, isMaster, session } from "./api.js";
import { findById, loadMore, reload, render, resetKeys, state } from "./keys.js";
import { syncRefill } from "./limits.js";
import {
  create, currentKey, forgetCurrent, openCreate, openDelete, openDetails, openLimits, openRevoke, openRotate,
  remove, revoke, rotate, saveLimits,
} from "./dialogs.js";
import { fillTypeFilter, loadOwnerActivity, moreKeyActivity, moreOwnerActivity, verifyChain } from "./activity.js";
import { forgetUsage, rangeChanged } from "./usage.js";
import { confirmed, fillEventChoices, loadWebhooks, registerWebhook, resetWebhooks, rowAction, webhooksAvailable } from "./webhooks.js";

const SECTIONS = ["keys", "activity", "webhooks"];

/** A loaded key's name, for the Activity page. */
const nameOf = (id) => {
  const key = state.keys.find((k) => k.api_key_id === id);
  return key ? key.name : null;
};
let section = "keys";

// ---- Sign in / out ------------------------------------------------------------------------------

function resetSession() {
  session.generation += 1;
  session.secret = null;
  session.me = null;
  resetKeys();
  resetWebhooks();
  forgetCurrent();
  forgetUsage();
  $("owner-list").replaceChildren();
  $("owner-picks").replaceChildren();
  for (const dialog of document.querySelectorAll("dialog")) {
    if (dialog.open) dialog.close();
  }
  clearSecret();
}

function signOut(reason) {
  const wasSignedIn = session.me !== null;
  resetSession();
  clearError("banner");
  $("session").hidden = true;
  $("keys-view").hidden = true;
  $("signin-view").hidden = false;
  if (reason) {
    showError("signin-reason", reason);
    if (wasSignedIn && reason.status === 401) $("signin-reason").prepend(document.createTextNode("Signed out: "));
  } else {
    clearError("signin-reason");
  }
  $("signin-key").value = "";
  $("signin-key").focus();
}
session.onUnauthorized = signOut;

async function signIn(event) {
  event.preventDefault();
  const input = $("signin-key");
  const value = input.value.trim();
  if (!value) {
    showError("signin-reason", new ApiError(0, "", "Paste a key to sign in."));
    input.focus();
    return;
  }
  resetSession();
  session.secret = value;
  input.value = "";
  const button = $("signin-submit");
  button.disabled = true;
  clearError("signin-reason");
  try {
    const { data } = await api("GET", "api-keys/self");
    session.me = data;
    if (!canRead()) {
      signOut(new ApiError(403, "AUTH_INSUFFICIENT_PERMISSIONS",
        `This key (${data.scopes.join(", ")}) cannot manage keys: it needs api-keys:read or api-keys:write.`));
      return;
    }
    enterConsole();
  } catch (error) {
    if (session.secret !== null) {
      resetSession();
      showError("signin-reason", error);
    }
    input.focus();
  } finally {
    button.disabled = false;
  }
}

function enterConsole() {
  const { me } = session;
  $("signin-view").hidden = true;
  $("keys-view").hidden = false;
  $("session").hidden = false;
  const label = $("session-label");
  if (isMaster()) {
    label.replaceChildren(h("span", { class: "status active", text: "Master key" }));
  } else {
    label.replaceChildren(
      h("span", { class: "kind", text: "Scoped key" }),
      h("span", { class: "who", title: `${me.name} (owner ${me.owner_id})`, text: me.name }),
    );
  }
  const ownerInput = $("owner");
  $("sections").hidden = true;
  for (const name of SECTIONS) $(`${name}-panel`).hidden = true;
  if (isMaster()) {
    ownerInput.readOnly = false;
    ownerInput.value = "";
    $("owner-open").hidden = false;
    $("delegation").hidden = true;
    $("choose-owner").hidden = false;
    $("keys-subtitle").textContent = "Signed in with the master key: choose whose keys to manage.";
    loadOwners();
    ownerInput.focus();
  } else {
    ownerInput.readOnly = true;
    ownerInput.value = me.owner_id;
    $("owner-open").hidden = true;
    $("choose-owner").hidden = true;
    const delegation = $("delegation");
    const limit = me.expires_at ? ` New keys expire no later than this key, ${dateTimeFormat.format(new Date(me.expires_at))}.` : "";
    delegation.replaceChildren(
      document.createTextNode(`Signed in with the scoped key "${me.name}": you manage the keys of this owner only, and can grant only the scopes it holds (`),
      ...me.scopes.flatMap((scope, i) => [i ? document.createTextNode(", ") : null, h("code", { text: scope })].filter(Boolean)),
      document.createTextNode(`).${limit}`),
    );
    delegation.hidden = false;
    openOwner(me.owner_id);
  }
}

// ---- Owners (the master key picks one) ----------------------------------------------------------

async function loadOwners() {
  const view = session.generation;
  const picks = $("owner-picks");
  const status = $("owner-picks-status");
  status.textContent = "Loading owners…";
  try {
    const { data } = await api("GET", "api-keys/owners");
    if (view !== session.generation) return;
    const owners = data.owners || [];
    picks.replaceChildren(...owners.map((o) => h("li", {},
      h("button", { type: "button", class: "owner-pick", "data-owner": o.owner, "aria-label": `${o.owner}, ${plural(o.active_keys, "active key", "active keys")}` },
        h("span", { class: "owner-name", text: o.owner }),
        h("span", { class: "owner-count", text: `${plural(o.active_keys, "active key", "active keys")}` })))));
    $("owner-list").replaceChildren(...owners.map((o) => h("option", { value: o.owner, label: plural(o.active_keys, "active key", "active keys") })));
    status.textContent = owners.length === 0
      ? "No owner has keys yet. Type a new owner's name above to create its first key."
      : `${plural(owners.length, "owner", "owners")}. Choose one, or type a new owner's name above.`;
  } catch (error) {
    if (view !== session.generation) return;
    // A service without the list: typing the owner still works.
    status.textContent = error instanceof ApiError && error.status === 404
      ? "Type the owner (the team, service or tenant whose keys you manage) and choose Show keys."
      : `The owners could not be listed (${error.message}). Type one above.`;
  }
}

async function openOwner(name) {
  session.generation += 1;
  resetKeys();
  resetWebhooks();
  state.owner = name;
  state.loadFailed = false;
  clearError("banner");
  $("owner").value = name;
  $("choose-owner").hidden = true;
  $("sections").hidden = false;
  $("keys-subtitle").replaceChildren(document.createTextNode("Keys of "), h("strong", { text: name }));
  $("keys-caption").textContent = `API keys of ${name}`;
  $("activity-caption").textContent = `Activity of ${name}, newest first`;
  $("activity-verify").hidden = !isMaster();
  $("activity-verify-status").textContent = "";
  if (isMaster() && ![...$("owner-list").options].some((o) => o.value === name)) {
    $("owner-list").append(h("option", { value: name }));
  }
  $("webhooks-tab").hidden = true;
  showSection("keys");
  render();
  const view = session.generation;
  loadWebhooks(name).then((available) => {
    if (view !== session.generation) return;
    $("webhooks-tab").hidden = !available;
    if (!available && section === "webhooks") showSection("keys");
  });
  await reload();
}

function showSection(name, { focus = false } = {}) {
  section = name;
  for (const other of SECTIONS) {
    $(`${other}-panel`).hidden = other !== name;
    const tab = $(`${other}-tab`);
    if (other === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  if (name === "activity") {
    fillTypeFilter();
    loadOwnerActivity(state.owner, nameOf);
  }
  if (name === "webhooks") {
    fillEventChoices();
    if (webhooksAvailable() !== false) loadWebhooks(state.owner);
  }
  if (focus) $(`${name}-heading`).focus();
}

// ---- Wiring -------------------------------------------------------------------------------------

async function loadConfig() {
  try {
    const response = await fetch(new URL("config.json", HERE), { credentials: "omit", cache: "no-store" });
    if (response.ok) session.config = Object.assign(session.config, await response.json());
  } catch {
    // The defaults stand: the API merged at the service root, the key in X-Api-Key.
  }
  document.title = session.config.title;
  $("brand-title").textContent = session.config.title;
}

let searchTimer = null;

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(null));
  $("owner-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!isMaster()) return;
    const name = $("owner").value.trim();
    if (!name) {
      showError("banner", new ApiError(0, "", "Type the owner whose keys you want to manage."));
      $("owner").focus();
      return;
    }
    openOwner(name);
  });
  $("owner-picks").addEventListener("click", (event) => {
    const pick = event.target instanceof Element ? event.target.closest("[data-owner]") : null;
    if (pick) openOwner(pick.getAttribute("data-owner")).then(() => $("keys-heading").focus());
  });
  for (const name of SECTIONS) {
    $(`${name}-tab`).addEventListener("click", () => showSection(name, { focus: true }));
  }
  $("hide-revoked").addEventListener("change", render);
  $("key-sort").addEventListener("change", render);
  $("key-search").addEventListener("input", () => {
    render();
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => findById($("key-search").value.trim()), 300);
  });
  $("refresh").addEventListener("click", reload);
  $("load-more").addEventListener("click", loadMore);
  $("create-open").addEventListener("click", openCreate);
  $("create-form").addEventListener("submit", create);
  $("create-never").addEventListener("change", () => {
    $("create-expires").disabled = $("create-never").checked;
  });
  $("keys-body").addEventListener("click", (event) => {
    const target = event.target instanceof Element ? event.target.closest("[data-open]") : null;
    if (target) openDetails(target.getAttribute("data-open"));
  });
  $("secret-copy").addEventListener("click", copySecret);
  // Close drops the plaintext before the dialog closes (the `close` event fires a task later).
  $("secret-close").addEventListener("click", () => {
    clearSecret();
    close("secret-dialog");
  });
  // However else the dialog closes (Escape), the plaintext leaves the page too.
  $("secret-dialog").addEventListener("close", clearSecret);
  $("details-limits").addEventListener("click", openLimits);
  $("limits-form").addEventListener("submit", saveLimits);
  // A fixed value clears the complaint about it.
  $("limits-form").addEventListener("input", () => clearError("limits-error"));
  for (const prefix of ["create", "limits"]) {
    $(`${prefix}-refill`).addEventListener("change", () => syncRefill(prefix));
  }
  $("details-rotate").addEventListener("click", openRotate);
  $("details-revoke").addEventListener("click", openRevoke);
  $("details-delete").addEventListener("click", openDelete);
  $("details-dialog").addEventListener("close", () => {
    forgetCurrent();
    forgetUsage();
  });
  $("usage-range").addEventListener("change", rangeChanged);
  $("key-activity-more").addEventListener("click", moreKeyActivity);
  $("rotate-form").addEventListener("submit", rotate);
  $("revoke-form").addEventListener("submit", revoke);
  $("delete-form").addEventListener("submit", remove);
  $("delete-confirm").addEventListener("input", () => {
    const current = currentKey();
    $("delete-submit").disabled = !current || $("delete-confirm").value !== current.name;
  });
  $("activity-type").addEventListener("change", () => loadOwnerActivity(state.owner, nameOf));
  $("activity-more").addEventListener("click", () => moreOwnerActivity(state.owner, nameOf));
  $("activity-verify").addEventListener("click", () => verifyChain(state.owner));
  $("webhooks-form").addEventListener("submit", registerWebhook);
  $("webhooks-body").addEventListener("click", rowAction);
  $("hook-confirm-form").addEventListener("submit", confirmed);
  for (const button of document.querySelectorAll("[data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
  // Leaving the page forgets the key too (and keeps it out of the back/forward cache).
  window.addEventListener("pagehide", () => signOut(null));
}

wire();
loadConfig();
$("signin-key").focus();
