// Live charts of a job's metrics (uPlot, vendored in /static/vendor/uplot). Training and evaluation
// records share the step axis; evaluation series are dashed with their points marked; the training's
// diagnostics (warnings with a code and a step) are dashed vertical lines at their step, labelled.

import { h } from "./dom.js";
import { num } from "./format.js";

const HEIGHT = 170;
// Steps are whole numbers: ticks at 1, 2, 5, 10, 20, 50, ... apart, never at 2.5.
const STEP_INCRS = Array.from({ length: 24 }, (_, i) => [1, 2, 5][i % 3] * 10 ** Math.floor(i / 3));

/** A tick label: short, and never wider than the axis (5e-4, not 0.00050000). */
function tick(t) {
  if (t === 0) return "0";
  const a = Math.abs(t);
  return a < 1e-3 || a >= 1e6 ? t.toExponential(0).replace("e+", "e") : String(Number(t.toPrecision(3)));
}

const WARN = "#b7791f";  // app.css --warn

/** uPlot draw hook: a dashed line and the code at each warning's step that falls within the x range. */
function drawMarks(u, marks) {
  const { ctx } = u, { top, height } = u.bbox;
  ctx.save();
  ctx.strokeStyle = WARN;
  ctx.fillStyle = WARN;
  ctx.setLineDash([4, 3]);
  ctx.font = `${10 * devicePixelRatio}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  marks.forEach((m, i) => {
    if (m.step < u.scales.x.min || m.step > u.scales.x.max) return;
    const x = Math.round(u.valToPos(m.step, "x", true));
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, top + height);
    ctx.stroke();
    const pad = 3 * devicePixelRatio, room = u.bbox.left + u.bbox.width - x;
    const right = ctx.measureText(m.code).width + pad > room;  // near the right edge: the label goes left
    ctx.textAlign = right ? "right" : "left";
    // Labels take turns on two rows, so those of nearby steps do not overlap.
    ctx.fillText(m.code, right ? x - pad : x + pad, top + (2 + (i % 2) * 12) * devicePixelRatio);
  });
  ctx.restore();
}

const BLUE = "#2f5bd3", ORANGE = "#e8590c", GREEN = "#2b8a3e", RED = "#c92a2a", VIOLET = "#7048e8";

// What the trainer records (dpo_core.trainer._log, dpo_core.step.evaluate): `eval_` prefixes evaluations.
export const JOB_CHARTS = [
  { id: "loss", title: "Loss", series: [
    { key: "loss", label: "train", color: BLUE }, { key: "eval_loss", label: "eval", color: ORANGE, eval: true }] },
  { id: "accuracy", title: "Reward accuracy", series: [
    { key: "rewards/accuracies", label: "train", color: BLUE },
    { key: "eval_rewards/accuracies", label: "eval", color: ORANGE, eval: true }] },
  { id: "margin", title: "Reward margin", series: [
    { key: "rewards/margins", label: "train", color: BLUE },
    { key: "eval_rewards/margins", label: "eval", color: ORANGE, eval: true }] },
  { id: "rewards", title: "Chosen and rejected rewards", series: [
    { key: "rewards/chosen", label: "chosen", color: GREEN }, { key: "rewards/rejected", label: "rejected", color: RED },
    { key: "eval_rewards/chosen", label: "eval chosen", color: GREEN, eval: true },
    { key: "eval_rewards/rejected", label: "eval rejected", color: RED, eval: true }] },
  { id: "lr", title: "Learning rate", series: [{ key: "learning_rate", label: "learning rate", color: VIOLET }] },
  { id: "throughput", title: "Tokens/s", series: [{ key: "tokens_per_s", label: "tokens/s", color: GREEN }] },
];

/** A job's metrics records by step: the latest record of a step wins (a resumed run logs it again). */
export class MetricStore {
  constructor() { this.train = new Map(); this.eval = new Map(); this.version = 0; }

  add(record) {
    if (typeof record?.step !== "number") return;
    const isEval = Object.keys(record).some((k) => k.startsWith("eval_"));
    (isEval ? this.eval : this.train).set(record.step, record);
    this.version++;
  }

  /** uPlot's data for `series`: the steps where any has a value, then each series (null: no value). */
  columns(series) {
    const steps = new Set();
    const sources = series.map((s) => (s.eval ? this.eval : this.train));
    series.forEach((s, i) => {
      for (const [step, r] of sources[i]) if (typeof r[s.key] === "number") steps.add(step);
    });
    const xs = [...steps].sort((a, b) => a - b);
    return [xs, ...series.map((s, i) => xs.map((x) => {
      const v = sources[i].get(x)?.[s.key];
      return typeof v === "number" && Number.isFinite(v) ? v : null;
    }))];
  }
}

export class MetricChart {
  constructor(def, syncKey) {
    this.def = def;
    this.body = h("div", { class: "chart-body" });
    this.empty = h("div", { class: "chart-empty" }, "No data yet");
    this.el = h("div", { class: "chart", dataset: { chart: def.id, points: "0" } },
      h("h3", {}, def.title), this.body, this.empty);
    this.syncKey = syncKey;
    this.plot = null;
    this.marks = [];
  }

  /** The job's warnings to mark ({code, step}); redrawn at once. */
  setMarks(marks) {
    this.marks = marks.filter((m) => typeof m.step === "number");
    this.el.dataset.marks = String(this.marks.length);
    this.plot?.redraw(false, false);
  }

  /** A finished job's empty chart will stay empty: say so. */
  finished(done) {
    this.empty.textContent = done ? "No data recorded" : "No data yet";
  }

  /** Draw the store's data; the chart is made on first use, when its element is in the page. */
  update(store) {
    const data = store.columns(this.def.series);
    const points = data.slice(1).reduce((n, col) => n + col.filter((v) => v !== null).length, 0);
    this.el.dataset.points = String(points);
    this.empty.hidden = points > 0;
    if (!this.plot) this.create(data);
    else this.plot.setData(data);
    if (this.plot.cursor.left < 0 && data[0].length) this.plot.setLegend({ idx: data[0].length - 1 });  // the latest values
  }

  create(data) {
    const width = Math.max(this.body.clientWidth, 200);
    const axis = { stroke: "#5c6370", grid: { stroke: "#eceef2" }, ticks: { stroke: "#eceef2" } };
    this.plot = new window.uPlot({
      width, height: HEIGHT,
      cursor: { sync: { key: this.syncKey }, points: { size: 6 } },
      scales: { x: { time: false } },
      hooks: { draw: [(u) => drawMarks(u, this.marks)] },
      legend: { live: true },
      axes: [{ ...axis, label: "step", labelSize: 18, size: 32, incrs: STEP_INCRS },
             { ...axis, size: 56, values: (_, ticks) => ticks.map(tick) }],
      series: [
        { label: "step", value: (_, v) => (v === null ? "" : v) },
        ...this.def.series.map((s) => ({
          label: s.label, stroke: s.color, width: s.eval ? 1.5 : 2, dash: s.eval ? [6, 4] : undefined,
          spanGaps: true, points: { show: s.eval ? true : undefined, size: 5, fill: s.color },
          value: (_, v) => (v === null ? "" : num(v)),
        })),
      ],
    }, data, this.body);
    this.resizer = new ResizeObserver(() => {
      const w = Math.max(this.body.clientWidth, 200);
      if (w !== this.plot.width) this.plot.setSize({ width: w, height: HEIGHT });
    });
    this.resizer.observe(this.body);
  }

  destroy() {
    this.resizer?.disconnect();
    this.plot?.destroy();
  }
}

/** A bar chart of one series over time (x in Unix seconds): the usage view's GPU-seconds. */
export function timeBars(container, xs, ys, label, color = BLUE) {
  const width = Math.max(container.clientWidth, 300);
  const bars = window.uPlot.paths.bars({ size: [0.7, 60] });
  const axis = { stroke: "#5c6370", grid: { stroke: "#eceef2" }, ticks: { stroke: "#eceef2" } };
  const plot = new window.uPlot({
    width, height: 260,
    scales: { x: { time: true }, y: { range: (_, min, max) => [0, Math.max(max * 1.1, 1)] } },
    axes: [axis, { ...axis, size: 64, values: (_, ticks) => ticks.map(tick) }],
    series: [{}, { label, stroke: color, fill: `${color}55`, paths: bars, points: { show: false },
                   value: (_, v) => (v === null ? "" : num(v)) }],
  }, [xs, ys], container);
  const resizer = new ResizeObserver(() => plot.setSize({ width: Math.max(container.clientWidth, 300), height: 260 }));
  resizer.observe(container);
  return { plot, destroy: () => { resizer.disconnect(); plot.destroy(); } };
}
