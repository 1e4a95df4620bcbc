// The key console. Plain JavaScript and DOM APIs: every string from the API is rendered with
// textContent, never parsed as HTML. The signed-in key lives in this closure only (no cookie, no
// storage, never in a URL) and is forgotten on Sign out, on a 401, and when the page goes away.
"use strict";

(() => {
  const PAGE_SIZE = 25;
  const NEVER_USED = "0001-01-01T00:00:00Z";
  const SCOPE_RE = /^(\*|(\*|[a-z0-9_-]+):(\*|[a-z0-9_-]+))$/;
  const DAY_MS = 86400000;

  const $ = (id) => document.getElementById(id);
  // The console's own files live beside this script (`/console/console.js`); the API's address in
  // config.json is relative to them.
  const HERE = new URL(".", document.currentScript ? document.currentScript.src : document.baseURI);

  /** An element with a class, attributes and children (strings become text nodes). */
  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (value === true) node.setAttribute(name, "");
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  // ---- State ----------------------------------------------------------------------------------

  let config = { title: "API keys", api_base: "../", key_header: "x-api-key", scopes: [] };
  let secret = null; // the signed-in key: memory only
  let me = null; // GET /api-keys/self
  let policy = null; // GET /api-keys/policy
  let owner = null; // whose keys are shown
  let keys = []; // loaded pages, newest first
  let cursor = null; // x-next-cursor of the last page
  let loadFailed = false; // the last reload failed (the banner says why)
  let current = null; // the key in the details dialog
  let generation = 0; // bumped on sign-in/out and owner change: late answers are dropped
  const owners = new Set();

  // ---- API ------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

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

  async function api(method, path, { query, body } = {}) {
    if (secret === null) throw new ApiError(401, "SIGNED_OUT", "You are signed out.");
    const started = generation;
    const url = new URL(path, new URL(config.api_base, HERE));
    for (const [name, value] of Object.entries(query || {})) {
      if (value !== null && value !== undefined) url.searchParams.set(name, value);
    }
    const headers = { Accept: "application/json" };
    headers[config.key_header] = config.key_header === "authorization" ? `Bearer ${secret}` : secret;
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
      if (response.status === 401 && started === generation) signOut(error);
      throw error;
    }
    if (started !== generation) throw new ApiError(0, "STALE", "superseded");
    return { data, headers: response.headers };
  }

  // ---- Formatting -----------------------------------------------------------------------------

  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });
  const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

  function parseTime(value) {
    if (!value || value === NEVER_USED) return null;
    const time = new Date(value);
    return Number.isNaN(time.getTime()) ? null : time;
  }

  function ago(time) {
    const seconds = Math.round((time.getTime() - Date.now()) / 1000);
    const steps = [["year", 31536000], ["month", 2592000], ["week", 604800], ["day", 86400], ["hour", 3600], ["minute", 60]];
    for (const [unit, size] of steps) {
      if (Math.abs(seconds) >= size) return relative.format(Math.trunc(seconds / size), unit);
    }
    return Math.abs(seconds) < 45 ? "just now" : relative.format(seconds, "second");
  }

  function when(value, { never = "Never", relativeTime = false, withTime = false } = {}) {
    const time = parseTime(value);
    if (time === null) return h("span", { text: never });
    const text = relativeTime ? ago(time) : (withTime ? dateTimeFormat : dateFormat).format(time);
    return h("time", { datetime: time.toISOString(), title: dateTimeFormat.format(time), text });
  }

  function statusOf(key) {
    if (key.is_revoked) return "Revoked";
    const expires = parseTime(key.expires_at);
    if (expires !== null && expires.getTime() <= Date.now()) return "Expired";
    return "Active";
  }

  function statusBadge(key) {
    const status = statusOf(key);
    return h("span", { class: `status ${status.toLowerCase()}`, text: status });
  }

  function chips(scopes) {
    return h("span", { class: "chips" }, ...scopes.map((scope) => h("span", { class: "chip", text: scope })));
  }

  /** "API key 2026-12-01 14:05:09 UTC": the name the API gives a key created without one. */
  function defaultName(now) {
    const pad = (n) => String(n).padStart(2, "0");
    return `API key ${now.getUTCFullYear()}-${pad(now.getUTCMonth() + 1)}-${pad(now.getUTCDate())} ` +
      `${pad(now.getUTCHours())}:${pad(now.getUTCMinutes())}:${pad(now.getUTCSeconds())} UTC`;
  }

  function localDate(time) {
    const pad = (n) => String(n).padStart(2, "0");
    return `${time.getFullYear()}-${pad(time.getMonth() + 1)}-${pad(time.getDate())}`;
  }

  // ---- Usage limits (rate limit and credits) --------------------------------------------------

  const count = new Intl.NumberFormat(undefined);
  const RATE_MAX = 1000000000;
  const PERIOD_MAX = 31622400;
  const CREDITS_MAX = 1000000000000000;

  /** "60 s", "1 h", "1 d": a period, compact. */
  function shortPeriod(seconds) {
    if (seconds % 86400 === 0) return `${seconds / 86400} d`;
    if (seconds % 3600 === 0) return `${seconds / 3600} h`;
    return `${seconds} s`;
  }

  function plural(n, one, many) {
    return `${count.format(n)} ${n === 1 ? one : many}`;
  }

  /** The table's compact form: "100 / 60 s", "870 credits", both, or a dash. */
  function limitsCell(key) {
    const parts = [];
    if (key.rate_limit) parts.push(h("span", { class: "limit", text: `${count.format(key.rate_limit.limit)} / ${shortPeriod(key.rate_limit.period_seconds)}` }));
    if (key.credits) parts.push(h("span", { class: "limit", text: plural(key.credits.remaining, "credit", "credits") }));
    if (parts.length === 0) return h("span", { class: "muted", title: "No limits", text: "—" });
    // One limit a line; the comma is for screen readers and copied text.
    return h("span", { class: "limits" }, ...parts.flatMap((part, i) => (i ? [h("span", { class: "visually-hidden", text: ", " }), part] : [part])));
  }

  function describeRate(rate) {
    if (!rate) return "None";
    return `${plural(rate.limit, "request", "requests")} per ${plural(rate.period_seconds, "second", "seconds")}`;
  }

  function describeRefill(refill) {
    return refill.interval === "daily"
      ? `set to ${count.format(refill.amount)} daily at 00:00 UTC`
      : `set to ${count.format(refill.amount)} on the 1st of each month (00:00 UTC)`;
  }

  function describeCredits(credits) {
    if (!credits) return "Unlimited";
    const left = `${count.format(credits.remaining)} remaining`;
    return credits.refill ? `${left}; ${describeRefill(credits.refill)}` : `${left}; no refill`;
  }

  /** The API's shape, so a form's values and a key's compare as JSON. */
  function normalLimits(key) {
    const rate = key.rate_limit ? { limit: key.rate_limit.limit, period_seconds: key.rate_limit.period_seconds } : null;
    const credits = key.credits ? {
      remaining: key.credits.remaining,
      refill: key.credits.refill ? { interval: key.credits.refill.interval, amount: key.credits.refill.amount } : null,
    } : null;
    return { rate_limit: rate, credits };
  }

  class FieldError extends Error {
    constructor(field, message) {
      super(message);
      this.field = field;
    }
  }

  function whole(id, label, min, max) {
    const raw = $(id).value.trim();
    if (raw === "") return null;
    if (!/^\d+$/.test(raw)) throw new FieldError(id, `${label} must be a whole number.`);
    const n = Number(raw);
    if (n < min || n > max) throw new FieldError(id, `${label} must be from ${count.format(min)} to ${count.format(max)}.`);
    return n;
  }

  /** The rate limit and credits a form holds (null: none), or a FieldError saying what is wrong. */
  function readLimits(prefix) {
    const limit = whole(`${prefix}-rate`, "Rate limit", 1, RATE_MAX);
    let rate = null;
    if (limit !== null) {
      const period = whole(`${prefix}-period`, "Period (seconds)", 1, PERIOD_MAX);
      if (period === null) throw new FieldError(`${prefix}-period`, "Give the period of the rate limit, in seconds.");
      rate = { limit, period_seconds: period };
    }
    const remaining = whole(`${prefix}-credits`, "Credits", 0, CREDITS_MAX);
    const interval = $(`${prefix}-refill`).value;
    let credits = null;
    if (remaining !== null) {
      let refill = null;
      if (interval) {
        const amount = whole(`${prefix}-refill-amount`, "Refill amount", 0, CREDITS_MAX);
        if (amount === null) throw new FieldError(`${prefix}-refill-amount`, "Give the refill amount: the credits set at each refill.");
        refill = { interval, amount };
      }
      credits = { remaining, refill };
    } else if (interval) {
      throw new FieldError(`${prefix}-credits`, "A refill needs credits: give the credits to start with.");
    }
    // Whether a scoped key may grant these is the API's rule (403 AUTH_SCOPE_ESCALATION, shown as
    // it says); fillLimits only offers the bounds.
    return { rate_limit: rate, credits };
  }

  /** Fills a form's limit fields, and offers a scoped key only what it may grant. */
  function fillLimits(prefix, limits) {
    const rate = limits.rate_limit;
    const credits = limits.credits;
    $(`${prefix}-rate`).value = rate ? String(rate.limit) : "";
    $(`${prefix}-period`).value = String(rate ? rate.period_seconds : 60);
    $(`${prefix}-credits`).value = credits ? String(credits.remaining) : "";
    $(`${prefix}-refill`).value = credits && credits.refill ? credits.refill.interval : "";
    $(`${prefix}-refill-amount`).value = credits && credits.refill ? String(credits.refill.amount) : "";
    const scoped = me.kind !== "master";
    const ownRate = scoped ? me.rate_limit : null;
    const ownCredits = scoped ? me.credits : null;
    $(`${prefix}-rate`).max = String(ownRate ? Math.min(ownRate.limit, RATE_MAX) : RATE_MAX);
    $(`${prefix}-rate`).placeholder = ownRate ? `At most ${count.format(ownRate.limit)}` : "No limit";
    $(`${prefix}-credits`).max = String(ownCredits ? ownCredits.remaining : CREDITS_MAX);
    $(`${prefix}-credits`).placeholder = ownCredits ? `At most ${count.format(ownCredits.remaining)}` : "Unlimited";
    const ownRefill = ownCredits ? ownCredits.refill : null;
    for (const option of $(`${prefix}-refill`).options) {
      // A key with credits may not grant a refill it lacks, nor a more frequent one.
      option.disabled = ownCredits !== null && option.value !== "" &&
        (ownRefill === null || (ownRefill.interval === "monthly" && option.value === "daily"));
    }
    $(`${prefix}-refill-amount`).max = String(ownRefill ? ownRefill.amount : CREDITS_MAX);
    syncRefill(prefix);
    const own = $(`${prefix}-own`);
    if (ownRate || ownCredits) {
      const bounds = [];
      if (ownRate) bounds.push(`a rate limit no looser than ${describeRate(ownRate)}`);
      if (ownCredits) bounds.push(`no more than ${plural(ownCredits.remaining, "credit", "credits")}${ownRefill ? `, refilled no more often or more than yours (${describeRefill(ownRefill)})` : " and no refill"}`);
      own.textContent = `Your key can grant ${bounds.join(", and ")}.`;
      own.hidden = false;
    } else {
      own.hidden = true;
      own.textContent = "";
    }
  }

  function syncRefill(prefix) {
    const none = $(`${prefix}-refill`).value === "";
    const amount = $(`${prefix}-refill-amount`);
    amount.disabled = none;
    if (!none && amount.value === "") amount.value = $(`${prefix}-credits`).value;
  }

  function limitsError(target, error) {
    if (error instanceof FieldError) {
      showError(target, new ApiError(0, "", error.message));
      $(error.field).focus();
      return true;
    }
    return false;
  }

  // ---- Scopes (the grammar and delegation, as the API applies them) --------------------------

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

  const covered = (scope) => me !== null && me.scopes.some((held) => grants(held, scope));
  const canWrite = () => me !== null && (me.kind === "master" || covered("api-keys:write"));
  const canRead = () => canWrite() || covered("api-keys:read");

  // ---- Messages -------------------------------------------------------------------------------

  function showError(target, error) {
    if (error instanceof ApiError && error.code === "STALE") return;
    const node = $(target);
    const message = error instanceof ApiError ? error.message : "Something went wrong in the page. Reload it and retry.";
    node.replaceChildren(document.createTextNode(message));
    if (error instanceof ApiError && error.code && error.status !== 0) {
      node.append(h("span", { class: "code", text: error.code }));
    }
    node.hidden = false;
  }

  function clearError(target) {
    const node = $(target);
    node.hidden = true;
    node.replaceChildren();
  }

  // ---- Sign in / out --------------------------------------------------------------------------

  function resetSession() {
    generation += 1;
    secret = null;
    me = null;
    policy = null;
    owner = null;
    keys = [];
    cursor = null;
    current = null;
    owners.clear();
    $("owner-list").replaceChildren();
    $("keys-body").replaceChildren();
    for (const dialog of document.querySelectorAll("dialog")) {
      if (dialog.open) dialog.close();
    }
    clearSecret();
  }

  function signOut(reason) {
    const wasSignedIn = me !== null;
    resetSession();
    clearError("banner");
    $("session").hidden = true;
    $("keys-view").hidden = true;
    $("signin-view").hidden = false;
    const reasonNode = $("signin-reason");
    if (reason) {
      showError("signin-reason", reason);
      if (wasSignedIn && reason.status === 401) reasonNode.prepend(document.createTextNode("Signed out: "));
    } else {
      clearError("signin-reason");
    }
    $("signin-key").value = "";
    $("signin-key").focus();
  }

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
    secret = value;
    input.value = "";
    const button = $("signin-submit");
    button.disabled = true;
    clearError("signin-reason");
    try {
      const { data } = await api("GET", "api-keys/self");
      me = data;
      if (!canRead()) {
        const scopes = me.scopes.join(", ");
        signOut(new ApiError(403, "AUTH_INSUFFICIENT_PERMISSIONS",
          `This key (${scopes}) cannot manage keys: it needs api-keys:read or api-keys:write.`));
        return;
      }
      enterConsole();
    } catch (error) {
      if (secret !== null) {
        resetSession();
        showError("signin-reason", error);
      }
      input.focus();
    } finally {
      button.disabled = false;
    }
  }

  function enterConsole() {
    $("signin-view").hidden = true;
    $("keys-view").hidden = false;
    $("session").hidden = false;
    const label = $("session-label");
    if (me.kind === "master") {
      label.replaceChildren(h("span", { class: "status active", text: "Master key" }));
    } else {
      label.replaceChildren(
        h("span", { class: "kind", text: "Scoped key" }),
        h("span", { class: "who", title: `${me.name} (owner ${me.owner_id})`, text: me.name }),
      );
    }
    const ownerInput = $("owner");
    const openButton = $("owner-open");
    if (me.kind === "master") {
      ownerInput.readOnly = false;
      ownerInput.value = "";
      openButton.hidden = false;
      $("delegation").hidden = true;
      $("keys-panel").hidden = true;
      $("choose-owner").hidden = false;
      $("keys-subtitle").textContent = "Signed in with the master key: choose whose keys to manage.";
      ownerInput.focus();
    } else {
      ownerInput.readOnly = true;
      ownerInput.value = me.owner_id;
      openButton.hidden = true;
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

  // ---- Owner and keys -------------------------------------------------------------------------

  async function openOwner(name) {
    generation += 1;
    owner = name;
    keys = [];
    cursor = null;
    policy = null;
    loadFailed = false;
    clearError("banner");
    $("choose-owner").hidden = true;
    $("keys-panel").hidden = false;
    $("keys-subtitle").replaceChildren(document.createTextNode("Keys of "), h("strong", { text: name }));
    $("keys-caption").textContent = `API keys of ${name}`;
    if (me.kind === "master" && !owners.has(name)) {
      owners.add(name);
      $("owner-list").append(h("option", { value: name }));
    }
    render();
    await reload();
  }

  async function reload() {
    const view = generation;
    $("refresh").disabled = true;
    try {
      const [policyAnswer, page] = await Promise.all([
        api("GET", "api-keys/policy", { query: { owner } }),
        api("GET", "api-keys", { query: { owner, limit: PAGE_SIZE } }),
      ]);
      if (view !== generation) return;
      policy = policyAnswer.data;
      keys = page.data;
      cursor = page.headers.get("x-next-cursor");
      loadFailed = false;
      clearError("banner");
    } catch (error) {
      if (view === generation && secret !== null) {
        loadFailed = true;
        showError("banner", error);
      }
    } finally {
      $("refresh").disabled = false;
    }
    if (view === generation) render();
  }

  async function loadMore() {
    const view = generation;
    const button = $("load-more");
    button.disabled = true;
    try {
      const page = await api("GET", "api-keys", { query: { owner, limit: PAGE_SIZE, before: cursor } });
      if (view !== generation) return;
      const seen = new Set(keys.map((key) => key.api_key_id));
      keys = keys.concat(page.data.filter((key) => !seen.has(key.api_key_id)));
      cursor = page.headers.get("x-next-cursor");
      render();
    } catch (error) {
      if (view === generation && secret !== null) showError("banner", error);
    } finally {
      button.disabled = false;
    }
  }

  function atLimit() {
    return policy !== null && policy.max_active_per_owner !== null && policy.active_keys >= policy.max_active_per_owner;
  }

  /** The shared pools every key of the owner (or of the caller's account) counts against. */
  function renderPools() {
    const text = $("pool-text");
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
    if (policy === null) {
      text.textContent = loadFailed ? "Keys could not be loaded" : "Loading…";
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

  function render() {
    renderUsage();
    const hideRevoked = $("hide-revoked").checked;
    const shown = keys.filter((key) => !(hideRevoked && key.is_revoked));
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
        h("td", { class: "limits-cell", "data-label": "Limits" }, limitsCell(key)),
        h("td", { class: "status-cell", "data-label": "Status" }, statusBadge(key)),
      );
    });
    $("keys-body").replaceChildren(...rows);
    const empty = $("keys-empty");
    if (policy !== null && shown.length === 0) {
      empty.textContent = keys.length === 0
        ? `${owner} has no keys yet. Create one to get started.`
        : "Every loaded key is revoked. Clear Hide revoked to see them.";
      empty.hidden = false;
    } else {
      empty.hidden = true;
    }
    $("keys-table").hidden = shown.length === 0;
    $("load-more").hidden = cursor === null;
    const revoked = keys.filter((key) => key.is_revoked).length;
    $("keys-count").textContent = keys.length === 0 ? "" :
      `Showing ${shown.length} of ${keys.length} loaded${cursor === null ? "" : " (more to load)"}` +
      (revoked ? `, ${revoked} revoked` : "");
  }

  // ---- Dialogs --------------------------------------------------------------------------------

  function open(id) {
    const dialog = $(id);
    if (!dialog.open) dialog.showModal();
    return dialog;
  }

  function close(id) {
    const dialog = $(id);
    if (dialog.open) dialog.close();
  }

  // Create

  function openCreate() {
    if (!canWrite() || atLimit() || policy === null) return;
    const form = $("create-form");
    form.reset();
    clearError("create-error");
    $("create-owner").replaceChildren(document.createTextNode("For owner "), h("strong", { text: owner }));
    $("create-name").placeholder = defaultName(new Date());

    const declared = (config.scopes || []).filter((d) => covered(d.scope));
    const choice = $("create-scopes-choice");
    const text = $("create-scopes-text");
    if ((config.scopes || []).length > 0) {
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
    const latest = parseTime(policy.latest_expires_at);
    expires.max = latest ? localDate(latest) : "";
    const preset = parseTime(policy.default_expires_at);
    neverLabel.hidden = !policy.never_expires_allowed;
    never.checked = policy.never_expires_allowed && preset === null;
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
    if (policy.never_expires_allowed) parts.push("Choose a date, or Never.");
    else parts.push("Choose a date: keys must expire.");
    if (policy.max_lifetime_seconds) parts.push(`At most ${Math.floor(policy.max_lifetime_seconds / 86400)} days from today.`);
    if (me.kind !== "master" && me.expires_at) parts.push(`No later than your own key (${dateFormat.format(new Date(me.expires_at))}).`);
    parts.push("The key stops working at the end of that day.");
    hint.textContent = parts.join(" ");
  }

  function chosenScopes() {
    if (!$("create-scopes-choice").hidden) {
      return [...document.querySelectorAll("#create-scope-list input:checked")].map((input) => input.value);
    }
    return $("create-scopes").value.split(/[\s,]+/).filter(Boolean);
  }

  async function create(event) {
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
    if (me.kind === "master") body.owner = owner;
    if (!$("create-never").checked || !policy.never_expires_allowed) {
      const value = $("create-expires").value;
      if (!value) {
        showError("create-error", new ApiError(0, "", "Choose an expiry date."));
        $("create-expires").focus();
        return;
      }
      const [y, m, d] = value.split("-").map(Number);
      let at = new Date(y, m - 1, d, 23, 59, 59);
      const latest = parseTime(policy.latest_expires_at);
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
      if (secret !== null) showError("create-error", error);
    } finally {
      button.disabled = false;
    }
  }

  // Shown once

  function showSecret(title, created) {
    $("secret-title").textContent = title;
    $("secret-for").replaceChildren(
      document.createTextNode("For "), h("strong", { text: created.name }),
      document.createTextNode(` (${created.masked_key}), owner ${created.owner_id}.`));
    $("secret-value").textContent = created.key;
    $("secret-status").textContent = "";
    open("secret-dialog");
    $("secret-copy").focus();
  }

  function clearSecret() {
    $("secret-value").textContent = "";
    $("secret-for").replaceChildren();
    $("secret-status").textContent = "";
    const selection = window.getSelection();
    if (selection) selection.removeAllRanges();
  }

  async function copySecret() {
    const value = $("secret-value").textContent;
    const status = $("secret-status");
    try {
      await navigator.clipboard.writeText(value);
      status.textContent = "Copied to the clipboard.";
    } catch {
      const range = document.createRange();
      range.selectNodeContents($("secret-value"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      status.textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
    }
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

  function lastUsed(key) {
    const time = parseTime(key.last_used_at);
    if (time === null) return h("span", { text: "Never used" });
    return h("span", {}, when(key.last_used_at, { relativeTime: true }), ` (${dateTimeFormat.format(time)})`);
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
    $("details-delete").hidden = me.kind !== "master";
  }

  async function openDetails(id) {
    const known = keys.find((key) => key.api_key_id === id);
    if (!known) return;
    clearError("details-error");
    fillDetails(known);
    open("details-dialog");
    try {
      const { data } = await api("GET", `api-keys/${encodeURIComponent(id)}`);
      if (current && current.api_key_id === id) fillDetails(data);
      keys = keys.map((key) => (key.api_key_id === id ? data : key));
      render();
    } catch (error) {
      if (secret !== null) showError("details-error", error);
    }
  }

  function summary(target, key) {
    $(target).replaceChildren(
      h("dt", { text: "Name" }), h("dd", { text: key.name }),
      h("dt", { text: "Key" }), h("dd", {}, h("code", { text: key.masked_key })),
      h("dt", { text: "Last used" }), h("dd", {}, lastUsed(key)),
    );
  }

  // Edit limits

  function openLimits() {
    if (!current || !canWrite()) return;
    clearError("limits-error");
    $("limits-name").textContent = current.name;
    fillLimits("limits", normalLimits(current));
    open("limits-dialog");
    $("limits-rate").focus();
  }

  async function saveLimits(event) {
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
      keys = keys.map((key) => (key.api_key_id === id ? data : key));
      render();
    } catch (error) {
      if (secret !== null) showError("limits-error", error);
    } finally {
      button.disabled = false;
    }
  }

  // Rotate

  function openRotate() {
    if (!current) return;
    $("rotate-form").reset();
    clearError("rotate-error");
    $("rotate-name").textContent = current.name;
    open("rotate-dialog");
    $("rotate-grace").focus();
  }

  async function rotate(event) {
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
      if (secret !== null) showError("rotate-error", error);
    } finally {
      button.disabled = false;
    }
  }

  // Revoke

  function openRevoke() {
    if (!current) return;
    clearError("revoke-error");
    summary("revoke-summary", current);
    open("revoke-dialog");
    $("revoke-submit").focus();
  }

  async function revoke(event) {
    event.preventDefault();
    if (!current) return;
    clearError("revoke-error");
    const button = $("revoke-submit");
    button.disabled = true;
    try {
      await api("DELETE", `api-keys/${encodeURIComponent(current.api_key_id)}`);
      close("revoke-dialog");
      close("details-dialog");
      await reload();
    } catch (error) {
      if (secret !== null) showError("revoke-error", error);
    } finally {
      button.disabled = false;
    }
  }

  // Delete (master key only)

  function openDelete() {
    if (!current || me.kind !== "master") return;
    clearError("delete-error");
    summary("delete-summary", current);
    $("delete-confirm").value = "";
    $("delete-submit").disabled = true;
    open("delete-dialog");
    $("delete-confirm").focus();
  }

  async function remove(event) {
    event.preventDefault();
    if (!current || $("delete-confirm").value !== current.name) return;
    clearError("delete-error");
    const button = $("delete-submit");
    button.disabled = true;
    try {
      await api("DELETE", `api-keys/${encodeURIComponent(current.api_key_id)}`, { query: { permanent: "true" } });
      close("delete-dialog");
      close("details-dialog");
      await reload();
    } catch (error) {
      if (secret !== null) showError("delete-error", error);
      button.disabled = false;
    }
  }

  // ---- Wiring ---------------------------------------------------------------------------------

  async function loadConfig() {
    try {
      const response = await fetch(new URL("config.json", HERE), { credentials: "omit", cache: "no-store" });
      if (response.ok) config = Object.assign(config, await response.json());
    } catch {
      // The defaults stand: the API merged at the service root, the key in X-Api-Key.
    }
    document.title = config.title;
    $("brand-title").textContent = config.title;
  }

  function wire() {
    $("signin-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut(null));
    $("owner-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (me === null || me.kind !== "master") return;
      const name = $("owner").value.trim();
      if (!name) {
        showError("banner", new ApiError(0, "", "Type the owner whose keys you want to manage."));
        $("owner").focus();
        return;
      }
      openOwner(name);
    });
    $("hide-revoked").addEventListener("change", render);
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
    $("details-dialog").addEventListener("close", () => { current = null; });
    $("rotate-form").addEventListener("submit", rotate);
    $("revoke-form").addEventListener("submit", revoke);
    $("delete-form").addEventListener("submit", remove);
    $("delete-confirm").addEventListener("input", () => {
      $("delete-submit").disabled = !current || $("delete-confirm").value !== current.name;
    });
    for (const button of document.querySelectorAll("[data-close]")) {
      button.addEventListener("click", () => button.closest("dialog").close());
    }
    // Leaving the page forgets the key too (and keeps it out of the back/forward cache).
    window.addEventListener("pagehide", () => signOut(null));
  }

  wire();
  loadConfig();
  $("signin-key").focus();
})();
