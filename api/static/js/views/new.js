// #/new: start a job. Pick or upload the training (and validation) file, choose the model, then either
// the main settings or a pasted dpo-train YAML spec. The API checks the whole request at once; each
// problem it names (error.problems: param, message) is shown under the field it is about. "Check" sends
// the same body to the pre-flight route and shows its report above the buttons; nothing is queued.

import { api, ApiError } from "../api.js";
import { card, fill, h } from "../dom.js";
import { num } from "../format.js";
import { preflightReport } from "./preflight.js";
import { dump, load } from "../../vendor/js-yaml/js-yaml.esm.min.js";

const LOSSES = ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"];
// Fields of the settings form: the request parameter each sets (training.* of a TrainingSpec, as
// docs/api.md lists them); empty ones are left out, so the service's defaults apply.
const MAIN = [
  { id: "loss-type", label: "Loss", param: "training.loss.type", kind: "select", options: LOSSES },
  { id: "beta", label: "β (beta)", param: "training.loss.beta", kind: "number", hint: "0.1" },
  { id: "learning-rate", label: "Learning rate", param: "training.learning_rate", kind: "number", hint: "5e-6" },
  { id: "batch-size", label: "Batch size (pairs per step)", param: "training.batch_size", kind: "int", hint: "8" },
  { id: "epochs", label: "Epochs", param: "training.num_epochs", kind: "number", hint: "1" },
  { id: "max-steps", label: "Max steps", param: "training.max_steps", kind: "int", hint: "from epochs" },
  { id: "max-length", label: "Max length (tokens)", param: "training.max_length", kind: "int", hint: "1024" },
  { id: "lora-r", label: "LoRA rank", param: "training.lora.r", kind: "int", hint: "none: full fine-tune" },
];
const MORE = [
  { id: "micro-batch-size", label: "Micro batch size", param: "training.micro_batch_size", kind: "int", hint: "batch size" },
  { id: "max-prompt-length", label: "Max prompt length", param: "training.max_prompt_length", kind: "int", hint: "512" },
  { id: "warmup-steps", label: "Warm-up steps", param: "training.warmup_steps", kind: "int", hint: "0" },
  { id: "lr-scheduler", label: "LR schedule", param: "training.lr_scheduler", kind: "select",
    options: ["", "linear", "cosine", "constant"] },
  { id: "precision", label: "Precision", param: "training.precision", kind: "select", options: ["", "fp32", "bf16", "fp16"] },
  { id: "logging-steps", label: "Log every (steps)", param: "training.logging_steps", kind: "int", hint: "10" },
  { id: "eval-steps", label: "Evaluate every (steps)", param: "training.eval_steps", kind: "int", hint: "at the end" },
  { id: "save-steps", label: "Checkpoint every (steps)", param: "training.save_steps", kind: "int", hint: "final only" },
  { id: "seed", label: "Seed", param: "training.seed", kind: "int", hint: "42" },
];
const JOB = [
  { id: "suffix", label: "Suffix", param: "suffix", kind: "text", hint: "optional name" },
  { id: "priority", label: "Priority", param: "priority", kind: "int", hint: "0" },
  { id: "gpu-type", label: "GPU type", param: "gpu_type", kind: "text", hint: "any" },
];
// Fields of a dpo-train spec that name paths on the machine it runs on: the service sets them.
const PATH_FIELDS = ["train_file", "validation_file", "output_dir", "resume_from"];

export function newJobView(main) {
  const form = new JobForm();
  fill(main, h("div", { class: "page-head" }, h("h1", {}, "New job")), form.el);
  form.loadChoices();
}

