// Shipyard console: live views (a long-poll per view that swaps in the fragment's next version) and the few
// behaviours htmx does not have. No eval and no inline handlers: the page's CSP forbids both.
(function () {
  "use strict";
  var RETRY_MS = 5000;

  // One request per view: the server answers when the rendered fragment differs from ours (or after ~25 s),
  // and the answer carries the URL of the next wait.
  function follow(elt) {
    if (elt._live || !elt.isConnected) { return; }
    var controller = new AbortController();
    elt._live = controller;
    fetch(elt.getAttribute("data-live"), {signal: controller.signal, headers: {"HX-Request": "true"},
                                           credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        var redirect = response.headers.get("HX-Redirect");
        if (redirect) { window.location.assign(redirect); return undefined; }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        if (html === undefined || !elt.isConnected) { return; }
        var template = document.createElement("template");
        template.innerHTML = html.trim();
        var next = template.content.firstElementChild;
        if (!next) { return; }
        elt.replaceWith(next);
        if (window.htmx) { window.htmx.process(next); }
        follow(next);
      })
      .catch(function (err) {
        if (err && err.name === "AbortError") { return; }
        // The server restarting or unreachable: say so on the view and try again a little later.
        elt.classList.add("stale");
        elt._live = null;
        window.setTimeout(function () { follow(elt); }, RETRY_MS);
      });
  }

  function followAll(root) {
    var found = root.querySelectorAll ? root.querySelectorAll(".live[data-live]") : [];
    if (root.matches && root.matches(".live[data-live]")) { follow(root); }
    for (var i = 0; i < found.length; i++) { follow(found[i]); }
  }

  // A live view leaving the page (another log stream swapped in) cancels its pending wait, so that held
  // requests never pile up against the browser's per-host connection limit.
  document.addEventListener("htmx:beforeCleanupElement", function (evt) {
    var elt = evt.target;
    if (elt && elt._live) { elt._live.abort(); }
  });
  document.addEventListener("htmx:load", function (evt) { followAll(evt.target); });
  document.addEventListener("DOMContentLoaded", function () { followAll(document); });

  // A flash message replaces the previous one and is announced (role=status); keep it in view.
  document.addEventListener("htmx:afterSwap", function (evt) {
    if (evt.detail && evt.detail.target && evt.detail.target.id === "flash") {
      evt.detail.target.scrollIntoView({block: "nearest"});
    }
  });
})();
