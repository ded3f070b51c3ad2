// Targets: health, circuit, in-flight, errors, last error, latency; refreshed every 2 s.
import { api } from "../api.js";
import { h, clear, table, ms, age } from "../dom.js";

export async function render(root, { poller }) {
  const body = h("div");
  const stamp = h("p", { class: "muted small", id: "targets-updated" });
  root.append(stamp, body);
  const refresh = async () => {
    const doc = await api("/targets");
    clear(body, doc.backends.length ? doc.backends.map(b => h("div", { class: "backend", dataset: { backend: b.backend } },
      h("h3", {}, b.backend, " ", h("span", { class: "muted small" },
        `${b.strategy}, retries ${b.retries}, health checks ${b.health_checks || "none"}, latency p50 ${ms(b.latency?.p50)} p95 ${ms(b.latency?.p95)}`)),
      table([
        { title: "", cell: t => h("span", { class: `dot ${up(t) ? "ok" : "bad"}`, title: up(t) ? "up" : "down" }) },
        { title: "target", cell: t => t.name }, { title: "address", cell: t => t.address },
        { title: "health", cell: t => t.healthy ? "healthy" : "unhealthy" },
        { title: "circuit", cell: t => t.circuit }, { title: "in flight", cell: t => t.in_flight, cls: "num" },
        { title: "requests", cell: t => t.requests_total, cls: "num" },
        { title: "failures", cell: t => t.failures_total, cls: "num" },
        { title: "consecutive", cell: t => t.consecutive_failures, cls: "num" },
        { title: "last error", cell: t => t.last_error || "" },
        { title: "when", cell: t => t.last_error_age_secs === null ? "" : `${age(t.last_error_age_secs)} ago` },
      ], b.targets, t => ({ class: `target ${up(t) ? "state-ok" : "state-bad"}`, dataset: { target: t.name } }))))
      : h("p", { class: "muted" }, "No backend with targets is configured."));
    stamp.textContent = `updated ${new Date().toLocaleTimeString()}`;
  };
  return { stop: poller(refresh, 2) };
}

function up(t) { return t.healthy && t.circuit !== "open"; }
