// #/jobs/ID: one job. Status and spec (with the estimate beside the measured run), live metric charts and the
// events tail (both fed by the job's event stream), its samples (reference beside policy), its checkpoints and
// result files with downloads, cancel, pause or resume, and, once it has ended, deleting what it keeps.

import { api, download, listAll } from "../api.js";
import { JOB_CHARTS, MetricChart, MetricStore } from "../charts.js";
import { badge, card, errorBox, fill, h, leaveNotice, table } from "../dom.js";
import { bytes, dateTime, duration, jobDuration, num, TERMINAL } from "../format.js";
import { followEvents } from "../sse.js";
import { estimateItems } from "./preflight.js";
import { SamplesPanel } from "./samples.js";
import { dump } from "../../vendor/js-yaml/js-yaml.esm.min.js";

const POLL_MS = 2000;
const EVENTS_SHOWN = 300;

export function jobView(main, [jobId]) {
  const abort = new AbortController();
  const view = new JobPage(main, jobId, abort.signal);
  view.start();
  return () => { abort.abort(); view.stop(); };
}

class JobPage {
  constructor(main, jobId, signal) {
    Object.assign(this, { main, jobId, signal, job: null, timer: null, drawPending: false, pending: {} });
    this.marks = new Map();  // the training's warnings by code and step, marked on every chart
    this.store = new MetricStore();
    this.charts = JOB_CHARTS.map((def) => new MetricChart(def, `job-${jobId}`));
    this.head = h("div", { class: "page-head" });
    this.summary = h("div", { class: "summary" });
    this.stream = h("span", { class: "stream-state", id: "stream-state" });
    this.eventsBody = h("tbody");
    this.showMetrics = h("input", { type: "checkbox", checked: true, onchange: () => this.filterEvents() });
    this.checkpoints = h("div", { id: "checkpoints" });
    this.results = h("div", { id: "result-files" });
    this.resultsShown = null;  // the result_files the panel lists, to load them again only when they change
    this.samples = new SamplesPanel(jobId, signal, () => TERMINAL.includes(this.job?.status));
    this.samplesCard = card("Samples", this.samples.el);
    this.spec = h("pre", { class: "spec", id: "spec" });
  }

  start() {
    fill(this.main, h("p", { class: "muted" }, "Loading…"));
    this.refresh().then(() => {
      if (!this.job) return;
      this.layout();
      followEvents(this.jobId, { signal: this.signal, onEvent: (e) => this.onEvent(e),
                                 onState: (s) => { this.stream.textContent = `stream: ${s}`; this.stream.dataset.state = s; } });
    });
  }

  stop() {
    clearTimeout(this.timer);
    Object.values(this.pending).forEach(clearTimeout);
    this.charts.forEach((c) => c.destroy());
  }

  layout() {
    const tail = h("table", { class: "table events", id: "events" },
      h("thead", {}, h("tr", {}, h("th", {}, "Time"), h("th", {}, "Level"), h("th", {}, "Message"))), this.eventsBody);
    fill(this.main, this.head, this.summary,
      card(h("span", {}, "Metrics ", this.stream), h("div", { class: "charts", id: "charts" }, this.charts.map((c) => c.el))),
      h("div", { class: "columns" },
        card("Events", h("label", { class: "inline" }, this.showMetrics, " show metrics records"),
          h("div", { class: "scroll" }, tail)),
        h("div", {}, card("Checkpoints", this.checkpoints), card("Result files", this.results),
          card("Spec", this.spec))));
    this.samplesCard.hidden = !this.job.training?.samples;  // only a spec with `samples` makes any
    this.main.insertBefore(this.samplesCard, this.main.querySelector(".columns"));
    this.render();
    this.charts.forEach((c) => c.update(this.store));  // empty axes until the first record
    this.loadCheckpoints();
    if (!this.samplesCard.hidden) this.samples.load();
  }

