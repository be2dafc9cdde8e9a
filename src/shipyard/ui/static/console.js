// Shipyard console: the few behaviours htmx does not have. No eval, no inline handlers (the CSP forbids both).
(function () {
  "use strict";
  // A live fragment leaving the page (a new view or another log stream) cancels its pending long-poll, so that
  // held requests never pile up against the browser's per-host connection limit.
  document.addEventListener("htmx:beforeCleanupElement", function (evt) {
    var elt = evt.target;
    if (elt && elt.classList && elt.classList.contains("live") && window.htmx) {
      window.htmx.trigger(elt, "htmx:abort");
    }
  });
  // A flash message replaces the previous one and is announced (role=status); keep it visible for keyboard users.
  document.addEventListener("htmx:afterSwap", function (evt) {
    if (evt.detail && evt.detail.target && evt.detail.target.id === "flash") {
      evt.detail.target.scrollIntoView({block: "nearest"});
    }
  });
})();
