// Queues: per target pending/delivering/delivered/dead and oldest age; dead
// letters filtered by study, SOP class, error and time; retry and purge, one
// or every matching entry, after a confirmation.
import { api } from "../api.js";
import { h, clear, table, age, when, errorBox, confirmAction } from "../dom.js";

export async function render(root, { poller, status }) {
  const overview = h("div", { id: "queue-overview" });
  const dead = h("div", { id: "dead-letters" });
  root.append(overview, dead);
  let selected = null;

  const refresh = async () => {
    const doc = await api("/queues");
    const rows = Object.entries(doc.targets).map(([name, q]) => ({ name, ...q }));
    clear(overview, table([
      { title: "target", cell: r => r.name },
      { title: "pending", cell: r => r.pending, cls: "num" }, { title: "delivering", cell: r => r.delivering, cls: "num" },
      { title: "delivered", cell: r => r.delivered, cls: "num" },
      { title: "dead", cell: r => h("span", { class: r.dead ? "bad-text" : "" }, String(r.dead)), cls: "num" },
      { title: "oldest", cell: r => r.oldest_age_seconds ? age(r.oldest_age_seconds) : "" },
      { title: "", cell: r => [
        h("button", { type: "button", class: "show-dead", onclick: () => { selected = r.name; showDead(); } }, "Dead letters"),
        " ",
        h("button", { type: "button", class: "wake", onclick: () => act(`/queues/${enc(r.name)}/wake`, "POST") }, "Wake"),
      ] },
    ], rows, r => ({ dataset: { queue: r.name }, class: "queue" })));
  };

  async function act(path, method, query) {
    try {
      const doc = await api(path, { method, query });
      status(JSON.stringify(doc));
      await refresh();
      if (selected) await showDead();
      return doc;
    } catch (e) { status(e.message); return null; }
  }

  const filterForm = h("form", { class: "filters", id: "dead-filters" },
    field("study", "Study Instance UID"), field("sop_class", "SOP Class UID"), field("error", "error contains"),
    field("since", "failed since", "datetime-local"), field("until", "failed until", "datetime-local"),
    h("button", { type: "submit" }, "Apply filters"));
  filterForm.addEventListener("submit", ev => { ev.preventDefault(); showDead(); });

  function filters() {
    const f = new FormData(filterForm);
    const out = {};
    for (const k of ["study", "sop_class", "error"]) if (f.get(k)) out[k] = String(f.get(k)).trim();
    for (const k of ["since", "until"]) if (f.get(k)) out[k] = String(Date.parse(String(f.get(k))) / 1000);
    return out;
  }

  async function showDead() {
    if (!selected) return;
    const target = selected;
    const flt = filters();
    let doc;
    try {
      doc = await api(`/queues/${enc(target)}/dead`, { query: { ...flt, limit: 500 } });
    } catch (e) { clear(dead, errorBox(e)); return; }
    const matching = doc.matching ?? doc.entries.length;
    clear(dead,
      h("h3", {}, `Dead letters for ${target}`),
      filterForm,
      h("p", {},
        h("button", { type: "button", id: "retry-matching", disabled: matching === 0, onclick: async () => {
          if (await confirmAction(`Retry ${matching} dead letter(s) for ${target}?`)) act(`/queues/${enc(target)}/retry`, "POST", flt);
        } }, `Retry ${Object.keys(flt).length ? "matching" : "all"} (${matching})`),
        " ",
        h("button", { type: "button", class: "danger", id: "purge-matching", disabled: matching === 0, onclick: async () => {
          if (await confirmAction(`Purge ${matching} dead letter(s) for ${target}? They will not be delivered.`, target))
            act(`/queues/${enc(target)}/dead`, "DELETE", { ...flt, confirm: target });
        } }, `Purge ${Object.keys(flt).length ? "matching" : "all"} (${matching})`)),
      table([
        { title: "id", cell: e => e.id, cls: "num" }, { title: "SOP Instance UID", cell: e => e.sop_instance_uid, cls: "uid" },
        { title: "SOP Class", cell: e => e.sop_class_uid || "", cls: "uid" },
        { title: "study", cell: e => e.study_instance_uid || "", cls: "uid" },
        { title: "attempts", cell: e => e.attempts, cls: "num" }, { title: "failed at", cell: e => when(e.failed_at) },
        { title: "last error", cell: e => e.last_error || "" },
        { title: "", cell: e => h("button", { type: "button", class: "retry-one", onclick: () => act(`/queues/${enc(target)}/retry`, "POST", { id: e.id }) }, "Retry") },
      ], doc.entries, e => ({ dataset: { sop: e.sop_instance_uid }, class: "dead-letter" })));
  }

  return { stop: poller(refresh, 5) };
}

function field(name, label, type = "text") {
  return h("label", {}, label, " ", h("input", { name, type, id: `filter-${name}` }));
}

function enc(s) { return encodeURIComponent(s); }
