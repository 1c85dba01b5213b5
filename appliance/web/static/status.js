// Live updates of the status page: Server-Sent Events from /api/status/stream, preview JPEG
// refreshed in place. Plain JS, no build step; text is set with textContent only.
(function () {
  "use strict";
  var refreshMs = parseInt(document.body.dataset.refreshMs || "1000", 10);

  function get(obj, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? o : o[k]; }, obj);
  }

  function markStates() {
    document.querySelectorAll(".state").forEach(function (el) {
      el.dataset.v = el.textContent.trim();
    });
  }

  function row(cells, cls, span) {
    var tr = document.createElement("tr");
    if (cls) { tr.className = cls; }
    cells.forEach(function (text, i) {
      var td = document.createElement("td");
      td.textContent = text;
      if (cls === "none") { td.colSpan = span || 2; td.className = "muted"; }
      else if (i === 1 && cls === "num") { td.className = "num"; }
      tr.appendChild(td);
    });
    return tr;
  }

  function presentRow(p) {
    var tr = row([p.name, p.first_seen]);
    var td = document.createElement("td");
    td.textContent = p.match || "–";
    td.className = "match " + (p.match || "");
    td.title = "confidence " + p.confidence;
    tr.appendChild(td);
    return tr;
  }

  var cameraOk = true;

  function showPreview(picture) {
    document.getElementById("preview").hidden = !picture;
    document.getElementById("preview-empty").hidden = picture;
  }

  function render(s) {
    document.querySelectorAll("[data-k]").forEach(function (el) {
      var v = get(s, el.dataset.k);
      var empty = (v === null || v === undefined || v === "");
      var blank = el.dataset.empty !== undefined ? el.dataset.empty : "–";
      el.textContent = empty ? blank : String(v) + (el.dataset.unit || "");
    });
    var course = document.getElementById("course");
    course.textContent = s.class_line;
    var present = document.getElementById("present");
    present.replaceChildren();
    if (s.present.length === 0) { present.appendChild(row(["Nobody yet"], "none", 3)); }
    s.present.forEach(function (p) { present.appendChild(presentRow(p)); });
    cameraOk = s.camera.ok;
    document.getElementById("preview-why").textContent =
      s.camera.preview_note || "Loading the camera picture.";
    if (s.camera.preview_note) { showPreview(false); }
    document.getElementById("present-count").textContent = String(s.present.length);
    var stages = document.getElementById("stages");
    stages.replaceChildren();
    var names = Object.keys(s.stage_ms);
    if (names.length === 0) { stages.appendChild(row(["No frame yet"], "none")); }
    names.forEach(function (n) { stages.appendChild(row([n, s.stage_ms[n] + " ms"], "num")); });
    var pl = s.placement, bands = document.getElementById("placement-bands");
    if (pl && bands) {
      var hint = document.getElementById("placement-hint");
      hint.textContent = pl.hint;
      hint.className = pl.ok ? "ok" : "warn";
      bands.replaceChildren();
      if (pl.bands.length === 0) { bands.appendChild(row(["Nobody has walked past yet"], "none", 3)); }
      pl.bands.forEach(function (b) {
        var tr = row([b.size + " px", String(b.faces), String(b.recognised)]);
        tr.children[1].className = "num"; tr.children[2].className = "num";
        bands.appendChild(tr);
      });
    }
    var health = document.getElementById("health");
    health.replaceChildren();
    Object.keys(s.health).forEach(function (n) {
      var li = document.createElement("li");
      li.className = "chip " + s.health[n];
      li.textContent = n + ": " + s.health[n];
      // first boot (make flash): say what the device is still missing
      if (n === "provisioning" && s.provisioning) { li.textContent = s.provisioning; }
      health.appendChild(li);
    });
    markStates();
  }

  function setLive(ok) {
    var live = document.getElementById("live");
    live.textContent = ok ? "live" : "reconnecting";
    live.dataset.v = ok ? "ok" : "stale";
  }

  function connect() {
    var source = new EventSource("/api/status/stream");
    source.addEventListener("status", function (ev) {
      setLive(true);
      render(JSON.parse(ev.data));
    });
    source.onerror = function () {
      setLive(false);
      if (source.readyState === EventSource.CLOSED) {
        // Closed for good (e.g. the session expired): check and go to the login page.
        fetch("/api/status", { credentials: "same-origin" }).then(function (r) {
          if (r.status === 401) { window.location.assign("/login"); }
          else { setTimeout(connect, refreshMs * 3); }
        }).catch(function () { setTimeout(connect, refreshMs * 3); });
      }
    };
  }

  // The picture is swapped in only once it has loaded: no broken-image icon, ever. Without a
  // camera (or before its first picture) the placeholder says why (camera.preview_note).
  function refreshPreview() {
    var img = document.getElementById("preview");
    var next = new Image();
    next.onload = function () {
      img.src = next.src;
      showPreview(cameraOk);
      setTimeout(refreshPreview, refreshMs);
    };
    next.onerror = function () {  // 204: no picture yet
      showPreview(false);
      setTimeout(refreshPreview, refreshMs * 2);
    };
    next.src = "/preview.jpg?t=" + Date.now();
  }

  markStates();
  connect();
  refreshPreview();
})();