class JobForm {
  constructor() {
    this.fields = new Map();  // param -> {input, error}
    this.mode = "form";
    this.train = new FilePicker("training-file", "Training file", "training_file", true, this);
    this.validation = new FilePicker("validation-file", "Validation file (optional)", "validation_file", false, this);
    this.model = this.input({ id: "model", label: "Model", param: "model", kind: "text",
                              hint: "owner/name, or a path under the service's model directories" });
    this.models = h("datalist", { id: "models" });
    this.model.input.setAttribute("list", "models");
    this.yaml = h("textarea", { id: "yaml", rows: 16, spellcheck: "false", dataset: { param: "training" },
      placeholder: "loss:\n  type: sigmoid\n  beta: 0.1\nlearning_rate: 5.0e-6\nmax_steps: 1000\n" });
    this.yamlError = h("div", { class: "field-error", id: "error-yaml" });
    this.general = h("div", { class: "alert", role: "alert", id: "form-error", hidden: true });
    this.submit = h("button", { type: "submit", class: "primary", id: "submit-job" }, "Start job");
    this.check = h("button", { type: "button", class: "secondary", id: "check-job", onclick: () => this.runCheck(),
                               title: "What the data looks like to the trainer, the time and memory per GPU type, and the queue; nothing is queued" },
    "Check");
    this.report = h("section", { class: "card preflight", id: "preflight", hidden: true, "aria-live": "polite" });
    this.staleNote = h("p", { class: "stale-note" }, "The form changed since this check: check again to see its report.");
    this.el = this.build();
  }

  input(def) {
    let input;
    if (def.kind === "select") {
      input = h("select", { id: def.id }, def.options.map((o) => h("option", { value: o }, o || "default")));
    } else if (def.kind === "checkbox") {
      input = h("input", { type: "checkbox", id: def.id });
    } else {
      input = h("input", { id: def.id, type: def.kind === "text" ? "text" : "text", inputmode: def.kind === "text" ? undefined : "decimal",
                           placeholder: def.hint || "", autocomplete: "off", spellcheck: "false" });
    }
    const error = h("div", { class: "field-error", id: `error-${def.id}` });
    const field = { def, input, error, el: h("div", { class: "field", dataset: { param: def.param } },
      h("label", { for: def.id }, def.label), input, error) };
    this.fields.set(def.param, field);
    return field;
  }

  build() {
    const tabs = h("div", { class: "tabs", role: "tablist" },
      h("button", { type: "button", role: "tab", id: "tab-form", class: "active", onclick: () => this.setMode("form") }, "Settings"),
      h("button", { type: "button", role: "tab", id: "tab-yaml", onclick: () => this.setMode("yaml") }, "YAML spec"));
    this.formPane = h("div", { class: "pane" },
      h("div", { class: "grid" }, MAIN.map((d) => this.input(d).el)),
      h("details", {}, h("summary", {}, "More settings"), h("div", { class: "grid" }, MORE.map((d) => this.input(d).el))));
    this.yamlPane = h("div", { class: "pane", hidden: true },
      h("p", { class: "muted" }, "The same YAML as dpo-train takes (docs/training.md). ",
        "train_file, validation_file and output_dir are set by the service from the files chosen above; model comes from the Model field when it is filled."),
      h("label", { for: "yaml" }, "Spec"), this.yaml, this.yamlError);
    return h("form", { class: "job-form", novalidate: true, onsubmit: (e) => { e.preventDefault(); this.send(); },
                       oninput: () => this.reportStale(), onchange: () => this.reportStale() },
      card("Data", h("div", { class: "grid two" }, this.train.el, this.validation.el)),
      card("Model", this.model.el, this.models),
      card("Training", tabs, this.formPane, this.yamlPane),
      card("Job", h("div", { class: "grid" }, JOB.map((d) => this.input(d).el))),
      this.general, this.report, h("div", { class: "form-actions" }, this.check, this.submit));
  }

  async loadChoices() {
    const [files, jobs] = await Promise.all([
      api("/v1/files?purpose=fine-tune&limit=100").catch(() => ({ data: [] })),
      api("/v1/fine_tuning/jobs?limit=100").catch(() => ({ data: [] })),
    ]);
    this.train.setFiles(files.data);
    this.validation.setFiles(files.data);
    fill(this.models, [...new Set(jobs.data.map((j) => j.model))].map((m) => h("option", { value: m })));
  }

  setMode(mode) {
    if (mode === "yaml" && !this.yaml.value.trim()) {
      const training = this.training();
      if (Object.keys(training).length) this.yaml.value = dump(training);
    }
    this.mode = mode;
    this.formPane.hidden = mode !== "form";
    this.yamlPane.hidden = mode !== "yaml";
    document.getElementById("tab-form").classList.toggle("active", mode === "form");
    document.getElementById("tab-yaml").classList.toggle("active", mode === "yaml");
  }

