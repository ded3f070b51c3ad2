// Archive: patients -> studies -> series -> instances in a local store, with
// thumbnails, and "send to target" (queue a study for a store-and-forward target).
// This page shows patient data (PHI); no other page does.
import { api, url } from "../api.js";
import { h, clear, table, when, errorBox, confirmAction } from "../dom.js";

export async function render(root, { status }) {
  const doc = await api("/archive/stores");
  root.append(h("p", { class: "phi-banner" }, "This page shows patient data. Do not leave it open unattended."));
  if (!doc.stores.length) {
    root.append(h("p", { class: "muted" }, "No backend with a local store (local_archive, store_forward) is configured."));
    return null;
  }
  const storeSel = h("select", { id: "archive-store" }, doc.stores.map(st => h("option", { value: st.name }, `${st.name} (${st.type})`)));
  const search = h("input", { id: "archive-search", type: "search", placeholder: "patient name or ID" });
  const form = h("form", { class: "filters" }, h("label", {}, "Store ", storeSel), " ", h("label", {}, "Find ", search), " ",
    h("button", { type: "submit" }, "Search"));
  const crumbs = h("p", { class: "crumbs" });
  const body = h("div", { id: "archive-body" });
  root.append(form, crumbs, body);
  const store = () => encodeURIComponent(storeSel.value);
  form.addEventListener("submit", ev => { ev.preventDefault(); patients(); });
  storeSel.addEventListener("change", () => patients());

  async function patients() {
    clear(crumbs, "Patients");
    try {
      const d = await api(`/archive/${store()}/patients`, { query: { q: search.value } });
      clear(body, table([
        { title: "name", cell: p => h("a", { href: "#/archive", class: "patient-name", onclick: ev => { ev.preventDefault(); studies(p); } }, p.name || "(no name)") },
        { title: "ID", cell: p => p.patient_id }, { title: "birth date", cell: p => p.birth_date },
        { title: "sex", cell: p => p.sex }, { title: "studies", cell: p => p.studies, cls: "num" },
      ], d.patients, p => ({ class: "patient", dataset: { pk: p.pk } })));
    } catch (e) { clear(body, errorBox(e)); }
  }

  async function studies(p) {
    clear(crumbs, link("Patients", patients, "crumb-patients"), " › ", p.name || p.patient_id);
    const d = await api(`/archive/${store()}/patients/${p.pk}/studies`);
    const targetSel = () => h("select", { class: "send-target" }, doc.targets.map(t => h("option", { value: t }, t)));
    clear(body, table([
      { title: "date", cell: st => st.date }, { title: "description", cell: st => st.description },
      { title: "accession", cell: st => st.accession },
      { title: "Study Instance UID", cell: st => h("a", { href: "#/archive", onclick: ev => { ev.preventDefault(); series(p, st); } }, st.study_instance_uid), cls: "uid" },
      { title: "series", cell: st => st.series, cls: "num" }, { title: "instances", cell: st => st.instances, cls: "num" },
      { title: "send to target", cell: st => {
        if (!doc.targets.length) return h("span", { class: "muted" }, "no store-and-forward target");
        const sel = targetSel();
        return [sel, " ", h("button", { type: "button", class: "send", onclick: async () => {
          if (!(await confirmAction(`Queue study ${st.study_instance_uid} (${st.instances} instances) for ${sel.value}?`))) return;
          try {
            const r = await api(`/archive/${store()}/studies/${encodeURIComponent(st.study_instance_uid)}/send`, { method: "POST", query: { target: sel.value } });
            status(`queued ${r.queued} instance(s) for ${r.target}`);
          } catch (e) { status(e.message); }
        } }, "Send")];
      } },
    ], d.studies, st => ({ class: "study", dataset: { study: st.study_instance_uid } })));
  }

  async function series(p, st) {
    clear(crumbs, link("Patients", patients, "crumb-patients"), " › ", link(p.name || p.patient_id, () => studies(p), "crumb-patient"), " › ", st.description || st.study_instance_uid);
    const d = await api(`/archive/${store()}/studies/${encodeURIComponent(st.study_instance_uid)}/series`);
    const out = h("div");
    for (const se of d.series) {
      const inst = await api(`/archive/${store()}/series/${encodeURIComponent(se.series_instance_uid)}/instances`);
      out.append(h("div", { class: "series" },
        h("h4", {}, `${se.modality || "?"} #${se.number || ""} ${se.description || ""}`, " ", h("span", { class: "muted small uid" }, se.series_instance_uid)),
        h("div", { class: "thumbs" }, inst.instances.map(i => h("figure", { class: "thumb" },
          h("img", { src: url(`/archive/${store()}/instances/${encodeURIComponent(i.sop_instance_uid)}/thumbnail`), alt: `instance ${i.number}`, loading: "lazy", width: 96, height: 96 }),
          h("figcaption", { class: "small" }, `#${i.number || ""} · ${Math.round((i.size || 0) / 1024)} KiB`, h("br"), when(i.stored_at)))))));
    }
    clear(body, out);
  }

  function link(text, fn, cls) { return h("a", { href: "#/archive", class: cls, onclick: ev => { ev.preventDefault(); fn(); } }, text); }

  await patients();
  return null;
}
