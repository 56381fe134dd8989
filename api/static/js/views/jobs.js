// #/jobs: the team's jobs (the admin's: every team's), newest first, refreshed every few seconds.

import { listAll } from "../api.js";
import { badge, card, errorBox, fill, h, table, takeNotice } from "../dom.js";
import { ago, dateTime, jobDuration, modelName } from "../format.js";

const STATUSES = ["queued", "running", "paused", "succeeded", "failed", "cancelled"];
const REFRESH_MS = 3000;

export function jobsView(main, [status]) {
  let shown = 50, timer = null, stopped = false;
  const filter = h("select", { id: "status-filter", "aria-label": "Filter by status", onchange: () => {
    location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs";
  } }, h("option", { value: "" }, "All statuses"), STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const list = h("div", { id: "jobs-list" });
  const more = h("button", { type: "button", class: "secondary", hidden: true, onclick: () => { shown += 50; load(); } },
    "Show more");
  fill(main, h("div", { class: "page-head" }, h("h1", {}, "Jobs"),
    h("div", { class: "actions" }, filter, h("a", { class: "button primary", href: "#/new" }, "New job"))),
  takeNotice(), card(null, list, more));

  async function load() {
    clearTimeout(timer);
    try {
      const jobs = await fetchJobs(status, shown);
      if (stopped) return;
      fill(list, jobsTable(jobs.items));
      more.hidden = !jobs.hasMore;
    } catch (err) {
      if (!stopped) fill(list, errorBox(err));
    }
    if (!stopped) timer = setTimeout(load, REFRESH_MS);
  }
  load();
  return () => { stopped = true; clearTimeout(timer); };
}

/** Up to `want` jobs with `status` (any when empty), newest first: the API filters by status. */
async function fetchJobs(status, want) {
  const items = await listAll(`/v1/fine_tuning/jobs${status ? `?status=${encodeURIComponent(status)}` : ""}`, want + 1);
  return { items: items.slice(0, want), hasMore: items.length > want };
}

function jobsTable(jobs) {
  return table([
    { title: "Job", cell: (j) => h("a", { href: `#/jobs/${j.id}`, class: "mono" }, j.id) },
    { title: "Status", cell: (j) => badge(j.status) },
    { title: "Model", cell: (j) => h("span", { title: j.model }, modelName(j.model)) },
    { title: "Created", cell: (j) => h("span", { title: dateTime(j.created_at) }, ago(j.created_at)) },
    { title: "Duration", cell: (j) => jobDuration(j) },
    { title: "Progress", cell: progressCell },
    { title: "Queue", cell: queueCell },
  ], jobs, { empty: "No jobs. Start one with New job.", rowAttrs: (j) => ({ dataset: { job: j.id, status: j.status } }) });
}

function progressCell(job) {
  const p = job.progress || {};
  if (!p.total_steps) return "";
  const pct = Math.min(100, Math.round((100 * (p.step || 0)) / p.total_steps));
  return h("div", { class: "mini-progress", title: `step ${p.step || 0} of ${p.total_steps}` },
    h("progress", { max: 100, value: pct }), h("span", {}, `${p.step || 0}/${p.total_steps}`));
}

function queueCell(job) {
  if (job.status !== "queued" || job.queue_position === null || job.queue_position === undefined) return "";
  const text = job.queue_position === 0 ? "starting" : `#${job.queue_position}`;
  return h("span", { title: job.queue_reason || "" }, text);
}
