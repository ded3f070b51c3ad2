// The management API as the console calls it: same origin, the session cookie,
// and the session's CSRF token on every state-changing call.
export const apiBase = location.pathname.replace(/\/ui(\/.*)?$/, "");

let csrf = null;
let onUnauthorized = () => {};

export function setCsrf(token) { csrf = token; }
export function whenUnauthorized(fn) { onUnauthorized = fn; }

export class ApiError extends Error {
  constructor(status, doc) {
    super(typeof doc === "object" && doc && doc.detail ? doc.detail : `HTTP ${status}`);
    this.status = status;
    this.doc = doc;
  }
}

export async function api(path, { method = "GET", body, query } = {}) {
  const headers = {};
  if (method !== "GET" && method !== "HEAD" && csrf) headers["X-CSRF-Token"] = csrf;
  if (body !== undefined && typeof body !== "string") {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  } else if (typeof body === "string") {
    headers["Content-Type"] = "text/plain; charset=utf-8";
  }
  let url = apiBase + path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
    const s = q.toString();
    if (s) url += "?" + s;
  }
  const r = await fetch(url, { method, body, headers, credentials: "same-origin", cache: "no-store" });
  const type = r.headers.get("content-type") || "";
  const doc = type.includes("json") ? await r.json() : await r.text();
  if (r.status === 401 && path !== "/session") onUnauthorized();
  if (!r.ok) throw new ApiError(r.status, doc);
  return doc;
}

export function url(path) { return apiBase + path; }
