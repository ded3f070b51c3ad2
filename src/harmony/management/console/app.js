// The console's shell: login, navigation, and a poller per page that stops
// when the page changes or the tab is hidden (a closed or hidden console
// costs the proxy nothing).
import { api, setCsrf, whenUnauthorized } from "./api.js";
import { h, clear, errorBox } from "./dom.js";
import * as overview from "./views/overview.js";
import * as targets from "./views/targets.js";
import * as queues from "./views/queues.js";
import * as archive from "./views/archive.js";
import * as traffic from "./views/traffic.js";
import * as config from "./views/config.js";
import * as audit from "./views/audit.js";

const PAGES = [
  ["overview", "Overview", overview], ["targets", "Targets", targets], ["queues", "Queues", queues],
  ["archive", "Archive", archive], ["traffic", "Traffic", traffic], ["config", "Configuration", config],
  ["audit", "Audit", audit],
];

const main = document.getElementById("main");
let current = null;

// Runs fn now and every `seconds` while the page is shown and the tab visible.
export function poller(fn, seconds) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    timer = null;
    if (stopped) return;
    if (!document.hidden) {
      try { await fn(); } catch (e) { status(e.message || String(e)); }
    }
    if (!stopped) timer = setTimeout(tick, seconds * 1000);
  };
  tick();
  return () => { stopped = true; if (timer) clearTimeout(timer); };
}

export function status(text) {
  document.getElementById("status").textContent = text ? `${new Date().toLocaleTimeString()} ${text}` : "";
}

function showLogin(message) {
  if (current && current.stop) current.stop();
  current = null;
  document.getElementById("top").hidden = true;
  clear(main);
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("login-token").focus();
}

async function route() {
  if (current && current.stop) current.stop();
  current = null;
  const name = (location.hash.replace(/^#\/?/, "").split("/")[0]) || "overview";
  const page = PAGES.find(p => p[0] === name) || PAGES[0];
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page[0]);
  document.title = `${page[1]} · Harmony console`;
  const section = h("section", { id: `page-${page[0]}`, class: "page" });
  clear(main, h("h2", {}, page[1]), section);
  try {
    current = (await page[2].render(section, { poller, status })) || null;
  } catch (e) {
    section.append(errorBox(e));
  }
}

async function start() {
  let session;
  try {
    session = await api("/session");
  } catch (e) {
    showLogin(e.status === 401 ? "" : e.message);
    return;
  }
  setCsrf(session.csrf);
  document.getElementById("login").hidden = true;
  document.getElementById("top").hidden = false;
  document.getElementById("who").textContent = session.who || "";
  await route();
}

document.getElementById("nav").append(...PAGES.map(([id, title]) =>
  h("a", { href: `#/${id}`, dataset: { page: id }, id: `nav-${id}` }, title)));

document.getElementById("login-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const token = document.getElementById("login-token").value;
  const operator = document.getElementById("login-operator").value;
  try {
    await api("/session", { method: "POST", body: { token, operator } });
    document.getElementById("login-token").value = "";
    await start();
  } catch (e) {
    showLogin(e.status === 401 ? "Wrong token." : e.message);
  }
});

document.getElementById("logout").addEventListener("click", async () => {
  try { await api("/session", { method: "DELETE" }); } catch (e) { /* logged out either way */ }
  setCsrf(null);
  showLogin("Logged out.");
});

whenUnauthorized(() => showLogin("Your session has ended: log in again."));
window.addEventListener("hashchange", () => { if (document.getElementById("login").hidden) route(); });
start();