  /** The settings form as a `training` object: only the fields filled in. */
  training() {
    const training = {};
    for (const def of [...MAIN, ...MORE]) {
      const value = this.value(this.fields.get(def.param));
      if (value !== undefined) setPath(training, def.param.replace(/^training\./, ""), value);
    }
    return training;
  }

  value(field) {
    const raw = field.input.value.trim();
    if (raw === "") return undefined;
    if (field.def.kind === "text" || field.def.kind === "select") return raw;
    const n = Number(raw);
    return Number.isFinite(n) ? n : raw;  // not a number: sent as typed, so the service names the problem
  }

  /** The request body, or null when the YAML cannot be read (the problem is shown under it). */
  body() {
    const body = { model: this.model.input.value.trim(), training_file: this.train.value() };
    const validation = this.validation.value();
    if (validation) body.validation_file = validation;
    for (const def of JOB) {
      const value = this.value(this.fields.get(def.param));
      if (value !== undefined) body[def.param] = value;
    }
    const training = this.mode === "yaml" ? this.yamlTraining(body) : this.training();
    if (training === null) return null;
    if (Object.keys(training).length) body.training = training;
    return body;
  }

  yamlTraining(body) {
    let spec;
    try {
      spec = this.yaml.value.trim() ? load(this.yaml.value) : {};
    } catch (err) {
      this.yamlError.textContent = `not valid YAML: ${err.message}`;
      return null;
    }
    if (spec === null || typeof spec !== "object" || Array.isArray(spec)) {
      this.yamlError.textContent = "the spec must be a YAML mapping of TrainingSpec fields (loss:, learning_rate:, ...)";
      return null;
    }
    const { model, ...training } = spec;
    if (!body.model && typeof model === "string") body.model = model;
    for (const name of PATH_FIELDS) delete training[name];
    return training;
  }

  clearErrors() {
    for (const f of this.fields.values()) { f.error.textContent = ""; f.input.removeAttribute("aria-invalid"); }
    for (const p of [this.train, this.validation]) p.setError("");
    this.yamlError.textContent = "";
    this.general.hidden = true;
  }

  /** The request body, or null after showing what is missing or unreadable under its field. */
  checkedBody() {
    this.clearErrors();
    const body = this.body();
    if (!body) return null;
    const missing = [];
    if (!body.training_file) missing.push(["training_file", "choose or upload a training file"]);
    if (!body.model) missing.push(["model", "give the model to train"]);
    if (!missing.length) return body;
    this.showProblems(missing.map(([param, message]) => ({ param, message })));
    return null;
  }

  async send() {
    const body = this.checkedBody();
    if (!body) return;
    await this.request(async () => {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
    });
  }

  /** The pre-flight report of the form as it is; an error hides the last report and shows under its field. */
  async runCheck() {
    const body = this.checkedBody();
    if (!body) return;
    this.check.textContent = "Checking…";
    const ok = await this.request(async () => {
      const report = await api("/v1/fine_tuning/jobs/preflight", { method: "POST", json: body });
      fill(this.report, this.staleNote, preflightReport(report));
      this.report.classList.remove("stale");
      this.report.hidden = false;
      this.report.scrollIntoView({ block: "start" });  // at once: the report is what the user asked for
    });
    if (!ok) this.report.hidden = true;
    this.check.textContent = "Check";
  }

  reportStale() {
    if (!this.report.hidden) this.report.classList.add("stale");
  }

  /** Run one request with both buttons off; its error goes under the fields it names. Whether it went through. */
  async request(fn) {
    this.submit.disabled = this.check.disabled = true;
    try {
      await fn();
      return true;
    } catch (err) {
      if (!(err instanceof ApiError)) this.showProblems([{ param: null, message: `the service did not answer: ${err.message}` }]);
      else this.showProblems(err.problems?.length && err.problems[0].param !== undefined
        ? err.problems : [{ param: err.param, message: err.message }]);
      return false;
    } finally {
      this.submit.disabled = this.check.disabled = false;
    }
  }

  /** Each problem under its field: the field of its parameter, or of the nearest enclosing one. */
  showProblems(problems) {
    const general = [];
    for (const { param, message } of problems) {
      const target = this.target(param);
      if (!target) { general.push(param ? `${param}: ${message}` : message); continue; }
      target.show(param, message);
    }
    this.general.textContent = general.join("\n");
    this.general.hidden = !general.length;
    this.el.querySelector("[aria-invalid], .field-error:not(:empty), #form-error:not([hidden])")
      ?.scrollIntoView({ block: "center", behavior: "smooth" });
  }

