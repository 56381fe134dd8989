// The REST API, as the signed-in key. The key lives in this tab's sessionStorage only (gone when the tab
// closes) and travels in the Authorization header; it is never put in a URL or in localStorage.

const KEY = "dpo.key";

export class ApiError extends Error {
  constructor(status, body) {
    const e = body?.error || {};
    super(e.message || `the service answered ${status}`);
    this.status = status;
    this.code = e.code || null;
    this.param = e.param || null;
    this.problems = e.problems || null;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
  admin: false,
  team: null,
};

let onSignedOut = () => {};
export function whenSignedOut(fn) { onSignedOut = fn; }

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.key}`, ...extra };
}

/** fetch() as the signed-in key; nothing is kept in the browser's HTTP cache. */
export async function raw(path, { method = "GET", json, form, signal, extraHeaders } = {}) {
  const init = { method, headers: headers(extraHeaders), cache: "no-store", signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form) {
    init.body = form;
  }
  const response = await fetch(path, init);
  if (response.status === 401 && session.team) {  // signed in, and the key stopped working
    session.key = null;
    session.team = null;
    onSignedOut("The key was refused (wrong, revoked or its team deleted). Paste a valid key.");
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch { /* not JSON: a proxy's page */ }
    throw new ApiError(response.status, body);
  }
  return response;
}

export async function api(path, options = {}) {
  const response = await raw(path, options);
  return response.json();
}

/** Every page of a list route, up to `max` items. */
export async function listAll(path, max = 500) {
  const items = [];
  let after = null;
  while (items.length < max) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.last_id) break;
    after = page.last_id;
  }
  return items;
}

/** Check a key and learn who it is: the team it belongs to, and whether it is the admin key. */
export async function signIn(key) {
  session.key = key;
  session.team = null;
  try {
    const usage = await api("/v1/usage");
    session.team = usage.team;
    try {
      await api("/v1/admin/teams?limit=1");
      session.admin = true;
    } catch (err) {
      if (err.status !== 403) throw err;
      session.admin = false;
    }
  } catch (err) {
    session.key = null;
    throw err;
  }
}

/**
 * Save a download (`path`: a content route). Where the service hands out a link that needs no key (an
 * object store's presigned URL), the browser saves what it points to: the bytes never pass through this
 * page, and the store needs no CORS rule (no script reads them). Otherwise fetched with the key and saved
 * from memory. Resolves to "link" or "fetched".
 */
export async function download(path, filename, onProgress) {
  const link = await downloadLink(path);
  if (link) {
    save(link.url, filename);
    return "link";
  }
  const response = await raw(path);
  const total = Number(response.headers.get("Content-Length")) || null;
  const reader = response.body.getReader();
  const parts = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    received += value.length;
    onProgress?.(received, total);
  }
  const url = URL.createObjectURL(new Blob(parts, { type: response.headers.get("Content-Type") || "" }));
  save(url, filename);
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return "fetched";
}

/** The content's download link, or null where the service streams downloads itself. */
async function downloadLink(path) {
  try {
    return await api(`${path}/url`, { method: "POST" });
  } catch (err) {
    if (err.code === "download_link_unavailable") return null;
    throw err;
  }
}

/** Let the browser save `url` (a cross-origin one by its Content-Disposition: the page stays). */
function save(url, filename) {
  const a = Object.assign(document.createElement("a"), { href: url, download: filename, rel: "noopener" });
  document.body.append(a);
  a.click();
  a.remove();
}
