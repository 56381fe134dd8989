// The pre-flight report (POST /v1/fine_tuning/jobs/preflight) as the new-job form shows it, compact: the
// warnings first, then the data as the trainer will see it, the estimate per GPU type and the queue. And
// a job's estimate beside what its run measured, for the job view.

import { h, table } from "../dom.js";
import { bytes, dateTime, duration, num } from "../format.js";

const FILES = [["training_file", "Training"], ["validation_file", "Validation"]];

/** The report's nodes, to put in the form's report section. */
export function preflightReport(report) {
  const data = report.data || {};
  const files = FILES.filter(([key]) => data[key]).map(([key, label]) => [label, data[key]]);
  return [
    h("h2", {}, "Pre-flight check ", h("span", { class: "muted mono" }, `${report.id} · nothing queued`)),
    warningList(report.warnings || []),
    h("div", { class: "preflight-body" },
      h("div", {}, h("h3", {}, "Data, tokenized as the trainer will"), dataTable(files)),
      h("div", {}, report.estimate ? estimateBlock(report.estimate) : null, report.queue ? queueBlock(report.queue) : null)),
  ];
}

function warningList(warnings) {
  if (!warnings.length) return h("div", { class: "notice", id: "preflight-warnings" }, "No warnings: the data looks as it should.");
  return h("div", { class: "preflight-warnings", id: "preflight-warnings", role: "alert" },
    warnings.map((w) => h("div", { class: "preflight-warning", dataset: { code: w.code } },
      h("div", {}, h("strong", {}, w.code), " ",
        h("span", { class: "muted" }, `${num(w.count)} in ${w.param}${w.lines?.length ? ` · line${w.lines.length > 1 ? "s" : ""} ${w.lines.join(", ")}${w.count > w.lines.length ? ", …" : ""}` : ""}`)),
      h("div", {}, w.message))));
}

// A row per finding, a column per file; a finding no file has (groups, overlap, unpaired bias) is left out.
function dataTable(files) {
  const parts = [...new Set(files.flatMap(([, f]) => Object.keys(f.lengths || {})))];
  const rows = [
    ["Rows", (f) => num(f.rows)], ["Used", (f) => num(f.rows_used)], ["Dropped (cannot fit)", (f) => num(f.rows_dropped)],
    ["Truncated", (f) => `${num(f.rows_truncated)} (${num(f.truncated_tokens)} tokens cut)`],
    ["Tokens, one epoch", (f) => num(f.tokens?.total)], ["Longest sequence", (f) => num(f.tokens?.longest_sequence)],
    ...parts.map((part) => [`${part[0].toUpperCase()}${part.slice(1)} tokens p50/p90/p99/max`, (f) => percentiles(f.lengths?.[part])]),
    ["Duplicate pairs", (f) => num(f.duplicate_pairs)], ["Chosen = rejected", (f) => num(f.identical_pairs)],
    ["Chosen longer", (f) => f.length_bias
      ? `${Math.round(100 * f.length_bias.chosen_longer_share)}% (mean ${signed(f.length_bias.mean_difference_tokens)} tokens)` : null],
    ["Groups", (f) => (f.groups ? Object.entries(f.groups).map(([g, n]) => `${g} ${num(n)}`).join(", ") : null)],
    ["Prompts also in training", (f) => (f.overlap_with_training === undefined ? null : num(f.overlap_with_training))],
  ].map(([name, cell]) => [name, files.map(([, f]) => cell(f))]).filter(([, cells]) => cells.some((c) => c !== null && c !== ""));
  return table([{ title: "", cell: (r) => r[0] },
    ...files.map(([label], i) => ({ title: label, class: "right", cell: (r) => r[1][i] ?? "—" }))], rows);
}

function percentiles(p) {
  return p ? `${p.p50} / ${p.p90} / ${p.p99} / ${p.max}` : null;
}

function signed(x) {
  return `${x >= 0 ? "+" : ""}${num(Math.round(x * 10) / 10)}`;
}

function estimateBlock(e) {
  const memory = e.memory || {};
  const breakdown = Object.entries(memory.breakdown || {}).filter(([k]) => k !== "total").map(([k, v]) => `${k} ${bytes(v)}`).join(", ");
  return h("div", { id: "preflight-estimate" },
    h("h3", {}, "Estimate"),
    h("p", {}, `${num(e.steps)} steps · ${num(e.epochs)} epoch${e.epochs === 1 ? "" : "s"} · ${num(e.tokens)} tokens · `,
      `${num(e.parameters)} parameters (${num(e.trainable_parameters)} trainable) · ${flops(e.flops?.total)} FLOPs`,
      h("span", { class: "muted" }, ` (policy ${flops(e.flops?.policy)}, reference ${flops(e.flops?.reference)})`)),
    memory.total ? h("p", {}, h("strong", {}, `${bytes(memory.total)} peak memory on ${memory.device}`),
      ` at micro batch ${memory.micro_batch_size}, ${planText(memory)}, ${memory.precision}; each GPU type's peak and plan are in the table`,
      h("br"), h("span", { class: "muted" }, breakdown)) : null,
    table([
      { title: "GPU type", cell: (r) => r.gpu_type },
      { title: "Workers", class: "right", cell: (r) => `${r.workers}${r.gpus ? ` × ${r.gpus} GPU${r.gpus === 1 ? "" : "s"}` : ""}` },
      { title: "Fits", cell: (r) => fits(r) },
      { title: "Memory plan", cell: (r) => r.plan ? `micro batch ${num(r.plan.micro_batch_size)}, ${planText(r.plan)}` : h("span", { class: "muted" }, r.plan_note || "—") },
      { title: "Largest micro batch", class: "right", cell: (r) => num(r.largest_micro_batch_size) || "—" },
      { title: "Time", class: "right", cell: (r) => trainingTime(r.seconds) },
      { title: "Basis", cell: (r) => basis(r) },
    ], e.by_gpu_type || [], { empty: "No workers in the pool to estimate a time for.", rowAttrs: (r) => ({ dataset: { gpuType: r.gpu_type } }) }));
}

