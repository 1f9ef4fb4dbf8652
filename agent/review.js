// Review page logic: include/exclude toggles, filters, and export of the edited selection.json.
// All candidate text is already HTML-escaped in the page; this script only reads data attributes and the
// embedded JSON, and never writes model text into the page as HTML.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("caft-data").textContent);
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  var byId = {};
  cards.forEach(function (c) { byId[c.getAttribute("data-cid")] = c; });

  function box(card) { return card.querySelector("input.include"); }

  function refreshCard(card) {
    card.classList.toggle("included", box(card).checked);
  }

  function updateCount() {
    var n = cards.filter(function (c) { return box(c).checked; }).length;
    document.getElementById("n-included").textContent = String(n);
  }

  function applyFilters() {
    var rel = document.getElementById("f-relation").value;
    var layer = document.getElementById("f-layer").value;
    var minConf = parseFloat(document.getElementById("f-confidence").value || "0");
    var text = document.getElementById("f-text").value.toLowerCase();
    var show = document.getElementById("f-show").value;
    var visible = 0;
    cards.forEach(function (c) {
      var ok = true;
      if (rel !== "all" && c.getAttribute("data-relation") !== rel) { ok = false; }
      if (layer !== "all" && c.getAttribute("data-layer") !== layer) { ok = false; }
      var conf = parseFloat(c.getAttribute("data-confidence"));
      if (minConf > 0 && !(conf >= minConf)) { ok = false; }
      if (text && c.getAttribute("data-search").indexOf(text) < 0) { ok = false; }
      if (show === "included" && !box(c).checked) { ok = false; }
      if (show === "excluded" && box(c).checked) { ok = false; }
      c.classList.toggle("hidden", !ok);
      if (ok) { visible += 1; }
    });
    document.getElementById("n-visible").textContent = String(visible);
  }

  function buildSelection() {
    var base = DATA.selection;
    var initial = {};
    base.selected.forEach(function (s) { initial[s.candidate] = true; });
    var selected = [];
    var added = [];
    var removed = [];
    cards.forEach(function (c) {
      var cid = c.getAttribute("data-cid");
      var info = DATA.candidates[cid];
      if (box(c).checked) {
        selected.push({
          candidate: cid,
          layer: info.layer,
          label: info.label,
          relation: info.relation,
          confidence: info.confidence,
          verdict_ref: info.verdict_ref
        });
        if (!initial[cid]) { added.push(cid); }
      } else if (initial[cid]) {
        removed.push(cid);
      }
    });
    var policy = {};
    Object.keys(base.policy).forEach(function (k) { policy[k] = base.policy[k]; });
    policy.review = { edited: true, added: added, removed: removed, exported_at: new Date().toISOString() };
    var out = {};
    Object.keys(base).forEach(function (k) { out[k] = base[k]; });
    out.policy = policy;
    out.selected = selected;
    out.notes = "edited on the review page: " + added.length + " added, " + removed.length + " removed";
    return out;
  }

  function exportSelection() {
    var sel = buildSelection();
    var text = JSON.stringify(sel, null, 2) + "\n";
    document.getElementById("export-preview").textContent = text;
    var blob = new Blob([text], { type: "application/json" });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "selection.json";
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  cards.forEach(function (c) {
    box(c).addEventListener("change", function () { refreshCard(c); updateCount(); applyFilters(); });
    refreshCard(c);
  });
  ["f-relation", "f-layer", "f-confidence", "f-text", "f-show"].forEach(function (id) {
    document.getElementById(id).addEventListener("input", applyFilters);
    document.getElementById(id).addEventListener("change", applyFilters);
  });
  document.getElementById("export").addEventListener("click", exportSelection);
  updateCount();
  applyFilters();
  window.caftReview = { buildSelection: buildSelection, byId: byId };
})();
