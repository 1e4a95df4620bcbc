// A key's usage in its details: the chart for the chosen period, its legend and summary, and the
// same numbers as a table.

import { $, clearError, h, showError } from "./dom.js";
import { api, session } from "./api.js";
import { RANGES, chart, legend, periods, series, summarise, table } from "./chart.js";

let shownKey = null;

function chosenRange() {
  const checked = document.querySelector("input[name='usage-range']:checked");
  return checked && RANGES[checked.value] ? checked.value : "24h";
}

export async function showKeyUsage(id) {
  shownKey = id;
  const range = chosenRange();
  const view = session.generation;
  const starts = periods(range);
  const status = $("key-usage-summary");
  clearError("key-usage-error");
  status.textContent = "Loading usage…";
  $("key-usage-chart").setAttribute("aria-busy", "true");
  try {
    const { data } = await api("GET", `api-keys/${encodeURIComponent(id)}/usage`, {
      query: { from: starts[0].toISOString(), to: new Date().toISOString(), granularity: RANGES[range].granularity },
    });
    if (view !== session.generation || shownKey !== id || chosenRange() !== range) return;
    const rows = series(range, data);
    const sentence = summarise(range, rows, data.last_ip);
    status.textContent = sentence;
    $("key-usage-chart").replaceChildren(chart(range, rows, `Requests per ${RANGES[range].granularity}, ${RANGES[range].label}, stacked by outcome. ${sentence}`), legend(rows));
    $("key-usage-table").replaceChildren(table(range, rows, `Requests per ${RANGES[range].granularity}, ${RANGES[range].label}, newest first`));
  } catch (error) {
    if (view === session.generation && shownKey === id) {
      status.textContent = "";
      $("key-usage-chart").replaceChildren();
      $("key-usage-table").replaceChildren(h("p", { class: "muted", text: "No usage to show." }));
      showError("key-usage-error", error);
    }
  } finally {
    $("key-usage-chart").removeAttribute("aria-busy");
  }
}

export function rangeChanged() {
  if (shownKey !== null) showKeyUsage(shownKey);
}

export function forgetUsage() {
  shownKey = null;
}
