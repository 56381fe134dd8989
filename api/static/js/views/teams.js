// #/teams (the admin key only): teams with their limits, and each team's keys. A new key's secret is
// shown once, here, as the API returns it; the service keeps only its hash.

import { api, listAll } from "../api.js";
import { card, errorBox, fill, h, table } from "../dom.js";
import { bytes, dateTime } from "../format.js";

export function teamsView(main) {
  const list = h("div", { id: "teams" }, h("p", { class: "muted" }, "Loading…"));
  const keys = h("div", { id: "keys" });
  const create = createForm(() => load());
  fill(main, h("div", { class: "page-head" }, h("h1", {}, "Teams")), card("New team", create), card("Teams", list), keys);

  async function load() {
    try {
      const teams = await listAll("/v1/admin/teams", 1000);
      fill(list, table([
        { title: "Name", cell: (t) => h("button", { type: "button", class: "link", onclick: () => showKeys(keys, t) }, t.name) },
        { title: "Id", cell: (t) => h("span", { class: "mono" }, t.id) },
        { title: "Max running", class: "right", cell: (t) => limit(t.max_running_jobs) },
        { title: "Max queued", class: "right", cell: (t) => limit(t.max_queued_jobs) },
        { title: "Storage limit", class: "right", cell: (t) => (t.max_storage_bytes === null ? "none" : bytes(t.max_storage_bytes)) },
        { title: "Created", cell: (t) => dateTime(t.created_at) },
        { title: "", class: "right", cell: (t) => (t.name === "default" ? "" : h("button", { type: "button", class: "danger small",
          onclick: async (e) => {
            if (!confirm(`Delete team ${t.name}? Its keys stop working at once.`)) return;
            try { await api(`/v1/admin/teams/${t.id}`, { method: "DELETE" }); fill(keys); load(); }
            catch (err) { e.target.replaceWith(errorBox(err)); }
          } }, "Delete")) },
      ], teams));
    } catch (err) {
      fill(list, errorBox(err));
    }
  }
  load();
}

function limit(n) { return n === null ? "none" : String(n); }

function createForm(done) {
  const name = h("input", { id: "team-name", placeholder: "nlp", autocomplete: "off" });
  const running = h("input", { id: "team-running", placeholder: "none", inputmode: "numeric" });
  const queued = h("input", { id: "team-queued", placeholder: "none", inputmode: "numeric" });
  const problem = h("div", { class: "field-error" });
  return h("form", { class: "inline-form", onsubmit: async (e) => {
    e.preventDefault();
    problem.textContent = "";
    const body = { name: name.value.trim() };
    if (running.value.trim()) body.max_running_jobs = Number(running.value);
    if (queued.value.trim()) body.max_queued_jobs = Number(queued.value);
    try {
      await api("/v1/admin/teams", { method: "POST", json: body });
      name.value = running.value = queued.value = "";
      done();
    } catch (err) {
      problem.textContent = err.param ? `${err.param}: ${err.message}` : err.message;
    }
  } },
  h("label", {}, "Name ", name), h("label", {}, "Max running jobs ", running), h("label", {}, "Max queued jobs ", queued),
  h("button", { type: "submit", class: "primary" }, "Create team"), problem);
}

async function showKeys(el, team) {
  const secret = h("div", { id: "new-key" });
  const label = h("input", { placeholder: "label, e.g. ci", autocomplete: "off" });
  const body = h("div");
  fill(el, card(`Keys of ${team.name}`, h("form", { class: "inline-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const key = await api(`/v1/admin/teams/${team.id}/keys`, { method: "POST", json: label.value ? { name: label.value } : {} });
      const value = h("input", { class: "mono secret", readonly: true, value: key.key, onfocus: (ev) => ev.target.select() });
      fill(secret, h("div", { class: "notice" }, "The new key, shown only now: copy it and give it to the team. ", value));
      label.value = "";
      render();
    } catch (err) {
      fill(secret, errorBox(err));
    }
  } }, label, h("button", { type: "submit", class: "primary" }, "New key")), secret, body));

  async function render() {
    try {
      const keys = await api(`/v1/admin/teams/${team.id}/keys`);
      fill(body, table([
        { title: "Key", cell: (k) => h("span", { class: "mono" }, k.hint) },
        { title: "Label", cell: (k) => k.name || "" },
        { title: "Created", cell: (k) => dateTime(k.created_at) },
        { title: "Revoked", cell: (k) => dateTime(k.revoked_at) },
        { title: "", class: "right", cell: (k) => (k.revoked_at ? "" : h("button", { type: "button", class: "danger small",
          onclick: async () => { await api(`/v1/admin/teams/${team.id}/keys/${k.id}`, { method: "DELETE" }); render(); } }, "Revoke")) },
      ], keys.data, { empty: "No keys yet." }));
    } catch (err) {
      fill(body, errorBox(err));
    }
  }
  render();
}
