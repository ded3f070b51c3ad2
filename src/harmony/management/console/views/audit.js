// Audit: every operator action (who, what, when, outcome), newest first.
import { api } from "../api.js";
import { h, clear, table, when } from "../dom.js";

export async function render(root, { poller }) {
  const body = h("div");
  root.append(h("p", { class: "muted small" }, "Names are what operators typed at login; the token is shared."), body);
  const refresh = async () => {
    const doc = await api("/audit", { query: { limit: 500 } });
    clear(body, table([
      { title: "when", cell: e => when(e.at) }, { title: "who", cell: e => e.who },
      { title: "action", cell: e => e.action }, { title: "subject", cell: e => e.subject },
      { title: "details", cell: e => Object.keys(e.details || {}).length ? JSON.stringify(e.details) : "" },
      { title: "status", cell: e => h("span", { class: e.ok ? "ok-text" : "bad-text" }, String(e.status)) },
    ], doc.entries, e => ({ class: "audit-entry", dataset: { action: e.action } })));
  };
  return { stop: poller(refresh, 5) };
}