  async refresh() {
    clearTimeout(this.timer);
    try {
      this.job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(this.jobId)}`);
      if (this.summary.isConnected) this.render();
    } catch (err) {
      if (this.signal.aborted) return;
      if (!this.job) return fill(this.main, h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")), errorBox(err));
    }
    if (!this.signal.aborted && !TERMINAL.includes(this.job?.status)) this.timer = setTimeout(() => this.refresh(), POLL_MS);
  }

  render() {
    const job = this.job;
    const cancel = h("button", { type: "button", class: "danger", id: "cancel", onclick: () => this.cancel(cancel) },
      job.cancel_requested ? "Cancelling…" : "Cancel job");
    cancel.disabled = job.cancel_requested;
    fill(this.head, h("div", {}, h("a", { href: "#/jobs", class: "muted" }, "← Jobs"),
      h("h1", {}, h("span", { class: "mono" }, job.id), " ", badge(job.status))),
    h("div", { class: "actions", id: "job-actions" }, this.pauseButton(job),
      TERMINAL.includes(job.status) ? this.deleteButton() : cancel));
    fill(this.summary, summaryItems(job));
    if (this.results.isConnected) this.showResultFiles(job.result_files || []);
    this.charts.forEach((c) => c.finished(TERMINAL.includes(job.status)));
    (job.warnings || []).forEach((w) => this.mark(w));
    const spec = dump(job.training || {}, { lineWidth: 100 });
    if (this.spec.textContent !== spec) this.spec.textContent = spec;
  }

  /** Pause (a queued or running job) or Resume (a paused one); none once the job has finished. */
  pauseButton(job) {
    if (TERMINAL.includes(job.status) || job.cancel_requested) return null;
    const paused = job.status === "paused";
    const button = h("button", { type: "button", id: paused ? "resume" : "pause",
                                 onclick: () => this.act(button, paused ? "resume" : "pause") },
      paused ? "Resume job" : job.pause_requested ? "Pausing…" : "Pause job");
    button.disabled = !!job.pause_requested;
    return button;
  }

  async act(button, action) {
    button.disabled = true;
    try {
      this.job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(this.jobId)}/${action}`, { method: "POST" });
      this.render();
      this.refresh();
    } catch (err) {
      button.disabled = false;
      this.summary.prepend(errorBox(err));
    }
  }

  cancel(button) {
    if (!confirm(`Cancel job ${this.jobId}? A running job stops at its next step; no final model is written.`)) return;
    return this.act(button, "cancel");
  }

  /** Delete (an ended job's checkpoints, result files, events, samples): asks again inline before it does. */
  deleteButton() {
    const actions = () => this.head.querySelector("#job-actions");
    const ask = h("button", { type: "button", class: "danger", id: "delete", onclick: () => fill(actions(),
      h("span", { class: "confirm-text", id: "delete-confirm-text" },
        "Delete its checkpoints, final model, result files, events and samples? The job stays listed with its usage."),
      h("button", { type: "button", class: "secondary", id: "delete-keep", onclick: () => this.render() }, "Keep"),
      h("button", { type: "button", class: "danger", id: "delete-confirm", onclick: (e) => this.remove(e.target) },
        "Delete")) }, "Delete job");
    return ask;
  }

  async remove(button) {
    button.disabled = true;
    try {
      await api(`/v1/fine_tuning/jobs/${encodeURIComponent(this.jobId)}`, { method: "DELETE" });
      leaveNotice(`Deleted what job ${this.jobId} kept (checkpoints, final model, result files, events, samples); `
                  + "it stays listed with its usage.");
      location.hash = "#/jobs";
    } catch (err) {
      this.render();
      this.summary.prepend(errorBox(err));
    }
  }

  onEvent(event) {
    if (event.type === "metrics" && event.data) {
      this.store.add(event.data);
      this.advance(event.data);
      this.scheduleDraw();
    }
    this.addEventRow(event);
    const code = event.data?.code, status = event.data?.status;
    if (event.level === "warn" && code && typeof event.data.step === "number") this.mark(event.data);
    if (code === "checkpoint_saved" || (status && TERMINAL.includes(status))) this.soon("checkpoints", () => this.loadCheckpoints());
    if (status) this.soon("job", () => this.refresh());
    // A sampling step's record (recorder.on_samples), or the end (its last samples are in by then).
    if (!this.samplesCard.hidden && (event.data?.["samples/length"] !== undefined || (status && TERMINAL.includes(status)))) {
      this.soon("samples", () => this.samples.load());
    }
  }

  /** Mark a warning ({code, step}) on the charts, once per code and step. */
  mark(warning) {
    const key = `${warning.code}@${warning.step}`;
    if (this.marks.has(key) || typeof warning.step !== "number") return;
    this.marks.set(key, { code: warning.code, step: warning.step });
    const marks = [...this.marks.values()];
    this.charts.forEach((c) => c.setMarks(marks));
  }

  /** Run `fn` once after a burst of events (a finished job's stream replays all of them at once). */
  soon(name, fn) {
    clearTimeout(this.pending[name]);
    this.pending[name] = setTimeout(() => { if (!this.signal.aborted) fn(); }, 250);
  }

  /** A training record newer than the job as last fetched moves its progress on at once. */
  advance(record) {
    const progress = this.job?.progress;
    if (!progress || "eval_loss" in record || "samples/length" in record || !(record.step > (progress.step || 0))) return;
    Object.assign(progress, { step: record.step, total_steps: record.total_steps ?? progress.total_steps,
                              tokens_per_s: record.tokens_per_s ?? progress.tokens_per_s });
    this.job.metrics = record;
    this.summaryDue = true;
  }

  scheduleDraw() {
    if (this.drawPending) return;
    this.drawPending = true;
    requestAnimationFrame(() => {
      this.drawPending = false;
      this.charts.forEach((c) => c.update(this.store));
      if (this.summaryDue && this.summary.isConnected) fill(this.summary, summaryItems(this.job));
      this.summaryDue = false;
    });
  }

  addEventRow(event) {
    const row = h("tr", { class: `level-${event.level} type-${event.type}`, dataset: { type: event.type } },
      h("td", { class: "nowrap", title: dateTime(event.created_at) }, new Date(event.created_at * 1000).toLocaleTimeString()),
      h("td", {}, event.level), h("td", {}, event.message));
    row.hidden = event.type === "metrics" && !this.showMetrics.checked;
    this.eventsBody.prepend(row);  // newest first
    while (this.eventsBody.rows.length > EVENTS_SHOWN) this.eventsBody.lastElementChild.remove();
  }

  filterEvents() {
    for (const row of this.eventsBody.rows) row.hidden = row.dataset.type === "metrics" && !this.showMetrics.checked;
  }

  async loadCheckpoints() {
    try {
      const items = await listAll(`/v1/fine_tuning/jobs/${encodeURIComponent(this.jobId)}/checkpoints`, 200);
      fill(this.checkpoints, table([
        { title: "Step", cell: (c) => String(c.step_number) },
        { title: "", cell: (c) => (c.final ? h("span", { class: "badge badge-succeeded" }, "final") : "") },
        { title: "Loss", cell: (c) => num(c.metrics?.loss) },
        { title: "Created", cell: (c) => dateTime(c.created_at) },
        { title: "Size", class: "right", cell: (c) => bytes(c.bytes) },
        { title: "", class: "right", cell: (c) => downloadButton(c.download_url, `${c.id}.tar`, c.id) },
      ], items, { empty: "No checkpoint yet.", rowAttrs: (c) => ({ dataset: { checkpoint: c.id } }) }));
    } catch (err) {
      fill(this.checkpoints, errorBox(err));
    }
  }

  /** The job's result_files (file ids, written when it succeeds) by name, format and size, to download. */
  async showResultFiles(ids) {
    const key = ids.join(",");
    if (key === this.resultsShown) return;
    this.resultsShown = key;
    if (!ids.length) {
      const why = TERMINAL.includes(this.job.status) ? "None: a job that succeeds writes them." : "None yet: written when the job succeeds.";
      return fill(this.results, h("p", { class: "muted" }, why));
    }
    const files = await Promise.all(ids.map((id) => api(`/v1/files/${encodeURIComponent(id)}`).catch((err) => ({ id, err }))));
    if (this.signal.aborted || this.resultsShown !== key) return;
    fill(this.results, table([
      { title: "File", cell: (f) => (f.err ? h("span", { class: "mono muted" }, f.id) : h("span", { class: "mono" }, f.filename)) },
      { title: "Format", cell: (f) => f.format || "" },
      { title: "Size", class: "right", cell: (f) => bytes(f.bytes) },
      { title: "", class: "right", cell: (f) => (f.err ? h("span", { class: "muted", title: f.err.message }, f.err.status === 404 ? "deleted" : "unavailable")
        : downloadButton(`/v1/files/${encodeURIComponent(f.id)}/content`, f.filename, f.id)) },
    ], files, { rowAttrs: (f) => ({ dataset: { resultFile: f.id } }) }));
  }
}

