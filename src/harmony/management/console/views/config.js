// Configuration: the running files (secrets redacted), `harmony check` of an
// edited copy, and reload with its result.  The console never writes the
// configuration: edit the file on disk, check it here, then reload.
import { api } from "../api.js";
import { h, clear, errorBox, confirmAction } from "../dom.js";

export async function render(root) {
  const doc = await api("/config");
  const main = doc.files[0];
  const editor = h("textarea", { id: "config-editor", spellcheck: "false", rows: 24 });
  editor.value = main ? main.text : "";
  const result = h("div", { id: "config-result" });
  const reloadResult = h("div", { id: "reload-outcome" });
  root.append(
    h("p", { class: "muted" }, `Running from ${doc.path}. Secrets are shown as <redacted>; a check uses the running values for them.`),
    h("h3", {}, "Check an edited copy"), editor,
    h("p", {}, h("button", { type: "button", id: "config-check", onclick: check }, "Run harmony check"), " ",
      h("button", { type: "button", id: "config-reload", class: "danger", onclick: reload }, "Reload the configuration on disk")),
    result, reloadResult,
    h("h3", {}, "Running files"),
    ...doc.files.map(f => h("details", { open: f === main }, h("summary", {}, f.path), h("pre", { class: "config" }, f.text))));

  async function check() {
    clear(result, h("p", { class: "muted" }, "checking…"));
    try {
      const r = await api("/config/check", { method: "POST", body: editor.value });
      clear(result, h("p", { class: r.ok ? "ok-text" : "bad-text" }, r.ok ? "harmony check: OK" : `harmony check: INVALID (exit ${r.exit_code})`),
        h("pre", { class: "config" }, r.output));
    } catch (e) { clear(result, errorBox(e)); }
  }

  async function reload() {
    if (!(await confirmAction("Reload the configuration from disk now?"))) return;
    clear(reloadResult, h("p", { class: "muted" }, "reloading…"));
    try {
      const r = await api("/reload", { method: "POST" });
      clear(reloadResult, h("p", { class: "ok-text" }, "Reloaded."), h("pre", { class: "small" }, JSON.stringify(r.changes, null, 1)));
    } catch (e) {
      const errors = (e.doc && e.doc.errors) || [e.message];
      clear(reloadResult, h("p", { class: "bad-text" }, "Reload failed; the previous configuration keeps running."),
        h("ul", {}, errors.map(x => h("li", {}, x))));
    }
  }
  return null;
}