  target(param) {
    if (!param) return null;
    if (param === "training_file") return { show: (_, m) => this.train.setError(m) };
    if (param === "validation_file") return { show: (_, m) => this.validation.setError(m) };
    if (this.mode === "yaml" && param.startsWith("training")) {
      return { show: (p, m) => { this.yamlError.textContent += `${this.yamlError.textContent ? "\n" : ""}${p}: ${m}`; } };
    }
    for (let p = param; p; p = p.includes(".") ? p.slice(0, p.lastIndexOf(".")) : "") {
      const field = this.fields.get(p) || this.fields.get(HYPERPARAMETERS[p]);
      if (field) {
        return { show: (_, m) => {
          field.error.textContent += `${field.error.textContent ? "\n" : ""}${m}`;
          field.input.setAttribute("aria-invalid", "true");
        } };
      }
    }
    return null;
  }
}

// The OpenAI hyperparameters name the same settings as these training fields.
const HYPERPARAMETERS = {
  "method.dpo.hyperparameters.beta": "training.loss.beta",
  "method.dpo.hyperparameters.batch_size": "training.batch_size",
  "method.dpo.hyperparameters.n_epochs": "training.num_epochs",
};

function setPath(obj, path, value) {
  const parts = path.split(".");
  let at = obj;
  for (const p of parts.slice(0, -1)) at = at[p] ??= {};
  at[parts.at(-1)] = value;
}

/** A file: one of the team's uploads, or a new upload (validated by the service as it arrives). */
class FilePicker {
  constructor(id, label, param, required, form) {
    this.form = form;
    this.select = h("select", { id, dataset: { param } },
      h("option", { value: "" }, required ? "Choose a file…" : "None"));
    this.upload = h("input", { type: "file", id: `${id}-upload`, accept: ".jsonl,.json,application/jsonl",
                               onchange: () => this.send() });
    this.status = h("div", { class: "upload-status", id: `${id}-status` });
    this.error = h("div", { class: "field-error", id: `error-${id}` });
    this.el = h("div", { class: "field" }, h("label", { for: id }, label), this.select,
      h("div", { class: "upload" }, h("label", { for: `${id}-upload`, class: "muted" }, "or upload a JSONL file: "), this.upload),
      this.status, this.error);
  }

  value() { return this.select.value; }

  setFiles(files) {
    const chosen = this.select.value;
    // A file uploaded while the list was on its way is not in it: its option stays (and stays chosen).
    const listed = new Set(files.map((f) => f.id));
    const uploaded = [...this.select.options].slice(1).filter((o) => !listed.has(o.value));
    fill(this.select, this.select.options[0], files.map((f) => option(f)), uploaded);
    this.select.value = chosen;
  }

  setError(message) {
    this.error.textContent = message;
    message ? this.select.setAttribute("aria-invalid", "true") : this.select.removeAttribute("aria-invalid");
  }

  async send() {
    const file = this.upload.files[0];
    if (!file) return;
    this.setError("");
    this.status.textContent = `Uploading ${file.name}…`;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    try {
      const uploaded = await api("/v1/files", { method: "POST", form });
      for (const picker of [this.form.train, this.form.validation]) picker.select.append(option(uploaded));
      this.select.value = uploaded.id;
      this.status.textContent = `${uploaded.filename}: ${num(uploaded.rows)} rows, ${uploaded.format} format`;
      for (const w of uploaded.warnings || []) this.status.append(h("div", { class: "warn-text" }, w.message));
    } catch (err) {
      this.status.textContent = "";
      const lines = (err.problems || []).filter((p) => p.line).map((p) => `line ${p.line}: ${p.field ? `${p.field}: ` : ""}${p.message}`);
      this.setError(lines.length ? `${file.name} was not stored:\n${lines.join("\n")}` : err.message);
    } finally {
      this.upload.value = "";
    }
  }
}

function option(file) {
  return h("option", { value: file.id }, `${file.filename} · ${num(file.rows)} rows · ${file.id}`);
}
