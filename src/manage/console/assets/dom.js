// DOM helpers and formatting shared by the console's modules. Every string from the API is
// rendered as text (textContent, text nodes), never parsed as HTML.

export const NEVER_USED = "0001-01-01T00:00:00Z";
export const DAY_MS = 86400000;

export const $ = (id) => document.getElementById(id);

/** An element with a class, attributes and children (strings become text nodes). */
export function h(tag, props, ...children) {
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

/** An SVG element (for the usage chart): attributes only, no markup. */
export function svg(tag, attributes, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

// ---- Formatting -------------------------------------------------------------------------------

export const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });
export const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
export const count = new Intl.NumberFormat(undefined);

export function parseTime(value) {
  if (!value || value === NEVER_USED) return null;
  const time = new Date(value);
  return Number.isNaN(time.getTime()) ? null : time;
}

export function ago(time) {
  const seconds = Math.round((time.getTime() - Date.now()) / 1000);
  const steps = [["year", 31536000], ["month", 2592000], ["week", 604800], ["day", 86400], ["hour", 3600], ["minute", 60]];
  for (const [unit, size] of steps) {
    if (Math.abs(seconds) >= size) return relative.format(Math.trunc(seconds / size), unit);
  }
  return Math.abs(seconds) < 45 ? "just now" : relative.format(seconds, "second");
}

export function when(value, { never = "Never", relativeTime = false, withTime = false } = {}) {
  const time = parseTime(value);
  if (time === null) return h("span", { text: never });
  const text = relativeTime ? ago(time) : (withTime ? dateTimeFormat : dateFormat).format(time);
  return h("time", { datetime: time.toISOString(), title: dateTimeFormat.format(time), text });
}

export function plural(n, one, many) {
  return `${count.format(n)} ${n === 1 ? one : many}`;
}

export function chips(items) {
  return h("span", { class: "chips" }, ...items.map((item) => h("span", { class: "chip", text: item })));
}

export function localDate(time) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${time.getFullYear()}-${pad(time.getMonth() + 1)}-${pad(time.getDate())}`;
}

// ---- Messages and dialogs ---------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function showError(target, error) {
  if (error instanceof ApiError && error.code === "STALE") return;
  const node = $(target);
  const message = error instanceof ApiError ? error.message : "Something went wrong in the page. Reload it and retry.";
  node.replaceChildren(document.createTextNode(message));
  if (error instanceof ApiError && error.code && error.status !== 0) {
    node.append(h("span", { class: "code", text: error.code }));
  }
  node.hidden = false;
}

export function clearError(target) {
  const node = $(target);
  node.hidden = true;
  node.replaceChildren();
}

/** Says `message` to screen readers (and shows it briefly) through the polite live region. */
export function announce(message) {
  const region = $("announcer");
  region.textContent = "";
  // A new text node in a later task, so that repeating a message is announced again.
  setTimeout(() => { region.textContent = message; }, 50);
}

export function open(id) {
  const dialog = $(id);
  if (!dialog.open) dialog.showModal();
  return dialog;
}

export function close(id) {
  const dialog = $(id);
  if (dialog.open) dialog.close();
}

// ---- Shown once -------------------------------------------------------------------------------

/** Shows a secret once (a new or rotated key, a webhook signing secret). */
export function showOnce(title, forWhat, value) {
  $("secret-title").textContent = title;
  $("secret-for").replaceChildren(...forWhat);
  $("secret-value").textContent = value;
  $("secret-status").textContent = "";
  open("secret-dialog");
  $("secret-copy").focus();
}

export function clearSecret() {
  $("secret-value").textContent = "";
  $("secret-for").replaceChildren();
  $("secret-status").textContent = "";
  const selection = window.getSelection();
  if (selection) selection.removeAllRanges();
}

export async function copySecret() {
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
