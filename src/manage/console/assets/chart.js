// The usage chart: requests per hour or day, stacked by outcome, drawn as SVG from DOM-created
// elements (no library, nothing parsed), with the same numbers as a table for screen readers and
// keyboard users.

import { count, h, plural, svg } from "./dom.js";

export const OUTCOMES = [
  ["admitted", "Admitted"],
  ["rate_limited", "Rate limited"],
  ["out_of_credits", "Out of credits"],
  ["missing_scope", "Missing scope"],
  ["expired_or_revoked", "Expired or revoked"],
  ["invalid", "Invalid key"],
  ["network", "Network not allowed"],
];

const HOUR_MS = 3600000;
const DAY_MS = 86400000;

/** The periods a chart shows: 24 hours by the hour, or 7 or 30 UTC days by the day. */
export const RANGES = {
  "24h": { label: "last 24 hours", granularity: "hour", periods: 24 },
  "7d": { label: "last 7 days", granularity: "day", periods: 7 },
  "30d": { label: "last 30 days", granularity: "day", periods: 30 },
};

/** The start of every period of `range` ending now, oldest first. */
export function periods(range, now = new Date()) {
  const { granularity, periods: n } = RANGES[range];
  const step = granularity === "hour" ? HOUR_MS : DAY_MS;
  const last = Math.floor(now.getTime() / step) * step;
  return Array.from({ length: n }, (_, i) => new Date(last - (n - 1 - i) * step));
}

const hourLabel = new Intl.DateTimeFormat(undefined, { hour: "numeric" });
const hourLong = new Intl.DateTimeFormat(undefined, { weekday: "short", hour: "numeric", minute: "2-digit" });
const dayLabel = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", timeZone: "UTC" });
const dayLong = new Intl.DateTimeFormat(undefined, { weekday: "short", month: "short", day: "numeric", timeZone: "UTC" });

function label(start, granularity, long) {
  if (granularity === "hour") return (long ? hourLong : hourLabel).format(start);
  return (long ? dayLong : dayLabel).format(start);
}

/** Every period of the range with its counts by outcome (zeros where the API left a period out). */
export function series(range, usage, now = new Date()) {
  const byStart = new Map((usage.buckets || []).map((b) => [new Date(b.start).getTime(), b]));
  return periods(range, now).map((start) => {
    const bucket = byStart.get(start.getTime());
    const counts = Object.fromEntries(OUTCOMES.map(([name]) => [name, 0]));
    if (bucket) {
      counts.admitted = bucket.admitted || 0;
      for (const [name, n] of Object.entries(bucket.refused || {})) if (name in counts) counts[name] = n;
    }
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    return { start, counts, total };
  });
}

function niceMax(max) {
  if (max <= 4) return 4;
  const magnitude = 10 ** Math.floor(Math.log10(max));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s * 4 >= max);
  return step * 4;
}

/** The chart: an SVG image whose name summarises it, one group of stacked bars per period. */
export function chart(range, rows, summary) {
  const { granularity } = RANGES[range];
  const width = 720;
  const height = 220;
  const pad = { top: 12, right: 8, bottom: 28, left: 44 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const max = niceMax(Math.max(0, ...rows.map((r) => r.total)));
  const slot = plotW / rows.length;
  const barW = Math.max(2, Math.min(36, slot * 0.7));
  const image = svg("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": summary,
  });
  const grid = svg("g", { class: "grid", "aria-hidden": "true" });
  for (let i = 0; i <= 4; i += 1) {
    const y = pad.top + plotH - (plotH * i) / 4;
    grid.append(
      svg("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y }),
      svg("text", { x: pad.left - 8, y: y + 4, "text-anchor": "end", text: count.format((max * i) / 4) }),
    );
  }
  image.append(grid);
  const every = Math.ceil(rows.length / 8);
  rows.forEach((row, i) => {
    const x = pad.left + slot * i + (slot - barW) / 2;
    const group = svg("g", { class: "bar", "data-period": row.start.toISOString(), "data-total": row.total });
    group.append(svg("title", { text: `${label(row.start, granularity, true)}: ${plural(row.total, "request", "requests")}` }));
    let y = pad.top + plotH;
    for (const [name] of OUTCOMES) {
      const n = row.counts[name];
      if (!n) continue;
      const barH = (plotH * n) / max;
      y -= barH;
      group.append(svg("rect", { class: `seg seg-${name}`, x, y, width: barW, height: Math.max(barH, 1), "data-outcome": name, "data-count": n }));
    }
    image.append(group);
    if (i % every === 0) {
      image.append(svg("text", {
        class: "axis", x: pad.left + slot * i + slot / 2, y: height - 8, "text-anchor": "middle", "aria-hidden": "true",
        text: label(row.start, granularity, false),
      }));
    }
  });
  return image;
}

/** The legend: the outcomes the chart shows. */
export function legend(rows) {
  const present = OUTCOMES.filter(([name]) => rows.some((r) => r.counts[name] > 0));
  return h("ul", { class: "legend", "aria-hidden": "true" },
    ...present.map(([name, text]) => h("li", {}, h("span", { class: `swatch seg-${name}` }), text)));
}

/** The same numbers as a table: one row per period, admitted, refused by reason, total. */
export function table(range, rows, caption) {
  const { granularity } = RANGES[range];
  const refusedNames = OUTCOMES.slice(1);
  return h("table", { class: "usage-table" },
    h("caption", { text: caption }),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col", text: granularity === "hour" ? "Hour" : "Day (UTC)" }),
      h("th", { scope: "col", class: "num", text: "Admitted" }),
      h("th", { scope: "col", class: "num", text: "Refused" }),
      h("th", { scope: "col", text: "Refusals by reason" }),
      h("th", { scope: "col", class: "num", text: "Total" }))),
    h("tbody", {}, ...rows.slice().reverse().map((row) => {
      const refused = row.total - row.counts.admitted;
      const reasons = refusedNames.filter(([name]) => row.counts[name] > 0)
        .map(([name, text]) => `${text}: ${count.format(row.counts[name])}`).join(", ");
      return h("tr", { "data-period": row.start.toISOString() },
        h("th", { scope: "row" }, h("time", { datetime: row.start.toISOString(), text: label(row.start, granularity, true) })),
        h("td", { class: "num", text: count.format(row.counts.admitted) }),
        h("td", { class: "num", text: count.format(refused) }),
        h("td", { class: "muted", text: reasons || "—" }),
        h("td", { class: "num", text: count.format(row.total) }));
    })));
}

/** One sentence: what the chart shows. */
export function summarise(range, rows, lastIp) {
  const total = rows.reduce((a, r) => a + r.total, 0);
  const admitted = rows.reduce((a, r) => a + r.counts.admitted, 0);
  const busiest = rows.reduce((best, r) => (r.total > best.total ? r : best), rows[0]);
  let text = `${plural(total, "request", "requests")} in the ${RANGES[range].label}: ${count.format(admitted)} admitted, ${count.format(total - admitted)} refused.`;
  if (total > 0) text += ` Busiest ${RANGES[range].granularity}: ${label(busiest.start, RANGES[range].granularity, true)} (${count.format(busiest.total)}).`;
  if (lastIp) text += ` Last used from ${lastIp}.`;
  return text;
}
