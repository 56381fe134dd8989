// The job page's Samples panel: per prompt, the reference's completion (step 0) beside the policy's at the
// latest sampling step (or one the user picks), with their lengths, implicit rewards and reward-model scores,
// and the step's summary (mean lengths, win rate). Completions are model output: they go in as text only.

import { api } from "../api.js";
import { errorBox, fill, h } from "../dom.js";
import { num } from "../format.js";

const LATEST = "";

export class SamplesPanel {
  /** `ended`: whether the job has ended (then no samples means none will come). */
  constructor(jobId, signal, ended) {
    Object.assign(this, { jobId, signal, ended, loading: null, again: false });
    this.picked = LATEST;  // a step the user chose stays shown; LATEST follows new sampling steps
    this.select = h("select", { id: "samples-step", "aria-label": "Sampling step",
                                onchange: () => { this.picked = this.select.value; this.load(); } });
    this.head = h("div", { class: "samples-head" });
    this.body = h("div", { id: "samples-list" });
    this.el = h("div", { id: "samples" }, this.head, this.body);
  }

  /** Fetch the chosen step's samples; a call while one is in flight fetches once more after it. */
  async load() {
    if (this.loading) { this.again = true; return this.loading; }
    this.loading = this.fetchAndShow();
    try { await this.loading; } finally { this.loading = null; }
    if (this.again && !this.signal.aborted) { this.again = false; return this.load(); }
  }

  async fetchAndShow() {
    const query = this.picked === LATEST ? "" : `?step=${encodeURIComponent(this.picked)}`;
    try {
      const samples = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(this.jobId)}/samples${query}`,
                                { signal: this.signal });
      this.show(samples);
    } catch (err) {
      if (this.signal.aborted) return;
      if (err.status === 404 && this.picked !== LATEST) {  // that step's samples are gone (the job was deleted)
        this.picked = LATEST;
        this.again = true;
      }
      fill(this.body, errorBox(err));
    }
  }

  show(samples) {
    this.el.dataset.step = samples.step ?? "";
    this.el.dataset.steps = samples.steps.join(",");
    fill(this.select, h("option", { value: LATEST }, "latest"),
      samples.steps.map((s) => h("option", { value: String(s), selected: String(s) === this.picked }, `step ${s}`)));
    fill(this.head, h("label", { class: "inline" }, "Step ", this.select), summaryLine(samples));
    if (samples.step === null) {
      const why = this.ended() ? "None: the run made none, or they were deleted with the job's files."
        : "None yet: the reference's come at step 0.";
      return fill(this.body, h("p", { class: "muted" }, why));
    }
    fill(this.body, samples.data.map((p, i) => promptBlock(p, i, samples.step)));
  }
}

/** The step's figures: the completions' mean lengths, and the win rate with a reward model. */
function summaryLine(samples) {
  const s = samples.summary || {};
  const parts = [];
  if (samples.step !== null) parts.push(`step ${samples.step}`);
  if (s["samples/length"] !== undefined) parts.push(`mean length ${num(s["samples/length"])} tokens`);
  if (s["samples/reference_length"] !== undefined) parts.push(`the reference's ${num(s["samples/reference_length"])}`);
  if (s["samples/win_rate"] !== undefined) parts.push(`win rate ${num(s["samples/win_rate"])} against the reference`);
  return h("span", { class: "muted", id: "samples-summary" }, parts.join(" · "));
}

function promptBlock(prompt, index, step) {
  return h("div", { class: "sample", dataset: { prompt: String(index) } },
    h("div", { class: "sample-prompt" }, h("span", { class: "k" }, "Prompt"), h("pre", {}, prompt.prompt)),
    h("div", { class: "sample-pair" },
      completion("Reference (step 0)", prompt.reference, "reference"),
      completion(step === 0 ? "Policy (step 0: the reference)" : `Policy (step ${step})`, prompt.policy, "policy")));
}

function completion(title, c, who) {
  const figures = [`${c.tokens} tokens`, `reward ${num(c.reward)}`];
  if (c.score !== null && c.score !== undefined) figures.push(`score ${num(c.score)}`);
  return h("div", { class: `sample-completion ${who}`, dataset: { who } },
    h("div", { class: "k" }, title, h("span", { class: "muted" }, ` · ${figures.join(" · ")}`)),
    h("pre", {}, c.text));
}