/** The checkpointed decoder layers of a memory plan (or of the spec, without one). */
function planText(plan) {
  const layers = plan.checkpointed_layers ? `${plan.checkpointed_layers} of ${plan.layers} layers checkpointed` : "no checkpointing";
  return plan.planned === false ? `${layers} (no plan: device memory not reported)` : layers;
}

function flops(x) {
  return typeof x === "number" ? x.toExponential(2).replace("e+", "e") : "?";
}

/** Whether the job's peak fits one device of the type: the peak beside the device's memory. */
function fits(row) {
  const peak = bytes(row.peak_memory_bytes);
  if (row.fits === null || row.fits === undefined) return h("span", { class: "muted" }, `unknown: ${peak} peak, device memory not reported`);
  const of = `${peak} of ${bytes(row.memory_bytes)}`;
  return row.fits ? h("span", { class: "ok-text" }, `yes: ${of}`) : h("strong", { class: "error-text" }, `no: ${of}`);
}

/** Where a time comes from: the jobs that calibrated it (and the MFU they reached), or the FLOPs model and the MFU it assumes. */
function basis(row) {
  if (row.basis === "calibrated") {
    const jobs = [...(row.calibrated_by || [])];
    if (row.other_jobs) jobs.push(`${row.other_jobs} job${row.other_jobs > 1 ? "s" : ""} of other teams`);
    return `calibrated by ${jobs.join(", ") || "past jobs"}${row.mfu ? ` (${Math.round(100 * row.mfu)}% MFU)` : ""}`;
  }
  if (row.mfu !== null && row.mfu !== undefined) return `FLOPs model at ${Math.round(100 * row.mfu)}% MFU`;
  return row.flops_per_s ? `FLOPs model at ${Math.round(row.flops_per_s / 1e9)} GFLOP/s` : "FLOPs model";
}

function queueBlock(q) {
  let start = "no start estimate";
  if (q.estimated_start_in_s !== null && q.estimated_start_in_s !== undefined) {
    start = q.estimated_start_in_s <= 0 ? "would start now"
      : `would start in about ${duration(q.estimated_start_in_s)}${q.estimated_start_at ? ` (${dateTime(q.estimated_start_at)})` : ""}`;
  }
  return h("div", { id: "preflight-queue" }, h("h3", {}, "Queue"),
    h("p", {}, `Position ${q.position}`, q.jobs_ahead === null || q.jobs_ahead === undefined ? "" : `, ${q.jobs_ahead} job${q.jobs_ahead === 1 ? "" : "s"} ahead`,
      `; ${start}`,
      q.reason ? h("span", { class: "muted" }, ` · ${q.reason}`) : null));
}

/** Summary items of a job: what its pre-flight expected, and what the run measured beside it. */
export function estimateItems(job) {
  const e = job.estimate, a = job.actual, items = [];
  if (e) {
    items.push(["Estimate", h("span", { id: "estimate", title: `${e.preflight_id} on ${e.gpu_type}` },
      `${trainingTime(e.seconds)} · ${bytes(e.peak_memory_bytes)} peak`)]);
  }
  if (a) {
    items.push(["Actual", h("span", { id: "actual", title: `${num(a.tokens_per_s)} tokens/s, ${num(a.steps)} steps, ${num(a.tokens)} tokens` },
      `${trainingTime(a.train_seconds)}${versus(a.train_seconds, e?.seconds)} · `,
      `${bytes(a.peak_memory_bytes)}${versus(a.peak_memory_bytes, e?.peak_memory_bytes)} peak (${a.memory_kind})`)]);
  }
  return items;
}

/** How far the run was from the estimate: +10% within a factor of two, else the factor (3.5×). */
function versus(actual, expected) {
  if (!actual || !expected) return "";
  const ratio = actual / expected;
  if (ratio < 0.5 || ratio > 2) return ` (${num(ratio, 3)}× the estimate)`;
  const pct = Math.round(100 * (ratio - 1));
  return ` (${pct >= 0 ? "+" : ""}${pct}%)`;
}

/** A training time, estimated or measured: under 10 s to two digits (0.011s, 4.5s), so that a tiny run
 *  compares with its estimate; longer ones as durations. */
function trainingTime(seconds) {
  return seconds < 10 ? `${Number(seconds.toPrecision(2))}s` : duration(seconds);
}
