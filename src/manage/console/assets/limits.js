// Usage limits (rate limit and credits): how keys show them, and the create and edit forms'
// fields.

import { $, ApiError, count, h, plural, showError } from "./dom.js";
import { isMaster, session } from "./api.js";

const RATE_MAX = 1000000000;
const PERIOD_MAX = 31622400;
const CREDITS_MAX = 1000000000000000;

/** "60 s", "1 h", "1 d": a period, compact. */
export function shortPeriod(seconds) {
  if (seconds % 86400 === 0) return `${seconds / 86400} d`;
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  return `${seconds} s`;
}

/** The table's compact form: "100 / 60 s", "870 credits", both, or a dash. */
export function limitsCell(key) {
  const parts = [];
  if (key.rate_limit) parts.push(h("span", { class: "limit", text: `${count.format(key.rate_limit.limit)} / ${shortPeriod(key.rate_limit.period_seconds)}` }));
  if (key.credits) parts.push(h("span", { class: "limit", text: plural(key.credits.remaining, "credit", "credits") }));
  if (parts.length === 0) return h("span", { class: "muted", title: "No limits", text: "—" });
  // One limit a line; the comma is for screen readers and copied text.
  return h("span", { class: "limits" }, ...parts.flatMap((part, i) => (i ? [h("span", { class: "visually-hidden", text: ", " }), part] : [part])));
}

export function describeRate(rate) {
  if (!rate) return "None";
  return `${plural(rate.limit, "request", "requests")} per ${plural(rate.period_seconds, "second", "seconds")}`;
}

export function describeRefill(refill) {
  return refill.interval === "daily"
    ? `set to ${count.format(refill.amount)} daily at 00:00 UTC`
    : `set to ${count.format(refill.amount)} on the 1st of each month (00:00 UTC)`;
}

export function describeCredits(credits) {
  if (!credits) return "Unlimited";
  const left = `${count.format(credits.remaining)} remaining`;
  return credits.refill ? `${left}; ${describeRefill(credits.refill)}` : `${left}; no refill`;
}

/** The API's shape, so a form's values and a key's compare as JSON. */
export function normalLimits(key) {
  const rate = key.rate_limit ? { limit: key.rate_limit.limit, period_seconds: key.rate_limit.period_seconds } : null;
  const credits = key.credits ? {
    remaining: key.credits.remaining,
    refill: key.credits.refill ? { interval: key.credits.refill.interval, amount: key.credits.refill.amount } : null,
  } : null;
  return { rate_limit: rate, credits };
}

export class FieldError extends Error {
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
export function readLimits(prefix) {
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
export function fillLimits(prefix, limits) {
  const rate = limits.rate_limit;
  const credits = limits.credits;
  $(`${prefix}-rate`).value = rate ? String(rate.limit) : "";
  $(`${prefix}-period`).value = String(rate ? rate.period_seconds : 60);
  $(`${prefix}-credits`).value = credits ? String(credits.remaining) : "";
  $(`${prefix}-refill`).value = credits && credits.refill ? credits.refill.interval : "";
  $(`${prefix}-refill-amount`).value = credits && credits.refill ? String(credits.refill.amount) : "";
  const scoped = !isMaster();
  const ownRate = scoped ? session.me.rate_limit : null;
  const ownCredits = scoped ? session.me.credits : null;
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

export function syncRefill(prefix) {
  const none = $(`${prefix}-refill`).value === "";
  const amount = $(`${prefix}-refill-amount`);
  amount.disabled = none;
  if (!none && amount.value === "") amount.value = $(`${prefix}-credits`).value;
}

export function limitsError(target, error) {
  if (error instanceof FieldError) {
    showError(target, new ApiError(0, "", error.message));
    $(error.field).focus();
    return true;
  }
  return false;
}
