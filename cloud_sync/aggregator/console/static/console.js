// The console's only script (no framework): live refresh of the dashboard, photo upload with
// progress and a per-photo result, and confirmation of destructive buttons. Pages work
// without it (forms post normally).
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
        item.textContent = `${file.name}: ${result.ok ? "accepted" + (result.quality != null ? ` (quality ${result.quality.toFixed(2)})` : "") : result.reason}`;
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

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(startRefresh);
  document.querySelectorAll("form[data-upload]").forEach(startUpload);
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
});