/** A Download button for a content route (`path`), saved as `filename`, showing its progress. */
function downloadButton(path, filename, id) {
  const button = h("button", { type: "button", class: "secondary small", dataset: { download: id },
                               onclick: async () => {
    button.disabled = true;
    try {
      const how = await download(path, filename, (got, total) => {
        button.textContent = total ? `${Math.floor((100 * got) / total)}%` : `${bytes(got)}…`;
      });
      // A link is saved by the browser's own downloads, which show its progress.
      button.textContent = how === "link" ? "Download started" : "Downloaded";
      button.dataset.via = how;
    } catch (err) {
      button.textContent = "Download failed";
      button.title = err.message;
    } finally {
      button.disabled = false;
    }
  } }, "Download");
  return button;
}

function summaryItems(job) {
  const p = job.progress || {};
  const items = [
    ["Model", h("span", { class: "mono", title: job.model }, breakable(job.model))],
    ["Created", dateTime(job.created_at)],
    ["Duration", jobDuration(job) || "not started"],
    ["Progress", p.total_steps ? h("div", { class: "progress" },
      h("progress", { max: p.total_steps, value: p.step || 0 }),
      h("span", { id: "progress-text" }, `step ${p.step || 0} of ${p.total_steps}`)) : "—"],
  ];
  if (job.status === "running" && job.estimated_finish) {
    items.push(["Finishes in", duration(job.estimated_finish - Date.now() / 1000)]);
  }
  if (p.tokens_per_s) items.push(["Tokens/s", num(p.tokens_per_s, 5)]);
  if (job.status === "queued") {
    items.push(["Queue", job.queue_position === 0 ? "starting" : `#${job.queue_position ?? "?"}`]);
    if (job.queue_reason) items.push(["Waiting for", job.queue_reason]);
  }
  if (job.worker) items.push(["Worker", job.worker]);
  if (job.metrics?.loss !== undefined) items.push(["Loss", num(job.metrics.loss)]);
  if (job.eval_metrics?.eval_loss !== undefined) items.push(["Eval loss", num(job.eval_metrics.eval_loss)]);
  items.push(...estimateItems(job));
  if (job.fine_tuned_model) items.push(["Final model", h("span", { class: "mono" }, job.fine_tuned_model)]);
  if (job.warnings?.length) {
    items.push(["Warnings", h("span", { class: "warn-text", id: "warnings" }, job.warnings.map((w, i) => [
      i ? ", " : "", h("span", { title: w.message, dataset: { code: w.code } }, `${w.code} (step ${w.step ?? "?"})`)]).flat())]);
  }
  if (job.error) items.push(["Error", h("span", { class: "error-text" }, `${job.error.code}: ${job.error.message}`)]);
  return items.map(([k, v]) => h("div", { class: "item" }, h("div", { class: "k" }, k), h("div", { class: "v" }, v)));
}

/** A path that may wrap after each "/", never inside a name. */
function breakable(path) {
  return path.split("/").flatMap((part, i) => (i ? ["/", h("wbr"), part] : [part]));
}
