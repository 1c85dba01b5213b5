// The console's only script (no framework): live refresh of the dashboard, photo upload with
// progress and a per-photo result, the chunked recording upload that resumes after a dropped
// connection, confirmation of destructive buttons, and in-place marks on the course page.
// Pages work without it (forms post normally), except the recording upload, which needs it.
"use strict";

function csrfToken() {
  const field = document.querySelector('input[name="csrf"]');
  return field ? field.value : "";
}

function startRefresh(box) {
  const url = box.dataset.refresh;
  const every = Math.max(1, parseFloat(box.dataset.every || "10")) * 1000;
  async function tick() {
    try {
      const response = await fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}});
      if (response.redirected || response.status === 401) { window.location.reload(); return; }
      if (response.ok) { box.innerHTML = await response.text(); box.dataset.refreshed = String(Date.now()); }
    } catch (err) {
      box.dataset.error = String(err);
    }
    setTimeout(tick, every);
  }
  setTimeout(tick, every);
}

function startUpload(form) {
  form.addEventListener("submit", async (event) => {
    const files = [];
    form.querySelectorAll('input[type="file"]').forEach((input) => files.push(...input.files));
    event.preventDefault();
    if (!files.length) { form.querySelector(".progress-label").textContent = "Choose at least one photo."; return; }
    const bar = form.querySelector("progress");
    const label = form.querySelector(".progress-label");
    const list = form.querySelector(".results");
    list.innerHTML = "";
    bar.max = files.length; bar.value = 0; bar.hidden = false;
    let accepted = 0;
    for (const [i, file] of files.entries()) {
      label.textContent = `Photo ${i + 1} of ${files.length}: ${file.name}`;
      const body = new FormData();
      body.append("photos", file, file.name);
      const item = document.createElement("li");
      try {
        const response = await fetch(form.action, {
          method: "POST", body, credentials: "same-origin",
          headers: {"Accept": "application/json", "X-CSRF-Token": csrfToken()},
        });
        const data = await response.json();
        const result = (data.results || [])[0] || {ok: false, reason: data.detail || `HTTP ${response.status}`};
        item.className = result.ok ? "ok" : "bad";
        item.className = result.ok ? (result.warning ? "warn" : "ok") : "bad";
        item.textContent = `${file.name}: ${result.ok ? "accepted" + (result.quality != null ? ` (quality ${result.quality.toFixed(2)})` : "") + (result.warning ? `, ${result.warning}` : "") : result.reason}`;
        if (result.ok) accepted += 1;
      } catch (err) {
        item.className = "bad";
        item.textContent = `${file.name}: upload failed (${err})`;
      }
      list.appendChild(item);
      bar.value = i + 1;
    }
    label.textContent = `${accepted} of ${files.length} photos accepted`;
    const refresh = form.dataset.after;
    if (refresh) {
      const page = await fetch(refresh, {credentials: "same-origin"});
      const html = new DOMParser().parseFromString(await page.text(), "text/html");
      const fresh = html.querySelector("#face-list");
      const old = document.querySelector("#face-list");
      if (fresh && old) old.replaceWith(fresh);
    }
    form.dataset.done = String(files.length);
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A recording goes up in chunks at the offset the server has: after a failed chunk (dropped
// connection, server restart) ask the server where it stands and go on from there.
function startRecordingUpload(form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = form.querySelector('input[type="file"]').files[0];
    const bar = form.querySelector("progress");
    const label = form.querySelector(".progress-label");
    if (!file) { label.textContent = "Choose a recording."; return; }
    const meta = new FormData(form);
    meta.delete("file");
    meta.append("filename", file.name);
    meta.append("size_bytes", String(file.size));
    const headers = {"Accept": "application/json", "X-CSRF-Token": csrfToken()};
    let response = await fetch(form.action, {method: "POST", body: meta, credentials: "same-origin", headers});
    let data = await response.json().catch(() => ({}));
    if (!response.ok) { label.textContent = `Refused: ${data.detail || "HTTP " + response.status}`; return; }
    const id = data.id, chunk = data.chunk_bytes;
    bar.hidden = false; bar.max = file.size; bar.value = 0;
    let offset = 0, failures = 0;
    while (offset < file.size) {
      label.textContent = `Uploading ${file.name}: ${Math.floor(100 * offset / file.size)}%`;
      try {
        response = await fetch(`/recordings/${id}/content`, {
          method: "PUT", body: file.slice(offset, offset + chunk), credentials: "same-origin",
          headers: {...headers, "Upload-Offset": String(offset), "Content-Type": "application/octet-stream"},
        });
        data = await response.json().catch(() => ({}));
        if (response.status === 422) { label.textContent = data.detail || "The recording was refused."; return; }
        if (response.ok || response.status === 409) {
          offset = parseInt(response.headers.get("Upload-Offset") || data.received_bytes || offset, 10);
          failures = 0;
        } else if (response.status < 500 && response.status !== 429) {
          label.textContent = `Upload stopped: ${data.detail || "HTTP " + response.status}`; return;
        } else { throw new Error(`HTTP ${response.status}`); }
      } catch (err) {
        failures += 1;
        if (failures > 8) { label.textContent = `Upload stopped after ${failures} failures (${err}); upload the file again.`; return; }
        label.textContent = `Connection lost (${err}); resuming…`;
        await sleep(Math.min(30000, 1000 * 2 ** failures));
        const status = await fetch(`/recordings/${id}/status`, {credentials: "same-origin"}).then((r) => r.json()).catch(() => null);
        if (status) offset = status.received_bytes;
      }
      bar.value = offset;
    }
    label.textContent = "Uploaded and checked: processing starts.";
    form.dataset.done = id;
    window.location.href = `/recordings/${id}`;
  });
}

// A form marked data-inplace posts in the background (JSON answer) and the page's classes are
// refreshed where they stand: a teacher marking five students on a phone stays where they are.
async function submitInPlace(form) {
  const status = document.querySelector("#inplace-notice");
  form.classList.add("busy");
  form.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  let message;
  try {
    const response = await fetch(form.action, {
      method: "POST", body: new FormData(form), credentials: "same-origin",
      headers: {"Accept": "application/json", "X-CSRF-Token": csrfToken()},
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.detail || `HTTP ${response.status}`);
    message = data.message || "saved";
    const page = await fetch(window.location.href, {credentials: "same-origin"});
    const html = new DOMParser().parseFromString(await page.text(), "text/html");
    document.querySelectorAll("section.session[data-starts]").forEach((old) => {
      const fresh = [...html.querySelectorAll("section.session[data-starts]")]
        .find((s) => s.dataset.starts === old.dataset.starts);
      if (fresh) old.replaceWith(fresh);
    });
    const history = html.querySelector("#corrections"), oldHistory = document.querySelector("#corrections");
    if (history && oldHistory) oldHistory.replaceWith(history);
  } catch (err) {
    form.classList.remove("busy");
    form.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    let line = form.querySelector(".inplace-error");
    if (!line) { line = document.createElement("span"); line.className = "inplace-error"; form.appendChild(line); }
    line.textContent = `Not saved: ${err.message}`;
    return;
  }
  if (status) { status.textContent = message; status.hidden = false; }
  document.body.dataset.inplaceDone = String(Number(document.body.dataset.inplaceDone || 0) + 1);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(startRefresh);
  document.querySelectorAll("form[data-upload]").forEach(startUpload);
  document.querySelectorAll("form[data-recording-upload]").forEach(startRecordingUpload);
  // one listener for every form, also those a refresh put on the page later
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement)) return;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) { event.preventDefault(); return; }
    if (form.hasAttribute("data-inplace")) {
      event.preventDefault();
      const reason = document.querySelector(".hand-reason");
      const own = form.querySelector('input[type="hidden"][name="reason"]');
      if (reason && own && reason.value.trim()) own.value = reason.value.trim();
      submitInPlace(form);
    }
  });
});
