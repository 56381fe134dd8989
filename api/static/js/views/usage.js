// #/usage: the team's GPU-seconds over time (one /v1/usage query with `bucket`), and what it stores. The
// admin also sees every team's totals (/v1/admin/usage).

import { api, session } from "../api.js";
import { timeBars } from "../charts.js";
import { card, errorBox, fill, h, table } from "../dom.js";
import { bytes, num } from "../format.js";

const RANGES = {
  "24h": { label: "Last 24 hours", bucket: 3600, count: 24 },
  "7d": { label: "Last 7 days", bucket: 6 * 3600, count: 28 },
  "30d": { label: "Last 30 days", bucket: 86400, count: 30 },
};

export function usageView(main) {
  let chart = null, stopped = false;
  const range = h("select", { id: "usage-range", "aria-label": "Range", onchange: () => draw() },
    Object.entries(RANGES).map(([k, r]) => h("option", { value: k, selected: k === "7d" }, r.label)));
  const plot = h("div", { class: "usage-chart", id: "usage-chart" });
  const totals = h("div", { id: "usage-totals" });
  const teams = h("div", { id: "usage-teams" });
  fill(main, h("div", { class: "page-head" }, h("h1", {}, "Usage"), h("div", { class: "actions" }, range)),
    totals, card("GPU-seconds", plot), session.admin ? card("Every team", teams) : null);

  async function draw() {
    const { bucket, count } = RANGES[range.value];
    // Bars on whole buckets; the last one ends now (the service counts a running job up to `until`).
    const now = Date.now() / 1000;
    const since = Math.ceil(now / bucket) * bucket - count * bucket;
    try {
      const [overall, over] = await Promise.all([api("/v1/usage"),
        api(`/v1/usage?since=${since}&until=${now}&bucket=${bucket}`)]);
      if (stopped) return;
      fill(totals, summary(overall));
      chart?.destroy();
      fill(plot);
      chart = timeBars(plot, over.buckets.map((b) => b.start),
        over.buckets.map((b) => Math.round(b.gpu_seconds * 10) / 10), "GPU-seconds");
      plot.dataset.bars = String(over.buckets.length);
    } catch (err) {
      if (!stopped) fill(plot, errorBox(err));
    }
  }
  draw();
  if (session.admin) everyTeam(teams);
  return () => { stopped = true; chart?.destroy(); };
}

function summary(u) {
  const storage = u.storage_limit_bytes ? `${bytes(u.storage_bytes)} of ${bytes(u.storage_limit_bytes)}` : bytes(u.storage_bytes);
  const items = [
    ["Team", u.team], ["GPU-hours, all time", num(u.gpu_seconds / 3600, 3)], ["Trained tokens", num(u.trained_tokens)],
    ["Jobs", `${u.jobs.total} (${u.jobs.running} running, ${u.jobs.queued} queued)`],
    ["Fair-share GPU-hours", `${num(u.fair_share_gpu_seconds / 3600, 3)} in the last ${num(u.fair_share_window_s / 3600, 3)} h`],
    ["Storage", storage],
  ];
  return h("div", { class: "summary" }, items.map(([k, v]) => h("div", { class: "item" }, h("div", { class: "k" }, k), h("div", { class: "v" }, v))));
}

async function everyTeam(el) {
  try {
    const all = await api("/v1/admin/usage");
    fill(el, table([
      { title: "Team", cell: (u) => u.team },
      { title: "GPU-hours", class: "right", cell: (u) => num(u.gpu_seconds / 3600, 3) },
      { title: "Jobs", class: "right", cell: (u) => String(u.jobs.total) },
      { title: "Running", class: "right", cell: (u) => String(u.jobs.running) },
      { title: "Queued", class: "right", cell: (u) => String(u.jobs.queued) },
      { title: "Storage", class: "right", cell: (u) => bytes(u.storage_bytes) },
    ], all.data));
  } catch (err) {
    fill(el, errorBox(err));
  }
}
