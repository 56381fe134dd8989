// #/pool: the workers (idle, busy, lost, stopped) and the queues, refreshed every few seconds.

import { api } from "../api.js";
import { badge, card, errorBox, fill, h, table } from "../dom.js";
import { duration } from "../format.js";

const REFRESH_MS = 3000;

export function poolView(main) {
  let timer = null, stopped = false;
  const body = h("div", { id: "pool" }, h("p", { class: "muted" }, "Loading…"));
  fill(main, h("div", { class: "page-head" }, h("h1", {}, "Pool")), body);

  async function load() {
    try {
      const pool = await api("/v1/pool");
      if (!stopped) fill(body, ...render(pool));
    } catch (err) {
      if (!stopped) fill(body, errorBox(err));
    }
    if (!stopped) timer = setTimeout(load, REFRESH_MS);
  }
  load();
  return () => { stopped = true; clearTimeout(timer); };
}

function render(pool) {
  const count = (state) => pool.workers.filter((w) => w.state === state).length;
  const stats = h("div", { class: "stats" },
    [["idle", count("idle")], ["busy", count("busy")], ["lost", count("lost")], ["queued jobs", pool.queued]]
      .map(([k, v]) => h("div", { class: `stat stat-${k.replace(" ", "-")}` }, h("div", { class: "n" }, String(v)), h("div", { class: "k" }, k))));
  const workers = table([
    { title: "Worker", cell: (w) => h("span", { class: "mono" }, w.name) },
    { title: "State", cell: (w) => badge(w.state) },
    { title: "Host", cell: (w) => w.hostname },
    { title: "GPUs", cell: (w) => `${w.gpus} × ${w.gpu_type}` },
    { title: "Job", cell: (w) => (w.job ? h("a", { href: `#/jobs/${w.job}`, class: "mono" }, w.job) : "") },
    { title: "Last heartbeat", cell: (w) => `${duration(w.seconds_since_heartbeat)} ago` },
  ], pool.workers, { empty: "No worker has joined the pool. Start one with `dpo-service worker`." });
  const teams = table([
    { title: "Team", cell: (t) => t.team },
    { title: "Queued", class: "right", cell: (t) => String(t.queued) },
    { title: "Running", class: "right", cell: (t) => String(t.running) },
  ], pool.by_team, { empty: "No queued or running jobs." });
  const gpus = table([
    { title: "GPU type asked", cell: (g) => g.gpu_type },
    { title: "Queued", class: "right", cell: (g) => String(g.queued) },
    { title: "Running", class: "right", cell: (g) => String(g.running) },
    { title: "Idle workers", class: "right", cell: (g) => String(g.idle_workers) },
    { title: "Busy workers", class: "right", cell: (g) => String(g.busy_workers) },
  ], pool.by_gpu_type, { empty: "No queued or running jobs." });
  return [stats, card("Workers", workers),
    h("div", { class: "columns" }, card("Queues by team", teams), card("Queues by GPU type", gpus))];
}
