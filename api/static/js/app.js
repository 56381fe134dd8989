// The dashboard's shell: sign-in, the top bar and the hash routes (#/jobs, #/jobs/ID, #/new, #/pool,
// #/usage, #/teams). Each view is a function (main, params) -> optional cleanup, called when its route
// is shown; the cleanup stops its polling and streams when the user leaves it.

import { session, signIn, whenSignedOut } from "./api.js";
import { errorBox, fill, h } from "./dom.js";
import { jobsView } from "./views/jobs.js";
import { jobView } from "./views/job.js";
import { newJobView } from "./views/new.js";
import { poolView } from "./views/pool.js";
import { teamsView } from "./views/teams.js";
import { usageView } from "./views/usage.js";

const main = document.getElementById("main");
let cleanup = null;

const ROUTES = [
  [/^#\/jobs\/([\w-]+)$/, jobView, "jobs"],
  [/^#\/jobs(?:\?status=(\w+))?$/, jobsView, "jobs"],
  [/^#\/new$/, newJobView, "new"],
  [/^#\/pool$/, poolView, "pool"],
  [/^#\/usage$/, usageView, "usage"],
  [/^#\/teams$/, teamsView, "teams"],
];

function route() {
  cleanup?.();
  cleanup = null;
  if (!session.key || !session.team) return showSignIn();
  const hash = location.hash || "#/jobs";
  const found = ROUTES.find(([re]) => re.test(hash));
  if (!found) {
    location.replace("#/jobs");
    return;
  }
  const [re, view, nav] = found;
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
  fill(main);
  try {
    cleanup = view(main, re.exec(hash).slice(1)) || null;
  } catch (err) {
    fill(main, errorBox(err));
  }
}

function showChrome(signedIn) {
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("who").hidden = !signedIn;
  document.querySelector("[data-admin]").hidden = !(signedIn && session.admin);
  document.getElementById("who-name").textContent = signedIn
    ? (session.admin ? `admin (team ${session.team})` : `team ${session.team}`) : "";
}

function showSignIn(message) {
  showChrome(false);
  const input = h("input", { type: "password", id: "key", name: "key", autocomplete: "off", required: true,
                             placeholder: "dpo-sk-… or the admin key", spellcheck: "false" });
  const problem = h("div", { class: "field-error", id: "sign-in-error" }, message || "");
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h("form", { class: "sign-in card", onsubmit: async (e) => {
    e.preventDefault();
    button.disabled = true;
    problem.textContent = "";
    try {
      await signIn(input.value.trim());
      showChrome(true);
      route();
    } catch (err) {
      problem.textContent = err.status === 401 ? "This key is not valid: check it and paste it again." : err.message;
    } finally {
      button.disabled = false;
    }
  } },
  h("h1", {}, "Sign in"),
  h("p", { class: "muted" }, "Paste your team's API key (or the admin key). It stays in this browser tab only, and is forgotten when the tab closes."),
  h("label", { for: "key" }, "API key"), input, problem, button);
  fill(main, form);
  input.focus();
}

async function start() {
  whenSignedOut((message) => { cleanup?.(); cleanup = null; session.team = null; showSignIn(message); });
  document.getElementById("sign-out").addEventListener("click", () => {
    session.key = null;
    session.team = null;
    cleanup?.();
    cleanup = null;
    showSignIn();
  });
  window.addEventListener("hashchange", route);
  if (session.key) {
    try {
      await signIn(session.key);  // a reload: the key is still in this tab
      showChrome(true);
    } catch (err) {
      return showSignIn(err.message);
    }
  }
  route();
}

start();
