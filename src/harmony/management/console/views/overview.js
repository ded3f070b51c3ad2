// Overview: version, uptime, listeners, pipelines drawn endpoint -> middleware
// -> backend -> targets, and the last reload's result.
import { api } from "../api.js";
import { h, s, clear, table, age, when } from "../dom.js";

const BOX_W = 150, BOX_H = 30, GAP_X = 36, GAP_Y = 10;

function stageBoxes(items, cls) {
  return items.map(it => typeof it === "string" ? { label: it, cls, title: "" }
    : { label: it.label, cls: it.cls || cls, title: it.title || "" });
}

// One pipeline as columns of boxes joined by arrows: endpoints, each
// middleware, backends, the backends a store_forward backend queues for, targets.
function pipelineDiagram(p, targetsByBackend, backendInfo) {
  const queued = [];
  for (const b of p.backends) for (const f of (backendInfo[b]?.forwards_to || [])) {
    queued.push({ label: `${f} (queued)`, cls: "backend", name: f, title: `store-and-forward queue of ${b}` });
  }
  const targets = [];
  for (const b of (queued.length ? queued.map(q => q.name) : p.backends)) for (const t of (targetsByBackend[b] || [])) {
    targets.push({ label: `${t.name}`, cls: t.healthy && t.circuit !== "open" ? "ok" : "bad", title: t.address || "" });
  }
  const columns = [
    stageBoxes(p.endpoints, "endpoint"),
    ...p.middleware.map(m => stageBoxes([m], "middleware")),
    stageBoxes(p.backends.map(b => ({ label: b, title: backendInfo[b]?.type || "" })), "backend"),
  ];
  if (queued.length) columns.push(queued);
  if (targets.length) columns.push(targets);
  const rows = Math.max(...columns.map(c => c.length));
  const width = columns.length * (BOX_W + GAP_X) - GAP_X + 4;
  const height = rows * (BOX_H + GAP_Y) - GAP_Y + 4;
  const svg = s("svg", { class: "pipeline", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
                         "aria-label": `pipeline ${p.name}` });
  svg.append(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6,
                                          markerHeight: 6, orient: "auto" }, s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" }))));
  const centre = (col, i, n) => 2 + i * (BOX_H + GAP_Y) + (rows - n) * (BOX_H + GAP_Y) / 2 + BOX_H / 2;
  columns.forEach((col, ci) => {
    const x = 2 + ci * (BOX_W + GAP_X);
    col.forEach((box, i) => {
      const y = centre(col, i, col.length) - BOX_H / 2;
      const label = box.label.length > 20 ? box.label.slice(0, 19) + "…" : box.label;
      svg.append(s("g", { class: `box ${box.cls}` },
        s("title", {}, `${box.label}${box.title ? " — " + box.title : ""}`),
        s("rect", { x, y, width: BOX_W, height: BOX_H, rx: 5 }),
        s("text", { x: x + BOX_W / 2, y: y + BOX_H / 2 + 4, "text-anchor": "middle" }, label)));
      if (ci > 0) {
        const prev = columns[ci - 1];
        prev.forEach((_, pi) => {
          if (prev.length > 1 && col.length > 1 && pi !== i && ci < columns.length - 1) return;
          svg.append(s("line", { x1: x - GAP_X + 1, y1: centre(prev, pi, prev.length), x2: x - 2, y2: centre(col, i, col.length),
                                 class: "edge", "marker-end": "url(#arrow)" }));
        });
      }
    });
  });
  return svg;
}

export async function render(root, { poller }) {
  const info = h("div", { class: "cards" });
  const reload = h("div");
  const listeners = h("div");
  const pipes = h("div");
  root.append(info, h("h3", {}, "Last reload"), reload, h("h3", {}, "Listeners"), listeners, h("h3", {}, "Pipelines"), pipes);

  const refresh = async () => {
    const [i, r, p, t, bk] = await Promise.all([api("/info"), api("/routes"), api("/pipelines"), api("/targets"),
                                                api("/backends")]);
    clear(info,
      card("Version", i.version, `Python ${i.python_version}, Twisted ${i.twisted_version}`),
      card("Proxy", i.proxy_id, i.config_path),
      card("Uptime", age(i.uptime_seconds), `since ${i.started_at}`));
    const rl = i.reload;
    clear(reload, rl === null || rl === undefined
      ? h("p", { class: "muted", id: "reload-result" }, "No reload since start.")
      : h("div", { id: "reload-result", class: rl.ok ? "ok-text" : "bad-text" },
          h("p", {}, `${rl.ok ? "Succeeded" : "Failed"} at ${when(rl.at)}`),
          (rl.errors || []).length ? h("ul", {}, rl.errors.map(e => h("li", {}, e))) : null,
          rl.changes ? h("pre", { class: "small" }, JSON.stringify(rl.changes, null, 1)) : null));
    const m = r.management || {};
    clear(listeners, table([
      { title: "network", cell: x => x.network }, { title: "listen", cell: x => x.listen },
      { title: "port", cell: x => x.port ?? "" }, { title: "prefix", cell: x => x.prefix },
      { title: "endpoint", cell: x => x.endpoint }, { title: "service", cell: x => x.service },
      { title: "pipeline", cell: x => x.pipeline },
    ], [...r.routes, { network: m.network || "(own)", listen: m.listen || "", port: m.port, prefix: m.base_path,
                       endpoint: "management", service: "management API + console", pipeline: "" }]));
    const byBackend = {};
    for (const b of t.backends) byBackend[b.backend] = b.targets;
    const backendInfo = {};
    for (const b of bk.backends) backendInfo[b.name] = b;
    clear(pipes, p.pipelines.map(pl => h("div", { class: "pipeline-row", dataset: { pipeline: pl.name } },
      h("h4", {}, pl.name, " ", h("span", { class: "muted" }, pl.description || "")),
      pipelineDiagram(pl, byBackend, backendInfo))));
  };
  const stop = poller(refresh, 5);
  return { stop };
}

function card(title, value, sub) {
  return h("div", { class: "card" }, h("div", { class: "muted" }, title), h("div", { class: "big" }, value), h("div", { class: "muted small" }, sub));
}
