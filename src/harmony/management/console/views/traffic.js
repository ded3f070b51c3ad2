// Traffic: request and DIMSE-operation rates, latency percentiles and error
// rates per pipeline, as SVG line charts drawn here (no chart library).
import { api } from "../api.js";
import { h, s, clear, ms } from "../dom.js";

const W = 300, H = 120, PAD = 28;

function chart(title, series, unit, fmt = v => v.toFixed(2)) {
  const all = series.flatMap(x => x.points);
  const maxX = Math.max(60, ...all.map(p => p.x));
  const maxY = Math.max(unit === "ratio" ? 0.01 : 1e-9, ...all.map(p => p.y)) * 1.1;
  const X = x => PAD + (W - PAD - 4) * (1 - x / maxX);
  const Y = y => H - PAD / 2 - (H - PAD) * (y / maxY);
  const svg = s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  svg.append(s("line", { x1: PAD, y1: H - PAD / 2, x2: W - 4, y2: H - PAD / 2, class: "axis" }),
             s("line", { x1: PAD, y1: 4, x2: PAD, y2: H - PAD / 2, class: "axis" }),
             s("text", { x: 2, y: 12, class: "tick" }, fmt(maxY)),
             s("text", { x: 2, y: H - PAD / 2, class: "tick" }, "0"),
             s("text", { x: W - 4, y: H - 2, class: "tick", "text-anchor": "end" }, "now"),
             s("text", { x: PAD, y: H - 2, class: "tick" }, `-${Math.round(maxX)} s`));
  series.forEach((ser, i) => {
    if (!ser.points.length) return;
    svg.append(s("polyline", { class: `line c${i}`, points: ser.points.map(p => `${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join(" ") }),
               ...ser.points.map(p => s("circle", { class: `dot c${i}`, cx: X(p.x).toFixed(1), cy: Y(p.y).toFixed(1), r: 2 },
                                         s("title", {}, `${fmt(p.y)} ${p.x.toFixed(0)} s ago`))));
  });
  return h("figure", { class: "chart-box" }, h("figcaption", {}, title, " ",
    series.map((ser, i) => h("span", { class: `legend c${i}` }, ser.name))), svg);
}

export async function render(root, { poller }) {
  const body = h("div", { id: "traffic-body" });
  const note = h("p", { class: "muted small" });
  root.append(note, body);
  const refresh = async () => {
    const doc = await api("/traffic");
    note.textContent = `History: the last ${Math.round(doc.window_seconds)} s (up to 10 min), sampled every 5 s and on each refresh.`;
    const names = Object.keys(doc.pipelines).sort();
    clear(body, names.length ? names.map(name => {
      const p = doc.pipelines[name];
      const pts = key => p.points.filter(x => x[key] !== null && x[key] !== undefined).map(x => ({ x: x.ago, y: x[key] }));
      const t = p.total;
      return h("div", { class: "traffic-pipeline", dataset: { pipeline: name } },
        h("h3", {}, name, " ", h("span", { class: "muted small" },
          `${t.requests} requests, ${t.errors} errors, ${t.dimse} DIMSE operations since start; p50 ${ms(t.p50)}, p95 ${ms(t.p95)}, p99 ${ms(t.p99)}`)),
        h("div", { class: "charts" },
          chart("requests/s", [{ name: "requests", points: pts("requests_per_s") }], "rate"),
          chart("DIMSE operations/s", [{ name: "operations", points: pts("dimse_per_s") }], "rate"),
          chart("latency (ms)", [{ name: "p50", points: pts("p50").map(q => ({ x: q.x, y: q.y * 1000 })) },
                                 { name: "p95", points: pts("p95").map(q => ({ x: q.x, y: q.y * 1000 })) },
                                 { name: "p99", points: pts("p99").map(q => ({ x: q.x, y: q.y * 1000 })) }], "ms", v => v.toFixed(1)),
          chart("error ratio", [{ name: "5xx / requests", points: pts("error_ratio") }], "ratio", v => v.toFixed(3))));
    }) : h("p", { class: "muted" }, "No traffic yet."));
  };
  return { stop: poller(refresh, 2) };
}
